"""Sampling parameters with vLLM's names and validation.

Pure Python (no torch) so the web side can validate a request before it reaches an engine.
Every invalid value raises `ValueError` naming the field. The bounds are what the engine can
represent (a value past them used to raise deep in the sampler and fail the whole batch) and what
keeps one request's footprint small (stop strings are copied into every prompt's engine request).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace

from engine.structured_outputs.params import StructuredOutputsParams

MAX_N = 256  # completions per prompt
MAX_INT32 = 2**31 - 1  # counts and token ids: what an int32 tensor holds
SEED_RANGE = (-(2**63), 2**63 - 1)  # torch.Generator.manual_seed takes int64 (plus n for the children)
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 1024
MAX_STOP_TOKEN_IDS = 1024


class RequestOutputKind(enum.Enum):
    """What `LLMEngine.step()` reports for a request: all text so far, only the new text, or
    nothing until it finishes (what `LLM.generate` uses)."""

    CUMULATIVE = 0
    DELTA = 1
    FINAL_ONLY = 2


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k filtering
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    detokenize: bool = True
    output_kind: RequestOutputKind = RequestOutputKind.CUMULATIVE
    # A grammar the output must follow (JSON Schema, regex, choice, Lark/GBNF): engine/structured_outputs.
    structured_outputs: StructuredOutputsParams | None = None
    # Filled by the engine from the tokenizer/model: EOS and extra stop ids.
    all_stop_token_ids: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        self.structured_outputs = StructuredOutputsParams.coerce(self.structured_outputs)  # the wire sends a dict
        self._validate()

    def _validate(self) -> None:
        check_field(_is_count(self.n, 1, MAX_N), "n", f"must be an integer in [1, {MAX_N}], got {self.n!r}")
        check_field(_is_finite(self.temperature) and self.temperature >= 0, "temperature",
                    f"must be a finite number >= 0, got {self.temperature!r}")
        check_field(_is_finite(self.top_p) and 0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p!r}")
        check_field(_is_count(self.top_k, 0, MAX_INT32), "top_k",
                    f"must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        check_field(_is_finite(self.min_p) and 0 <= self.min_p <= 1, "min_p", f"must be in [0, 1], got {self.min_p!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            check_field(_is_finite(value) and -2 <= value <= 2, name, f"must be in [-2, 2], got {value!r}")
        check_field(_is_finite(self.repetition_penalty) and self.repetition_penalty > 0, "repetition_penalty",
                    f"must be a finite number > 0, got {self.repetition_penalty!r}")
        check_field(self.seed is None or _is_count(self.seed, *SEED_RANGE), "seed",
                    f"must be an integer in [{SEED_RANGE[0]}, {SEED_RANGE[1]}], got {self.seed!r}")
        check_field(all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings")
        check_field(len(self.stop) <= MAX_STOP_STRINGS, "stop", f"may hold at most {MAX_STOP_STRINGS} strings, "
                    f"got {len(self.stop)}")
        check_field(all(len(s) <= MAX_STOP_STRING_CHARS and _is_utf8(s) for s in self.stop), "stop",
                    f"strings must be valid text of at most {MAX_STOP_STRING_CHARS} characters")
        check_field(all(_is_count(t, 0, MAX_INT32) for t in self.stop_token_ids), "stop_token_ids",
                    f"must be integers in [0, {MAX_INT32}]")
        check_field(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
                    f"may hold at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        check_field(self.max_tokens is None or _is_count(self.max_tokens, 0, MAX_INT32), "max_tokens",
                    f"must be an integer in [0, {MAX_INT32}], got {self.max_tokens!r}")
        # max_tokens=0 scores the prompt (prefill only); without prompt_logprobs it would return nothing.
        check_field(self.max_tokens != 0 or self.prompt_logprobs is not None, "max_tokens",
                    "may be 0 only with prompt_logprobs (to score the prompt)")
        check_field(_is_count(self.min_tokens, 0, MAX_INT32), "min_tokens",
                    f"must be an integer in [0, {MAX_INT32}], got {self.min_tokens!r}")
        check_field(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
                    f"must be <= max_tokens={self.max_tokens}, got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            # The engine bounds them by the vocabulary (full-vocabulary logprobs are a use); the API by 20.
            check_field(value is None or _is_count(value, 0, MAX_INT32), name,
                        f"must be an integer in [0, {MAX_INT32}], got {value!r}")
        check_field(isinstance(self.output_kind, RequestOutputKind), "output_kind", "must be a RequestOutputKind")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def needs_penalties(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1.0

    def clone(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def _is_finite(value) -> bool:
    """A real number that is not NaN or infinite (an int too large for a float is refused as well)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _is_count(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_utf8(text: str) -> bool:
    """False for lone surrogates, which no wire format can carry."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_field(ok: bool, field_name: str, message: str) -> None:
    """Raise ValueError naming the field: the one error shape of every option and parameter."""
    if not ok:
        raise ValueError(f"{field_name} {message}")
