"""The experts of a mixture-of-experts layer in two grouped GEMMs (vLLM's `fused_moe`).

Each token goes to top_k experts. The (token, k) pairs are sorted by expert into row tiles of one
expert each (moe_align_block_size.py); the first GEMM multiplies every tile by its expert's stacked
gate/up weight (w13), SiLU-and-mul halves the result, the second GEMM multiplies by the expert's down
weight (w2) and scales each row by its router weight; the top_k rows of a token are then summed. An
expert's weights are read once per row tile, and experts without tokens not at all, so a decode step
reads about top_k experts' weights, not every expert's. No host sync: CUDA graphs capture it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.fused_moe_ref import MoELoRA, add_lora_gate_up, lora_down_delta
from kernels.lora_expand import lora_expand
from kernels.lora_shrink import lora_shrink
from kernels.moe_align_block_size import ExpertAlignment, moe_align_block_size
from kernels.silu_and_mul import silu_and_mul


@dataclass(frozen=True)
class MoELaunch:
    """Tile sizes of the two GEMMs; block_m is also the alignment's row tile. group_m row tiles run
    side by side over the same columns, so their (same or neighbouring) experts' weight tiles are
    read from L2."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3


def moe_launch_for(num_pairs: int, num_experts: int) -> MoELaunch:
    """Row tiles about as tall as an expert's share of the pairs: at decode a tile holds a token or
    two, and the kernel reads weights as wide and deep as it can; in prefill, square tiles reuse them."""
    pairs_per_expert = num_pairs / num_experts
    if pairs_per_expert <= 16:
        return MoELaunch(block_m=16, block_n=64, block_k=128, group_m=1, num_stages=4)
    if pairs_per_expert <= 64:
        return MoELaunch(block_m=32, block_n=64, block_k=128)
    return MoELaunch(block_m=64, block_n=128, block_k=64, num_stages=4)


@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, c_ptr, router_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
    n, num_pairs, num_tiles_m, stride_a, stride_b_expert, stride_b_row, stride_c,
    K: tl.constexpr, A_ROWS_PER_TOKEN: tl.constexpr, MUL_ROUTED_WEIGHT: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr,
):
    """c[pair] = b[expert] @ a[pair // A_ROWS_PER_TOKEN] (times the pair's router weight) for each pair
    of one row tile, whose expert expert_ids names; b is `[experts, n, K]`, row-major."""
    pid = tl.program_id(0)
    num_tiles_n = tl.cdiv(n, BLOCK_N)
    group = pid // (GROUP_M * num_tiles_n)
    first_m = group * GROUP_M
    group_rows = min(num_tiles_m - first_m, GROUP_M)
    tile_m = first_m + (pid % (GROUP_M * num_tiles_n)) % group_rows
    tile_n = (pid % (GROUP_M * num_tiles_n)) // group_rows
    if tile_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + tile_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pairs < num_pairs
    pairs = pairs.to(tl.int64)
    expert = tl.load(expert_ids_ptr + tile_m).to(tl.int64)
    cols = tile_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    # Columns past n wrap around (read, never stored), so the weight loads need no column mask.
    a_ptrs = a_ptr + (pairs // A_ROWS_PER_TOKEN)[:, None] * stride_a + ks[None, :]
    b_ptrs = b_ptr + expert * stride_b_expert + (cols % n)[None, :].to(tl.int64) * stride_b_row + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for step in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = ks < K - step * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None], other=0.0)
        acc += tl.dot(a, b, input_precision=INPUT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if MUL_ROUTED_WEIGHT:
        acc *= tl.load(router_weights_ptr + pairs, mask=row_mask, other=0.0).to(tl.float32)[:, None]
    c_ptrs = c_ptr + pairs[:, None] * stride_c + cols[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols < n)[None, :])


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, alignment: ExpertAlignment,
                  a_rows_per_token: int, router_weights: torch.Tensor | None, launch: MoELaunch) -> None:
    num_experts, n, k = b.shape
    assert a.stride(1) == 1 and b.stride(2) == 1 and c.stride(1) == 1 and a.shape[1] == k and c.shape[1] == n
    num_tiles_m = alignment.expert_ids.numel()
    grid = (num_tiles_m * triton.cdiv(n, launch.block_n),)
    _grouped_gemm_kernel[grid](
        a, b, c, router_weights if router_weights is not None else c, alignment.sorted_ids, alignment.expert_ids,
        alignment.num_padded, n, alignment.num_pairs, num_tiles_m, a.stride(0), b.stride(0), b.stride(1),
        c.stride(0), K=k, A_ROWS_PER_TOKEN=a_rows_per_token, MUL_ROUTED_WEIGHT=router_weights is not None,
        BLOCK_M=launch.block_m, BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, GROUP_M=launch.group_m,
        INPUT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32", num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )


def fused_moe(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, lora: MoELoRA | None = None, out: torch.Tensor | None = None,
              launch: MoELaunch | None = None) -> torch.Tensor:
    """Drop-in for `fused_moe_ref` on CUDA (or under TRITON_INTERPRET=1): hidden_states `[T, H]`, w13
    `[E, 2I, H]`, w2 `[E, H, I]`, topk_weights `[T, top_k]`, topk_ids `[T, top_k]` -> `[T, H]`. With
    `lora`, the batched LoRA kernels add each adapter pair's delta to its gate/up rows before the
    activation and to its down rows (times its router weight) before the sum."""
    num_tokens, hidden_size = hidden_states.shape
    num_experts, intermediate_size = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    assert w13.shape == (num_experts, 2 * intermediate_size, hidden_size) and topk_weights.shape == topk_ids.shape
    if out is None:
        out = torch.empty_like(hidden_states)
    if num_tokens == 0:
        return out
    num_pairs = num_tokens * top_k
    launch = launch or moe_launch_for(num_pairs, num_experts)
    alignment = moe_align_block_size(topk_ids, num_experts, launch.block_m)
    gate_up = torch.empty(num_pairs, 2 * intermediate_size, dtype=hidden_states.dtype, device=hidden_states.device)
    _grouped_gemm(hidden_states, w13, gate_up, alignment, top_k, None, launch)
    if lora is not None:
        add_lora_gate_up(hidden_states.repeat_interleave(top_k, dim=0), gate_up, lora, lora_shrink, lora_expand)
    activated = silu_and_mul(gate_up)
    down = torch.empty(num_tokens, top_k, hidden_size, dtype=hidden_states.dtype, device=hidden_states.device)
    pair_weights = topk_weights.contiguous().view(-1)
    _grouped_gemm(activated, w2, down.view(num_pairs, hidden_size), alignment, 1, pair_weights, launch)
    if lora is not None:
        delta = lora_down_delta(activated, hidden_size, lora, lora_shrink, lora_expand)
        down.view(num_pairs, hidden_size).add_(delta * pair_weights[:, None].to(delta.dtype))
    return torch.sum(down, dim=1, out=out)
