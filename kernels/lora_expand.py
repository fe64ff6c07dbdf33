"""LoRA expand for a batch of tokens that each use their own adapter: out[t] += B[slot[t]] @ y[t].

The second half of a LoRA delta (Punica's SGMV expand, vLLM v1's `lora_expand`): shrink's float32
output back up to the projection's width, added in place to the base layer's output. A merged
projection (q/k/v, gate/up) has one rank block of `y` per slice; output rows in slice j read block j.
Grid: (token tiles x row tiles of the widest slice, slice, slot), fixed by (T, num_slots) for CUDA
graphs; programs past their slot's token count or their slice's width exit at once, and tokens
without an adapter are never visited (their rows stay bit-identical).
`y` is rounded to the adapter's dtype before the product, as PEFT's `lora_B(lora_A(x))` sees it.
With `y_per_slot`, `y` holds every slot's shrink side by side (the base GEMM computed them: see
engine/lora/layers.py), a token reads its own slot's, and lora_expand_per_token.py's kernel runs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lora_expand_per_token import lora_expand_per_token
from kernels.lora_mapping import LoRATokenMapping
from kernels.lora_shrink import slot_tile_tokens


@dataclass(frozen=True)
class ExpandLaunch:
    """Tile sizes of one expand launch (block_k covers the rank, looping when it is larger)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4


def expand_launch_for(num_tokens: int, max_rank: int) -> ExpandLaunch:
    block_m = 16 if num_tokens <= 16 else 32 if num_tokens <= 128 else 64
    block_k = min(64, max(16, triton.next_power_of_2(max_rank)))
    return ExpandLaunch(block_m, 128, block_k)


@triton.jit
def _slice_rows(slice_starts, slice_index, NUM_SLICES: tl.constexpr):
    """(first row, row count) of slice `slice_index`; the tuple is indexed only by constants."""
    first = 0
    end = 0
    for j in tl.static_range(NUM_SLICES):
        first = tl.where(slice_index == j, slice_starts[j], first)
        end = tl.where(slice_index == j, slice_starts[j + 1], end)
    return first, end - first


@triton.jit
def _lora_expand_kernel(
    y_ptr, lora_b_ptr, out_ptr, sorted_token_ids_ptr, slot_starts_ptr, num_tokens_per_slot_ptr, slice_starts,
    max_slice_width, stride_y, stride_b_slot, stride_b_row, stride_out,
    MAX_RANK: tl.constexpr, NUM_SLICES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
):
    slot = tl.program_id(2)
    slice_index = tl.program_id(1)
    num_n_blocks = tl.cdiv(max_slice_width, BLOCK_N)
    block_m = tl.program_id(0) // num_n_blocks
    block_n = tl.program_id(0) % num_n_blocks
    first_row, width = _slice_rows(slice_starts, slice_index, NUM_SLICES)
    count = tl.load(num_tokens_per_slot_ptr + slot)
    if (block_m * BLOCK_M >= count) | (block_n * BLOCK_N >= width):
        return
    tokens, row_mask = slot_tile_tokens(sorted_token_ids_ptr, slot_starts_ptr, slot, block_m, count, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < width

    y_block_ptr = y_ptr + tokens[:, None] * stride_y + slice_index * MAX_RANK
    b_ptr = lora_b_ptr + slot.to(tl.int64) * stride_b_slot + (first_row + cols)[None, :].to(tl.int64) * stride_b_row
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_step in range(0, tl.cdiv(MAX_RANK, BLOCK_K)):
        ks = k_step * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < MAX_RANK
        y = tl.load(y_block_ptr + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptr + ks[:, None], mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(y.to(b.dtype), b, input_precision=INPUT_PRECISION)

    out_ptrs = out_ptr + tokens[:, None] * stride_out + first_row + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    base = tl.load(out_ptrs, mask=out_mask, other=0.0)
    tl.store(out_ptrs, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=out_mask)


def lora_expand(y: torch.Tensor, lora_b: torch.Tensor, mapping: LoRATokenMapping, slice_starts: tuple[int, ...],
                out: torch.Tensor, launch: ExpandLaunch | None = None, y_per_slot: bool = False) -> torch.Tensor:
    """Drop-in for `lora_expand_ref` on CUDA (or under TRITON_INTERPRET=1); no host sync."""
    if y_per_slot:
        assert y.shape[0] == mapping.num_tokens
        return lora_expand_per_token(y, lora_b, mapping.token_slots, slice_starts, out)
    num_tokens = y.shape[0]
    num_slots, out_features, max_rank = lora_b.shape
    num_slices = len(slice_starts) - 1
    rank_width = num_slices * max_rank
    assert num_tokens == mapping.num_tokens and num_slots == mapping.num_slots
    assert slice_starts[0] == 0 and slice_starts[-1] == out_features
    assert y.shape[1] == rank_width and y.dtype == torch.float32
    assert out.shape == (num_tokens, out_features)
    assert y.stride(1) == 1 and lora_b.stride(2) == 1 and out.stride(1) == 1
    if num_tokens == 0:
        return out
    launch = launch or expand_launch_for(num_tokens, max_rank)
    max_slice_width = max(end - start for start, end in zip(slice_starts, slice_starts[1:]))
    grid = (triton.cdiv(num_tokens, launch.block_m) * triton.cdiv(max_slice_width, launch.block_n), num_slices,
            num_slots)
    _lora_expand_kernel[grid](
        y, lora_b, out, mapping.sorted_token_ids, mapping.slot_starts, mapping.num_tokens_per_slot,
        tuple(slice_starts), max_slice_width, y.stride(0), lora_b.stride(0),
        lora_b.stride(1), out.stride(0),
        MAX_RANK=max_rank, NUM_SLICES=num_slices, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k, INPUT_PRECISION="ieee" if lora_b.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
    )
    return out
