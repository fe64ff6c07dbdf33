"""`speculative_config`, with vLLM's names: {"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_min": a, "prompt_lookup_max": b}, or {"model": <draft>, "num_speculative_tokens": k}
(method "draft_model", implied by `model`) for a draft model that shares the target's vocabulary.

Pure Python (the config is validated where the engine options are); the draft's vocabulary and
context length are checked when it is loaded (engine/spec_decode/draft_model.py).
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 16
METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 2  # ngram: the shortest suffix matched against the request's earlier tokens
    prompt_lookup_max: int = 4  # ngram: the longest (tried first: a longer match predicts better)
    model: str | None = None  # draft_model: a path, a name or dummy:<preset>, as the engine's `model`

    @property
    def uses_draft_model(self) -> bool:
        return self.method == "draft_model"

    @classmethod
    def from_dict(cls, value: dict | None) -> "SpeculativeConfig | None":
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be an object (a dict, or JSON on the command line)")
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max", "model"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s): {', '.join(unknown)}")
        value = dict(value)
        if "model" in value:
            value.setdefault("method", "draft_model")
        if "prompt_lookup_max" in value and "prompt_lookup_min" not in value:
            value["prompt_lookup_min"] = min(cls.prompt_lookup_min, value["prompt_lookup_max"])
        if "prompt_lookup_min" in value and "prompt_lookup_max" not in value:
            value["prompt_lookup_max"] = max(cls.prompt_lookup_max, value["prompt_lookup_min"])
        config = cls(**value)
        config._validate()
        return config

    def _validate(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config.method must be one of {METHODS}, got {self.method!r}")
        if self.uses_draft_model != (self.model is not None):
            raise ValueError('speculative_config: a draft model needs {"model": <draft>} (method "draft_model"), '
                             'and "model" goes with no other method')
        if self.model is not None and not (isinstance(self.model, str) and self.model):
            raise ValueError("speculative_config.model must be a path, a name or dummy:<preset>")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}]")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (low, high)) or not 1 <= low <= high:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max")
