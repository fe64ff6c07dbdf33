"""LoRA shrink for a batch of tokens that each use their own adapter: out[t] = A[slot[t]] @ x[t].

The first half of a LoRA delta (Punica's SGMV shrink, vLLM v1's `lora_shrink`): x `[T, in]` down to
the rank, for every slice of a merged projection at once (their A matrices are stacked along the
rank axis). The grid is fixed by (T, num_slots) so a CUDA graph can replay it: axis 2 is the slot
(plus one group for tokens without an adapter, which only get their zero row), and a program past
its slot's token count exits at once. `in_features` is split over SPLIT_K programs that add into
the float32 output, so even one token spreads over enough programs to read A at full bandwidth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.lora_mapping import LoRATokenMapping


@dataclass(frozen=True)
class ShrinkLaunch:
    """Tile sizes of one shrink launch; split_k > 1 zeroes `out` first and adds partial sums atomically."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4


def shrink_launch_for(num_tokens: int, rank_width: int, in_features: int) -> ShrinkLaunch:
    """Token tiles about as tall as a slot's share of the step; K split so that each program reads
    about two K tiles (at most 16 splits): with a rank of 16 there are few output tiles to spread."""
    block_m = 16 if num_tokens <= 16 else 32 if num_tokens <= 128 else 64
    block_n = min(64, max(16, triton.next_power_of_2(rank_width)))
    block_k = 256 if block_m <= 32 else 128
    split_k = max(1, min(16, triton.cdiv(in_features, 2 * block_k)))
    return ShrinkLaunch(block_m, block_n, block_k, split_k)


@triton.jit
def slot_tile_tokens(sorted_token_ids_ptr, slot_starts_ptr, slot, block_m, count, BLOCK_M: tl.constexpr):
    """Batch indices (int64) of the tokens in tile `block_m` of `slot`'s `count` tokens, and which
    of the BLOCK_M rows hold one. Shared with the expand kernel."""
    rows = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < count
    tokens = tl.load(sorted_token_ids_ptr + tl.load(slot_starts_ptr + slot) + rows, mask=row_mask, other=0)
    return tokens.to(tl.int64), row_mask


@triton.jit
def _lora_shrink_kernel(
    x_ptr, lora_a_ptr, out_ptr, sorted_token_ids_ptr, slot_starts_ptr, num_tokens_per_slot_ptr,
    rank_width, stride_x, stride_a_slot, stride_a_row, stride_out,
    IN_FEATURES: tl.constexpr, NUM_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    slot = tl.program_id(2)
    split = tl.program_id(1)
    num_n_blocks = tl.cdiv(rank_width, BLOCK_N)
    block_m = tl.program_id(0) // num_n_blocks
    block_n = tl.program_id(0) % num_n_blocks
    count = tl.load(num_tokens_per_slot_ptr + slot)
    if block_m * BLOCK_M >= count:
        return
    tokens, row_mask = slot_tile_tokens(sorted_token_ids_ptr, slot_starts_ptr, slot, block_m, count, BLOCK_M)
    cols = block_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < rank_width
    out_ptrs = out_ptr + tokens[:, None] * stride_out + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]

    if slot == NUM_SLOTS:  # the tokens without an adapter: a zero row (already there when split)
        if SPLIT_K == 1:
            tl.store(out_ptrs, tl.zeros([BLOCK_M, BLOCK_N], tl.float32), mask=out_mask)
        return

    a_ptr = lora_a_ptr + slot.to(tl.int64) * stride_a_slot
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k_step in range(0, tl.cdiv(IN_FEATURES, BLOCK_K * SPLIT_K)):
        ks = (k_step * SPLIT_K + split) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_mask = ks < IN_FEATURES
        x = tl.load(x_ptr + tokens[:, None] * stride_x + ks[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0)
        a = tl.load(a_ptr + cols[None, :] * stride_a_row + ks[:, None], mask=k_mask[:, None] & col_mask[None, :],
                    other=0.0)
        acc += tl.dot(x, a, input_precision=INPUT_PRECISION)
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc, mask=out_mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=out_mask)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, mapping: LoRATokenMapping, out: torch.Tensor,
                launch: ShrinkLaunch | None = None) -> torch.Tensor:
    """Drop-in for `lora_shrink_ref` on CUDA (or under TRITON_INTERPRET=1); no host sync.
    With split_k > 1 the float32 sums are added in no fixed order (last-bit differences between runs)."""
    num_tokens, in_features = x.shape
    num_slots, rank_width, _ = lora_a.shape
    assert num_tokens == mapping.num_tokens and num_slots == mapping.num_slots
    assert out.shape == (num_tokens, rank_width) and out.dtype == torch.float32
    assert x.stride(1) == 1 and lora_a.stride(2) == 1 and out.stride(1) == 1
    if num_tokens == 0:
        return out
    launch = launch or shrink_launch_for(num_tokens, rank_width, in_features)
    if launch.split_k > 1:
        out.zero_()
    grid = (triton.cdiv(num_tokens, launch.block_m) * triton.cdiv(rank_width, launch.block_n), launch.split_k,
            num_slots + 1)
    _lora_shrink_kernel[grid](
        x, lora_a, out, mapping.sorted_token_ids, mapping.slot_starts, mapping.num_tokens_per_slot,
        rank_width, x.stride(0), lora_a.stride(0), lora_a.stride(1), out.stride(0), IN_FEATURES=in_features,
        NUM_SLOTS=num_slots, BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k,
        SPLIT_K=launch.split_k, INPUT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        num_warps=launch.num_warps,
    )
    return out
