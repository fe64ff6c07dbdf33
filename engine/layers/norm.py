"""RMSNorm, optionally fused with the residual add that precedes it (as in vLLM)."""

from __future__ import annotations

import torch
from torch import nn

from kernels import triton_or_reference


def fused_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       one_plus_weight: bool = False):
    """The torch reference (and CPU path). With `residual`: returns (norm(x + residual), x + residual).

    Normalises in float32 but multiplies by the weight in x's dtype, exactly as transformers does.
    `one_plus_weight` (Gemma, whose checkpoints store the weight minus one): scales by (1 + weight)
    in float32 and rounds only then, as transformers' GemmaRMSNorm does.
    """
    if residual is not None:
        x = x + residual
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    normed = (normed * (1.0 + weight.float())).to(x.dtype) if one_plus_weight else weight * normed.to(x.dtype)
    return normed if residual is None else (normed, x)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, one_plus_weight: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.one_plus_weight = one_plus_weight
        self.weight = nn.Parameter(torch.zeros(hidden_size) if one_plus_weight else torch.ones(hidden_size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """With `residual`: returns (norm(x + residual), x + residual)."""
        kernel = triton_or_reference(x, "fused_add_rms_norm", fused_add_rms_norm)
        return kernel(x, self.weight, self.eps, residual, one_plus_weight=self.one_plus_weight)
