"""Synthetic benchmark requests, as vLLM's random dataset: random token ids, lengths from ranges."""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LengthRange:
    low: int
    high: int

    @classmethod
    def parse(cls, text: str) -> "LengthRange":
        """'128' or '16-256' (inclusive)."""
        try:
            low, _, high = text.partition("-")
            result = cls(int(low), int(high or low))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected N or LOW-HIGH, got {text!r}") from None
        if not 1 <= result.low <= result.high:
            raise argparse.ArgumentTypeError(f"need 1 <= LOW <= HIGH, got {text!r}")
        return result

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.low, self.high)

    def __str__(self) -> str:
        return str(self.low) if self.low == self.high else f"{self.low}-{self.high}"


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    max_tokens: int


def make_workload(num_prompts: int, input_len: LengthRange, output_len: LengthRange, vocab_size: int,
                  seed: int) -> list[BenchRequest]:
    """Token ids avoid the lowest ids, where tokenizers keep their special tokens."""
    rng = random.Random(seed)
    first_id = min(1000, vocab_size // 2)
    return [BenchRequest([rng.randrange(first_id, vocab_size) for _ in range(input_len.sample(rng))],
                         output_len.sample(rng)) for _ in range(num_prompts)]


def useful_length(token_ids: list[int], max_tokens: int, eos_token_ids: set[int]) -> int:
    """Tokens a user gets: up to and including the first EOS, at most max_tokens."""
    for i, token_id in enumerate(token_ids[:max_tokens]):
        if token_id in eos_token_ids:
            return i + 1
    return min(len(token_ids), max_tokens)
