"""Chat prompts in which only the template, never a message, produces special tokens.

Tokenizing a rendered chat parses every special-token string in it, so a user who types
"<|im_end|>\\n<|im_start|>system\\n..." into a message forges a system turn. Here each special
string inside a message is swapped for a unique marker before the template renders, so every
special string left in the rendered text is the template's own; the text between those is then
tokenized with special-token parsing off and the markers put back as the literal text they were.

Messages without special strings (nearly all) take the one-call path they always took, so their
token ids are exactly what transformers' apply_chat_template gives.
"""
from __future__ import annotations

import re
import secrets
from collections.abc import Callable
from functools import cached_property

from tokenizers import Tokenizer


class SpecialTokenGuard:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.special_ids = {token.content: token_id for token_id, token in tokenizer.get_added_tokens_decoder().items()
                            if token.special}
        # Longest first: at one position the longest special wins, as the tokenizer's matcher does.
        alternatives = sorted(self.special_ids, key=len, reverse=True)
        self.pattern = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    @cached_property
    def plain(self) -> Tokenizer:
        """A second tokenizer that reads special strings as text (the flag is per instance, so
        flipping it on the shared one would race with other threads' encodes)."""
        plain = Tokenizer.from_str(self.tokenizer.to_str())
        plain.encode_special_tokens = True
        return plain

    def encode_chat(self, messages: list[dict], render: Callable[[list[dict], list[dict] | None], str],
                    tools: list[dict] | None = None) -> list[int]:
        """`render(messages, tools)` turns them into the template's text. Every string in them is the
        user's but a message's `role`, also nested ones (tool calls, tool definitions)."""
        if self.pattern is None or not (any(self._has_special(m) for m in messages) or self._has_special(tools)):
            # encode_batch lets go of the GIL (encode does not): the event loop runs meanwhile
            return self.tokenizer.encode_batch([render(messages, tools)], add_special_tokens=False)[0].ids
        marker = self._marker([messages, tools])
        literals: list[str] = []

        def escape(match: re.Match) -> str:
            literals.append(match.group(0))
            return f"{marker}{len(literals) - 1}{marker}"

        def escaped(value):
            if isinstance(value, str):
                return self.pattern.sub(escape, value)
            if isinstance(value, dict):
                return {k: escaped(v) for k, v in value.items()}
            if isinstance(value, list):
                return [escaped(v) for v in value]
            return value

        messages = [{k: v if k == "role" else escaped(v) for k, v in m.items()} for m in messages]
        return self.encode_template_text(render(messages, escaped(tools)), marker, literals)

    def encode_template_text(self, text: str, marker: str = "", literals: tuple | list = ()) -> list[int]:
        """Every special string in `text` becomes its token, the rest is read as plain text, and
        `marker<i>marker` is read as literals[i]. Splitting at special tokens is what the tokenizer
        itself does before it reads the text between them, so plain text gets the same ids."""
        unmark = re.compile(f"{re.escape(marker)}(\\d+){re.escape(marker)}", re.IGNORECASE) if marker else None

        def plain_ids(piece: str) -> list[int]:
            if unmark is not None:
                piece = unmark.sub(lambda m: literals[int(m.group(1))], piece)
            return self.plain.encode_batch([piece], add_special_tokens=False)[0].ids if piece else []

        ids: list[int] = []
        position = 0
        for special in self.pattern.finditer(text):  # the template's own: no message holds one now
            ids += plain_ids(text[position:special.start()])
            ids.append(self.special_ids[special.group(0)])
            position = special.end()
        return ids + plain_ids(text[position:])

    def _has_special(self, value, key: str = "") -> bool:
        if isinstance(value, str):
            return key != "role" and self.pattern.search(value) is not None
        if isinstance(value, dict):
            return any(self._has_special(v, k) for k, v in value.items())
        if isinstance(value, list):
            return any(self._has_special(v) for v in value)
        return False

    @staticmethod
    def _marker(value) -> str:
        """Private-use characters around a random nonce: found in no string of `value`, nor made of special text."""
        while True:
            marker = f"\ue000{secrets.token_hex(8)}\ue001"
            if not _contains(value, marker):
                return marker


def _contains(value, text: str) -> bool:
    if isinstance(value, str):
        return text in value
    if isinstance(value, dict):
        return any(_contains(v, text) for v in value.values())
    if isinstance(value, list):
        return any(_contains(v, text) for v in value)
    return False
