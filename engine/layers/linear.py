"""The linear layers' product: one token on CUDA runs kernels/gemv.py, everything else F.linear.

Batch-1 decoding is a read of every weight once per token; cuBLAS reads the smaller ones (Llama 8B's
q/k/v and o) well below the memory's bandwidth and adds a split-K reduce kernel, where the GEMV
streams each weight once (`python -m engine.bench.gemv`). The decode CUDA graph of one sequence
captures it; every larger step is a GEMM and stays with cuBLAS. An MLP's down projection may take
its gate/up projection as is (`silu_gated`): the GEMV applies the activation as it reads it, one
launch a layer fewer at batch 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.activation import apply_silu_and_mul

GEMV_DTYPES = (torch.bfloat16, torch.float16)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           silu_gated: bool = False) -> torch.Tensor:
    """`F.linear`; with `silu_gated`, x is an MLP's merged gate/up projection and the product's input
    is its activation, silu(gate) * up, which the one-token GEMV computes as it reads x."""
    if x.is_cuda and x.dim() == 2 and x.shape[0] == 1 and x.dtype in GEMV_DTYPES and weight.stride(1) == 1:
        from kernels.gemv import gemv

        return gemv(x, weight, bias, silu_gated=silu_gated)
    if silu_gated:
        x = apply_silu_and_mul(x)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """nn.Linear (same parameters, same checkpoint names) whose product is `linear`."""

    def forward(self, x: torch.Tensor, silu_gated: bool = False) -> torch.Tensor:
        return linear(x, self.weight, self.bias, silu_gated)
