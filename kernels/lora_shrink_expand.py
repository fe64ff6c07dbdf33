"""LoRA shrink and expand in one launch for steps of few tokens: out[t] += B[slot[t]] @ (A[slot[t]] @ x[t]).

At one token a decode step's LoRA work is tiny and its cost is launches: shrink, the clear of its
split-K output and expand are three per projection. Here each program owns a tile of output rows of
one slice for a tile of one slot's tokens, computes that slice's shrink for those tokens itself
(x_tile @ A_slice^T in float32 over the whole input width: A is only rank x in, and the programs of
one slice all read the same A, from L2 after the first) and adds B_rows @ y into `out` as
`lora_expand` does. Same grid and early exits as the two kernels it replaces (fixed by (T,
num_slots), so a CUDA graph replays it; tokens without an adapter are never visited), same results
as `lora_shrink_ref` followed by `lora_expand_ref`. The shrink is redone by every row tile, so the
two kernels win again once many tokens make it real work (see engine/lora/layers.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lora_expand import add_to_rows, slice_row_grid, slice_row_tile
from kernels.lora_mapping import LoRATokenMapping
from kernels.lora_shrink import slot_tile_tokens


@dataclass(frozen=True)
class ShrinkExpandLaunch:
    """Tile sizes of one fused launch; the rank is one tile (block_r = its next power of two)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4


def shrink_expand_launch_for(num_tokens: int, out_rows: int) -> ShrinkExpandLaunch:
    """Each program's time is mostly its read of the slice's A over the input width, the same for
    any row tile, so row tiles are as wide as keeps about a hundred programs busy: wide tiles mean
    fewer redundant A reads. 4096 rows -> 64-row tiles (64 programs), 2 x 14336 -> 256 (112)."""
    block_m = 16 if num_tokens <= 16 else 32
    block_n = 64 if out_rows <= 8192 else 128 if out_rows <= 16384 else 256
    return ShrinkExpandLaunch(block_m, block_n, block_k=256)


@triton.jit
def _lora_shrink_expand_kernel(
    x_ptr, lora_a_ptr, lora_b_ptr, out_ptr, sorted_token_ids_ptr, slot_starts_ptr, num_tokens_per_slot_ptr,
    slice_starts, max_slice_width, stride_x, stride_a_slot, stride_a_row, stride_b_slot, stride_b_row, stride_out,
    IN_FEATURES: tl.constexpr, MAX_RANK: tl.constexpr, NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    slot = tl.program_id(2)
    slice_index = tl.program_id(1)
    block_m, first_row, cols, col_mask, past_slice = slice_row_tile(slice_starts, max_slice_width, NUM_SLICES, BLOCK_N)
    count = tl.load(num_tokens_per_slot_ptr + slot)
    if (block_m * BLOCK_M >= count) | past_slice:
        return
    tokens, row_mask = slot_tile_tokens(sorted_token_ids_ptr, slot_starts_ptr, slot, block_m, count, BLOCK_M)
    ranks = tl.arange(0, BLOCK_R)
    rank_mask = ranks < MAX_RANK

    # Shrink: y = x_tile @ A[slot, slice's rank rows]^T, float32 over the whole input width.
    a_ptr = (lora_a_ptr + slot.to(tl.int64) * stride_a_slot
             + (slice_index * MAX_RANK + ranks)[None, :].to(tl.int64) * stride_a_row)
    y = tl.zeros([BLOCK_M, BLOCK_R], tl.float32)
    for k_step in range(0, tl.cdiv(IN_FEATURES, BLOCK_K)):
        ks = k_step * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < IN_FEATURES
        x = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        a = tl.load(a_ptr + ks[:, None], mask=k_mask[:, None] & rank_mask[None, :], other=0.0)
        y += tl.dot(x, a, input_precision=INPUT_PRECISION)

    # Expand: out rows += B[slot, rows] @ y, y rounded to the adapter's dtype first.
    b_ptr = lora_b_ptr + slot.to(tl.int64) * stride_b_slot + (first_row + cols)[None, :].to(tl.int64) * stride_b_row
    b = tl.load(b_ptr + ranks[:, None], mask=rank_mask[:, None] & col_mask[None, :], other=0.0)
    delta = tl.dot(y.to(b.dtype), b, input_precision=INPUT_PRECISION)
    add_to_rows(out_ptr, stride_out, tokens, row_mask, first_row, cols, col_mask, delta)


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, mapping: LoRATokenMapping,
                       slice_starts: tuple[int, ...], out: torch.Tensor,
                       launch: ShrinkExpandLaunch | None = None) -> torch.Tensor:
    """Drop-in for `lora_shrink_expand_ref` on CUDA (or under TRITON_INTERPRET=1); no host sync."""
    num_tokens, in_features = x.shape
    num_slots, out_features, max_rank = lora_b.shape
    num_slices = len(slice_starts) - 1
    assert num_tokens == mapping.num_tokens and num_slots == mapping.num_slots
    assert lora_a.shape == (num_slots, num_slices * max_rank, in_features)
    assert slice_starts[0] == 0 and slice_starts[-1] == out_features and out.shape == (num_tokens, out_features)
    assert x.stride(1) == 1 and lora_a.stride(2) == 1 and lora_b.stride(2) == 1 and out.stride(1) == 1
    if num_tokens == 0:
        return out
    launch = launch or shrink_expand_launch_for(num_tokens, out_features)
    grid, max_slice_width = slice_row_grid(num_tokens, slice_starts, num_slots, launch.block_m, launch.block_n)
    _lora_shrink_expand_kernel[grid](
        x, lora_a, lora_b, out, mapping.sorted_token_ids, mapping.slot_starts, mapping.num_tokens_per_slot,
        tuple(slice_starts), max_slice_width, x.stride(0), lora_a.stride(0), lora_a.stride(1), lora_b.stride(0),
        lora_b.stride(1), out.stride(0), IN_FEATURES=in_features, MAX_RANK=max_rank, NUM_SLICES=num_slices,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
        BLOCK_R=max(16, triton.next_power_of_2(max_rank)),
        INPUT_PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32", num_warps=launch.num_warps,
    )
    return out
