"""LoRA limits of an engine (vLLM's LoRAConfig), from EngineConfig's enable_lora options."""

from __future__ import annotations

from dataclasses import dataclass

from engine.sampling_params import check_field

# vLLM's allowed ranks: the slot buffers are padded to max_lora_rank, so it is one of a few sizes.
POSSIBLE_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


@dataclass(frozen=True)
class LoRAConfig:
    max_loras: int = 1  # adapters one step may use: the device slots
    max_lora_rank: int = 16  # every adapter's rank must be at most this
    max_cpu_loras: int | None = None  # adapters kept in host memory (LRU); default max_loras

    def __post_init__(self) -> None:
        check_field(isinstance(self.max_loras, int) and self.max_loras >= 1, "max_loras",
                    f"must be a positive integer, got {self.max_loras!r}")
        check_field(self.max_lora_rank in POSSIBLE_MAX_RANKS, "max_lora_rank",
                    f"must be one of {POSSIBLE_MAX_RANKS}, got {self.max_lora_rank!r}")
        if self.max_cpu_loras is None:
            object.__setattr__(self, "max_cpu_loras", self.max_loras)
        check_field(isinstance(self.max_cpu_loras, int) and self.max_cpu_loras >= self.max_loras, "max_cpu_loras",
                    f"must be an integer >= max_loras ({self.max_loras}), got {self.max_cpu_loras!r}")

    @classmethod
    def from_engine_config(cls, config) -> "LoRAConfig | None":
        """None when the engine runs without LoRA."""
        if not config.enable_lora:
            return None
        return cls(config.max_loras, config.max_lora_rank, config.max_cpu_loras)
