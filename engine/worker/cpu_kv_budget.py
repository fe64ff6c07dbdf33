"""How much host memory the CPU KV cache takes when no explicit budget is given.

A fixed default (it was 4 GiB) is both too much for a small model on a small machine (the kernel's
OOM killer took the engine under load) and too little for a large one. The cache only ever needs
`max_num_seqs` sequences of `max_model_len` tokens, so ask for that, capped by a share of the memory
the machine has free, and refuse to start if even one full-length sequence would not fit.
"""

from __future__ import annotations

import os

DEFAULT_MEMORY_FRACTION = 0.10  # each engine process (tests and benchmarks run several) holds it all, resident


def kv_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype_size: int) -> int:
    """A key and a value per layer and KV head."""
    return 2 * num_layers * num_kv_heads * head_dim * dtype_size


def cpu_kv_cache_bytes(bytes_per_token: int, block_size: int, max_num_seqs: int, max_model_len: int,
                       available_bytes: int, fraction: float = DEFAULT_MEMORY_FRACTION) -> int:
    """Bytes for the blocks that max_num_seqs full sequences need (plus the null block), at most
    `fraction` of `available_bytes`; ValueError when that share cannot hold one max_model_len sequence."""
    bytes_per_block = bytes_per_token * block_size
    blocks_per_seq = -(-max_model_len // block_size)
    wanted = max_num_seqs * blocks_per_seq + 1
    affordable = int(available_bytes * fraction) // bytes_per_block
    minimum = blocks_per_seq + 1
    if affordable < minimum:
        raise ValueError(
            f"the CPU KV cache may use {fraction:.0%} of the {available_bytes / 2**30:.2f} GiB available, "
            f"{affordable * bytes_per_block / 2**30:.2f} GiB, but one max_model_len={max_model_len} sequence "
            f"needs {minimum * bytes_per_block / 2**30:.2f} GiB: lower max_model_len, free memory, or set "
            f"kv_cache_memory_bytes (--kv-cache-memory-bytes) explicitly")
    return min(wanted, affordable) * bytes_per_block


def available_memory_bytes() -> int:
    """MemAvailable, or less when a cgroup (v2) limit leaves less room in this container."""
    available = _meminfo_available()
    limit, current = _read_int("/sys/fs/cgroup/memory.max"), _read_int("/sys/fs/cgroup/memory.current")
    if limit is not None and current is not None:
        available = min(available, max(limit - current, 0))
    return available


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _read_int(path: str) -> int | None:
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max" means no limit
