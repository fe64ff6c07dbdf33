"""RMSNorm, optionally fused with the residual add that precedes it (as in vLLM)."""

from __future__ import annotations

import torch
from torch import nn

from kernels import triton_or_reference


def fused_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None):
    """The torch reference (and CPU path). With `residual`: returns (norm(x + residual), x + residual).

    Normalises in float32 but multiplies by the weight in x's dtype, exactly as transformers does.
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return normed if residual is None else (normed, x)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual)."""
        kernel = triton_or_reference(x, "fused_add_rms_norm", fused_add_rms_norm)
        return kernel(x, self.weight, self.eps, residual)
