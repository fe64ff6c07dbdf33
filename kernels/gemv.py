"""One token through a linear layer: y = W x (+ b), the whole of batch-1 decoding's matrix work.

At one token a linear layer is a read of its weight, so its time is the weight's bytes over the
memory bandwidth. cuBLAS runs these shapes as GEMMs with split-K, plus a reduce kernel for the
split ones; on an H200 it reads Llama 8B's q/k/v and o weights at ~3.1 TB/s in the model. Here each
program owns `BLOCK_N` output rows and streams their whole width in `BLOCK_K` steps, accumulating
in float32, so there is no reduce and every byte of W is read once, in order. The width is a
compile-time constant (a model has a handful), so the loop's trip count is known.
The reference is `F.linear` (the CPU path, and what every other shape runs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.silu_and_mul import gated_activation


@dataclass(frozen=True)
class GemvLaunch:
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


def gemv_launch_for(out_features: int, in_features: int) -> GemvLaunch:
    """A [BLOCK_N, BLOCK_K] tile wide in K (long contiguous loads) and a few rows high: 4 rows at
    K >= 1,024, 8 for layers of at most 5,120 outputs. From `python -m engine.bench.gemv --sweep` on an
    H200: Llama 8B's o and down (4,096 outputs; 4,224 with LoRA's slot rows under them) ran 10.1 /
    28.6 us with 8 rows against 11.1 / 33.2 us with 4; q/k/v (6,144), gate/up and the LM head were
    best or within noise of best with 4."""
    block_k = min(1024, triton.next_power_of_2(in_features))
    block_n = max(1, min(16, 4096 // block_k)) * (2 if out_features <= 5120 else 1)
    return GemvLaunch(block_n, block_k)


@triton.jit
def _gemv_kernel(w_ptr, x_ptr, bias_ptr, y_ptr, N, stride_w, K: tl.constexpr,
                 HAS_BIAS: tl.constexpr, EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SILU_GATED: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_w
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_mask = ks < K
        if EVEN_N and EVEN_K:
            w = tl.load(w_rows + ks[None, :])
        else:
            w = tl.load(w_rows + ks[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if SILU_GATED:  # x is the MLP's gate/up projection: its activation, rounded as silu_and_mul rounds it
            x = gated_activation(x_ptr, ks, k_mask, K, False).to(x_ptr.dtype.element_ty)
        elif EVEN_K:
            x = tl.load(x_ptr + ks)
        else:
            x = tl.load(x_ptr + ks, mask=k_mask, other=0.0)
        acc += w.to(tl.float32) * x[None, :].to(tl.float32)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         launch: GemvLaunch | None = None, silu_gated: bool = False) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for x of one row `[1, in]`; weight `[out, in]` with unit column stride.
    `silu_gated`: x is `[1, 2 * in]`, an MLP's merged gate/up projection, and the product is
    `F.linear(silu_and_mul(x), weight, bias)`: batch 1 saves the activation's launch."""
    out_features, in_features = weight.shape
    assert x.shape[0] == 1 and x.shape[1] == in_features * (2 if silu_gated else 1) and weight.stride(1) == 1
    launch = launch or gemv_launch_for(out_features, in_features)
    x = x.contiguous()
    y = torch.empty(1, out_features, dtype=x.dtype, device=x.device)
    _gemv_kernel[(triton.cdiv(out_features, launch.block_n),)](
        weight, x, bias if bias is not None else x, y, out_features, weight.stride(0), in_features,
        HAS_BIAS=bias is not None, EVEN_N=out_features % launch.block_n == 0,
        EVEN_K=in_features % launch.block_k == 0, SILU_GATED=silu_gated, BLOCK_N=launch.block_n,
        BLOCK_K=launch.block_k, num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
    return y
