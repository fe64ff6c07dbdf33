"""LoRA expand for a step of a few tokens whose shrink the base GEMM already computed for every slot:
out[t] += B[slot[t]] @ y[t, slot[t]'s block].

The batch-1 path of engine/lora/layers.py: the slots' A matrices are rows under the base weight, so one
GEMM gives the base output and every slot's shrink side by side. What is left is a GEMV per token
through its slot's B (a few hundred KB), which is all launch latency. lora_expand.py's tiled kernel
launches token tiles x row tiles x slices x slots programs and most exit at once (1,792 for a Llama
8B gate/up at one token); here a program owns `BLOCK_N` output rows of one token, whatever slice
they fall in, and reads the slot from the token itself (no sorted mapping), so a 28,672-row gate/up
is 112 programs. Tokens without an adapter exit at once and their rows stay bit-identical.
`y` is rounded to the adapter's dtype before the product, as PEFT's `lora_B(lora_A(x))` sees it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def per_token_block_n(max_rank: int) -> int:
    """Rows per program: a [BLOCK_N, rank] tile of B of about 1,024 elements. Small tiles, many programs:
    on an H200 at rank 16, 64 rows beat 128, 256 and 512 on each of Llama 8B's projections
    (`python -m engine.bench.lora_kernels --one-token`)."""
    return max(16, 1024 // triton.next_power_of_2(max_rank))


@triton.jit
def _lora_expand_per_token_kernel(
    y_ptr, lora_b_ptr, out_ptr, token_slots_ptr, slice_starts, out_features, stride_y, stride_b_slot,
    stride_b_row, stride_out,
    MAX_RANK: tl.constexpr, RANK_BLOCK: tl.constexpr, NUM_SLICES: tl.constexpr, BLOCK_N: tl.constexpr,
):
    token = tl.program_id(1)
    slot = tl.load(token_slots_ptr + token)
    if slot < 0:
        return
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < out_features
    slice_index = tl.zeros([BLOCK_N], tl.int32)
    for j in tl.static_range(1, NUM_SLICES):
        slice_index += (rows >= slice_starts[j]).to(tl.int32)
    ks = tl.arange(0, RANK_BLOCK)
    mask = row_mask[:, None] & (ks < MAX_RANK)[None, :]
    y_offsets = slot * (NUM_SLICES * MAX_RANK) + slice_index[:, None] * MAX_RANK + ks[None, :]
    y = tl.load(y_ptr + token.to(tl.int64) * stride_y + y_offsets, mask=mask, other=0.0)
    b_ptrs = lora_b_ptr + slot.to(tl.int64) * stride_b_slot + rows[:, None].to(tl.int64) * stride_b_row + ks[None, :]
    b = tl.load(b_ptrs, mask=mask, other=0.0)
    delta = tl.sum(y.to(b.dtype).to(tl.float32) * b.to(tl.float32), axis=1)
    out_ptrs = out_ptr + token.to(tl.int64) * stride_out + rows
    base = tl.load(out_ptrs, mask=row_mask, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=row_mask)


def lora_expand_per_token(y: torch.Tensor, lora_b: torch.Tensor, token_slots: torch.Tensor,
                          slice_starts: tuple[int, ...], out: torch.Tensor, block_n: int | None = None) -> torch.Tensor:
    """y `[T, num_slots * num_slices * max_rank]` (every slot's shrink); token_slots int32, its first T
    entries each a slot or -1; the rest as `lora_expand_ref(..., y_per_slot=True)`. No host sync."""
    num_tokens = y.shape[0]
    num_slots, out_features, max_rank = lora_b.shape
    num_slices = len(slice_starts) - 1
    assert y.shape[1] == num_slots * num_slices * max_rank and token_slots.numel() >= num_tokens
    assert out.shape == (num_tokens, out_features) and slice_starts[0] == 0 and slice_starts[-1] == out_features
    assert y.stride(1) == 1 and lora_b.stride(2) == 1 and out.stride(1) == 1
    if num_tokens == 0:
        return out
    block_n = block_n or per_token_block_n(max_rank)
    _lora_expand_per_token_kernel[(triton.cdiv(out_features, block_n), num_tokens)](
        y, lora_b, out, token_slots, tuple(slice_starts), out_features, y.stride(0), lora_b.stride(0),
        lora_b.stride(1), out.stride(0),
        MAX_RANK=max_rank, RANK_BLOCK=triton.next_power_of_2(max_rank), NUM_SLICES=num_slices, BLOCK_N=block_n,
        num_warps=4,
    )
    return out
