"""Tokenizing on the web side exactly as the engine does, from the ModelCard its replicas publish.

The web process must know a prompt's token count before anything is queued (prompt caps, quota
reservations, usage), without torch or transformers: the `tokenizers` library reads the engine's
tokenizer JSON, and the chat template renders in a Jinja sandbox, as transformers renders it.

Special tokens: a completion's text prompt is the caller's own raw model input (there is no other
party's turn in it to forge), so special strings in it are parsed, as vLLM and the engine do; chat
message content never produces a special token (engine.special_token_guard), only the template does.
"""
from __future__ import annotations

import asyncio
import time
import weakref
from functools import lru_cache

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from engine.service.protocol import ModelCard
from engine.special_token_guard import SpecialTokenGuard

CARD_TTL_S = 30.0  # how long a fetched card is trusted before it is read from Redis again


class PromptError(ValueError):
    """The prompt cannot be built (no tokenizer for text, a chat template that refused the messages)."""


class PromptTokenizer:
    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.tokenizer = Tokenizer.from_str(card.tokenizer_json) if card.tokenizer_json else None
        self.template = _compile(card.chat_template) if card.chat_template else None
        self.guard = SpecialTokenGuard(self.tokenizer) if self.tokenizer is not None else None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A completion prompt: special tokens added as the engine adds them (unless told not to: /tokenize)."""
        # encode_batch, not encode: it lets go of the GIL, so the event loop runs while a long prompt
        # is tokenized in the tokenizer pool (inference/tokenizing.py); `encode` holds it throughout.
        return self._require_tokenizer().encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """`tools` go to a template that knows them (inference/tools.py decides)."""
        if self.template is None:
            raise PromptError(f"model {self.card.model!r} has no chat template; use /v1/completions")
        self._require_tokenizer()

        def render(rendered_messages: list[dict], rendered_tools: list[dict] | None) -> str:
            try:
                return self.template.render(messages=rendered_messages, add_generation_prompt=add_generation_prompt,
                                            tools=rendered_tools, **self.card.special_tokens)
            except TemplateError as error:
                raise PromptError(f"the chat template refused the messages: {error}") from error

        return self.guard.encode_chat(messages, render, tools)

    def decode(self, token_ids: list[int]) -> str:
        return self._require_tokenizer().decode(token_ids, skip_special_tokens=False)

    def _require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise PromptError(f"model {self.card.model!r} runs without a tokenizer: send token ids")
        return self.tokenizer


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=16)
def _compile(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    return env.from_string(source)


class PromptTokenizerCache:
    """One PromptTokenizer per model, refreshed from Redis every CARD_TTL_S (a model may be redeployed)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[float, PromptTokenizer]] = {}
        # Per event loop: an asyncio.Lock belongs to one loop, and Celery threads each run their own.
        self.locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    async def get(self, client, model: str) -> PromptTokenizer | None:
        cached = self.entries.get(model)
        if cached and time.monotonic() - cached[0] < CARD_TTL_S:
            return cached[1]
        locks = self.locks.setdefault(asyncio.get_running_loop(), {})
        async with locks.setdefault(model, asyncio.Lock()):  # one fetch for a burst of calls
            cached = self.entries.get(model)
            if cached and time.monotonic() - cached[0] < CARD_TTL_S:
                return cached[1]
            return await self._refresh(client, model, cached)

    async def _refresh(self, client, model: str, cached) -> PromptTokenizer | None:
        card = await client.model_card(model)
        if card is None:
            return None
        if cached and cached[1].card.created_at == card.created_at:
            tokenizer = cached[1]
        else:  # parsing a tokenizer JSON takes up to a second: not on the event loop
            tokenizer = await asyncio.to_thread(PromptTokenizer, card)
        self.entries[model] = (time.monotonic(), tokenizer)
        return tokenizer
