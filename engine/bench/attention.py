"""Micro-benchmark of paged decode attention: achieved bandwidth against the card's copy bandwidth.

Bandwidth counts the bytes the kernel must read at least once (every sequence's K and V, plus
queries and outputs), divided by its time; the copy figure is a plain device-to-device copy of a
large buffer measured in the same run.
"""

from __future__ import annotations

import torch

from kernels.paged_attention_ref import paged_decode_attention as reference_kernel
from kernels.paged_decode_attention import paged_decode_attention as triton_kernel


def _time_ms(fn, iters: int) -> float:
    if not torch.cuda.is_available():
        import time

        fn()
        started = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - started) * 1000 / iters
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def run_attention_bench(batch: int, context: int, num_heads: int, num_kv_heads: int, head_dim: int,
                        block_size: int, dtype: torch.dtype, iters: int) -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    blocks_per_seq = -(-context // block_size)
    num_blocks = batch * blocks_per_seq + 1
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, device=device, dtype=dtype)
    value_cache = torch.randn(shape, device=device, dtype=dtype)
    block_tables = (torch.randperm(num_blocks - 1, device=device)[: batch * blocks_per_seq] + 1).view(batch, -1)
    seq_lens = torch.full((batch,), context, device=device, dtype=torch.long)
    query = torch.randn(batch, num_heads, head_dim, device=device, dtype=dtype)
    scale = head_dim ** -0.5
    out = torch.empty_like(query)

    expected = reference_kernel(query, key_cache, value_cache, block_tables, seq_lens, scale)
    # max_seq_len given, as the engine gives it: otherwise each call waits for the device to read it.
    triton_kernel(query, key_cache, value_cache, block_tables, seq_lens, scale, out=out, max_seq_len=context)
    max_error = (out.float() - expected.float()).abs().max().item()

    bytes_read = 2 * batch * context * num_kv_heads * head_dim * key_cache.element_size() + 2 * query.numel() * query.element_size()
    triton_ms = _time_ms(lambda: triton_kernel(query, key_cache, value_cache, block_tables, seq_lens, scale, out=out,
                                               max_seq_len=context), iters)
    reference_ms = _time_ms(lambda: reference_kernel(query, key_cache, value_cache, block_tables, seq_lens, scale), iters)
    source = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    copy_ms = _time_ms(lambda: target.copy_(source), iters)
    copy_bandwidth = 2 * source.numel() / (copy_ms / 1000)  # read + write
    triton_bandwidth = bytes_read / (triton_ms / 1000)
    return {"triton_ms": triton_ms, "reference_ms": reference_ms, "max_abs_error_vs_reference": max_error,
            "triton_GBps": triton_bandwidth / 1e9, "copy_GBps": copy_bandwidth / 1e9,
            "fraction_of_copy_bandwidth": triton_bandwidth / copy_bandwidth,
            "speedup_vs_reference": reference_ms / triton_ms}
