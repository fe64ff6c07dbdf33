"""`speculative_config`, with vLLM's names: {"method": "ngram", "num_speculative_tokens": k,
"prompt_lookup_min": a, "prompt_lookup_max": b}.

Pure Python (the config is validated where the engine options are). A draft model
({"model": ..., "num_speculative_tokens": k}) is refused with a clear message until it is built.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_SPECULATIVE_TOKENS = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 2  # the shortest suffix matched against the request's earlier tokens
    prompt_lookup_max: int = 4  # the longest (tried first: a longer match predicts better)

    @classmethod
    def from_dict(cls, value: dict | None) -> "SpeculativeConfig | None":
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be an object (a dict, or JSON on the command line)")
        if "model" in value and value.get("method", "draft_model") != "ngram":
            raise ValueError("speculative_config: draft-model speculation is not available yet; use "
                             '{"method": "ngram", "num_speculative_tokens": k}')
        known = {"method", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown field(s): {', '.join(unknown)}")
        value = dict(value)
        if "prompt_lookup_max" in value and "prompt_lookup_min" not in value:
            value["prompt_lookup_min"] = min(cls.prompt_lookup_min, value["prompt_lookup_max"])
        if "prompt_lookup_min" in value and "prompt_lookup_max" not in value:
            value["prompt_lookup_max"] = max(cls.prompt_lookup_max, value["prompt_lookup_min"])
        config = cls(**value)
        config._validate()
        return config

    def _validate(self) -> None:
        if self.method != "ngram":
            raise ValueError(f"speculative_config.method must be 'ngram', got {self.method!r}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise ValueError(f"speculative_config.num_speculative_tokens must be in [1, {MAX_SPECULATIVE_TOKENS}]")
        low, high = self.prompt_lookup_min, self.prompt_lookup_max
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (low, high)) or not 1 <= low <= high:
            raise ValueError("speculative_config needs 1 <= prompt_lookup_min <= prompt_lookup_max")
