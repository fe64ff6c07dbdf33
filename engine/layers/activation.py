"""SiLU-and-multiply: the gated activation of Llama-style MLPs over one merged gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triton_or_reference


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The torch reference (and CPU path): silu(gate) * up, where x is `[..., 2 * d]` = [gate, up]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return triton_or_reference(x, "silu_and_mul", silu_and_mul)(x)
