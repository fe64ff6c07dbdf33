"""Every engine option in one validated dataclass, with vLLM's names."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from engine.lora.config import LoRAConfig
from engine.spec_decode.config import SpeculativeConfig

from engine.sampling_params import check_field

BUNDLED_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
_DTYPES = ("auto", "float32", "float16", "bfloat16", "half", "float", "bf16", "fp16", "fp32")
_DEVICES = ("auto", "cpu", "cuda")


@dataclass
class EngineConfig:
    model: str = BUNDLED_MODEL
    tokenizer: str | None = None
    revision: str | None = None  # of a model named by its Hugging Face Hub id (a branch, tag or commit)
    dtype: str = "auto"  # auto: float32 on CPU, the checkpoint's dtype (or bfloat16) on CUDA
    device: str = "auto"
    max_model_len: int | None = None  # default: the model's context length
    max_num_seqs: int | None = None  # default: 1024 on CUDA (vLLM v1's on this class of card), 256 on the CPU
    max_num_batched_tokens: int | None = None  # default: 16384 on CUDA, 8192 on the CPU; longer prompts are chunked
    long_prefill_token_threshold: int | None = None  # chunk size of a long prefill while others wait
    block_size: int = 16
    gpu_memory_utilization: float = 0.9
    kv_cache_memory_bytes: int | None = None  # CPU default: seqs x len, <= 10% of free memory
    num_gpu_blocks_override: int | None = None
    enable_prefix_caching: bool = True
    seed: int = 0
    enforce_eager: bool = False  # no CUDA graphs for decode steps (always so on the CPU)
    # One KV cache group for every layer even when global and sliding-window layers mix (Gemma 2/3):
    # the sliding layers then keep every block too (vLLM's flag; a baseline for the hybrid manager).
    disable_hybrid_kv_cache_manager: bool = False
    trust_remote_code: bool = False  # accepted for vLLM compatibility; no remote code ever runs
    skip_tokenizer_init: bool = False  # prompts must be token ids; outputs carry no text
    tensor_parallel_size: int = 1  # ranks (processes, one GPU each) that split every layer
    stream_interval: int = 1  # streamed (DELTA) outputs every N tokens (and the first, and the last)
    # Plan step N+1 while the device runs step N (default: on with CUDA); greedy outputs are the same.
    async_scheduling: bool | None = None
    # {"method": "ngram", "num_speculative_tokens": k, ...} or {"model": <draft>, "num_speculative_tokens": k}
    # (engine/spec_decode/config.py); async scheduling is off while it is on (the next step depends on
    # how many proposals were accepted).
    speculative_config: dict | None = None
    # LoRA adapters chosen per request (engine/lora/): max_loras of them per step in device slots, up
    # to max_cpu_loras (default max_loras) in host memory, ranks up to max_lora_rank.
    enable_lora: bool = False
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None

    def __post_init__(self) -> None:
        self.dtype = str(self.dtype).replace("torch.", "")
        check_field(self.dtype in _DTYPES, "dtype", f"must be one of {_DTYPES}, got {self.dtype!r}")
        check_field(self.device in _DEVICES, "device", f"must be one of {_DEVICES}, got {self.device!r}")
        check_field(isinstance(self.model, str) and self.model, "model", "must be a path, a name or dummy:<preset>")
        check_field(self.block_size in (1, 2, 4, 8, 16, 32, 64, 128), "block_size",
               f"must be a power of two up to 128, got {self.block_size}")
        check_field(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization}")
        for name in ("max_model_len", "max_num_batched_tokens", "long_prefill_token_threshold",
                     "kv_cache_memory_bytes", "num_gpu_blocks_override"):
            value = getattr(self, name)
            check_field(value is None or (isinstance(value, int) and value > 0), name,
                   f"must be a positive integer, got {value!r}")
        check_field(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size > 0,
                    "tensor_parallel_size", f"must be a positive integer, got {self.tensor_parallel_size!r}")
        check_field(isinstance(self.stream_interval, int) and self.stream_interval > 0, "stream_interval",
                    f"must be a positive integer, got {self.stream_interval!r}")
        check_field(self.max_num_seqs is None or (isinstance(self.max_num_seqs, int) and self.max_num_seqs > 0),
                    "max_num_seqs", f"must be a positive integer, got {self.max_num_seqs!r}")
        check_field(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2,
               "num_gpu_blocks_override", "must be at least 2")
        speculative = SpeculativeConfig.from_dict(self.speculative_config)  # raises ValueError naming the field
        check_field(speculative is None or not speculative.uses_draft_model or self.tensor_parallel_size == 1,
                    "speculative_config", "a draft model runs with tensor_parallel_size=1 only")
        LoRAConfig(self.max_loras, self.max_lora_rank, self.max_cpu_loras)  # the same

    def with_device_defaults(self, on_cuda: bool) -> "EngineConfig":
        """The options left to the device filled in: a GPU runs far larger batches than a CPU."""
        return replace(self, max_num_seqs=self.max_num_seqs or (1024 if on_cuda else 256),
                       max_num_batched_tokens=self.max_num_batched_tokens or (16384 if on_cuda else 8192),
                       async_scheduling=on_cuda if self.async_scheduling is None else self.async_scheduling)

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise TypeError(f"unknown engine option(s): {', '.join(unknown)}")
        return cls(**kwargs)


@dataclass
class SchedulerConfig:
    """The scheduler's limits, resolved once the model's context length is known."""

    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    long_prefill_token_threshold: int

    @classmethod
    def resolve(cls, config: EngineConfig, model_max_len: int) -> "SchedulerConfig":
        max_model_len = config.max_model_len or model_max_len
        if max_model_len > model_max_len:
            raise ValueError(f"max_model_len={max_model_len} exceeds the model's context length {model_max_len}")
        batched = config.max_num_batched_tokens
        threshold = config.long_prefill_token_threshold or max(config.block_size, batched // 4)
        return cls(max_model_len, config.max_num_seqs, batched, min(threshold, batched))

