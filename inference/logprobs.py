"""Engine logprobs ({token_id: [logprob, rank, decoded]} per position) in OpenAI's two shapes."""
from __future__ import annotations


def _ranked(entry: dict, token_id: int, k: int) -> tuple[tuple[str, float], list[tuple[str, float]]]:
    """The chosen token's (text, logprob) and the top-k alternatives by rank."""
    chosen = entry.get(token_id) or entry.get(str(token_id))
    top = sorted((v for v in entry.values() if v[1] is not None and v[1] <= k), key=lambda v: v[1])
    return (chosen[2] or "", chosen[0]), [(v[2] or "", v[0]) for v in top]


def chat_logprobs(entries: list[dict], token_ids: list[int], k: int) -> list[dict]:
    """`choices[i].logprobs.content` items of chat completions."""
    content = []
    for entry, token_id in zip(entries, token_ids):
        (text, logprob), top = _ranked(entry, token_id, k)
        content.append({"token": text, "logprob": logprob, "bytes": list(text.encode()),
                        "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in top]})
    return content


class CompletionLogprobs:
    """Legacy completions' `logprobs` object for one choice, with running `text_offset`s."""

    def __init__(self, k: int, offset: int = 0) -> None:
        self.k, self.offset = k, offset
        self.body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}

    def add_prompt(self, token_texts: list[str], entries: list[dict | None] | None, token_ids: list[int]) -> dict:
        """Echoed prompt tokens; the first has no logprob (nothing predicts it)."""
        part = self._new_part()
        for position, (text, token_id) in enumerate(zip(token_texts, token_ids)):
            entry = entries[position] if entries else None
            if entry is None:
                self._append(part, text, None, None)
            else:
                (_, logprob), top = _ranked(entry, token_id, self.k)
                self._append(part, text, logprob, dict(top) | {text: logprob})
        return part

    def add(self, entries: list[dict], token_ids: list[int]) -> dict:
        """Generated tokens; returns just their part (for a stream chunk)."""
        part = self._new_part()
        for entry, token_id in zip(entries, token_ids):
            (text, logprob), top = _ranked(entry, token_id, self.k)
            self._append(part, text, logprob, dict(top) | {text: logprob})
        return part

    def _new_part(self) -> dict:
        return {name: [] for name in self.body}

    def _append(self, part: dict, text: str, logprob: float | None, top: dict | None) -> None:
        for target in (part, self.body):
            target["tokens"].append(text)
            target["token_logprobs"].append(logprob)
            target["top_logprobs"].append(top)
            target["text_offset"].append(self.offset)
        self.offset += len(text)
