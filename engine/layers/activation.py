"""The gated activations of Llama-style MLPs over one merged gate/up projection: SiLU (Llama) and GELU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels import triton_or_reference


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The torch reference (and CPU path): silu(gate) * up, where x is `[..., 2 * d]` = [gate, up]."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def apply_silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu_and_mul on x's device: the Triton kernel on CUDA."""
    return triton_or_reference(x, "silu_and_mul", silu_and_mul)(x)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_silu_and_mul(x)


def gelu_and_mul(x: torch.Tensor, approximate: str = "tanh") -> torch.Tensor:
    """gelu(gate) * up over one merged gate/up projection: Gemma's GeGLU ("gelu_pytorch_tanh" in its
    configs is the tanh approximation, `approximate="tanh"`; "gelu" is the exact one, "none")."""
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate=approximate) * up


class GeluAndMul(nn.Module):
    def __init__(self, approximate: str = "tanh") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.approximate != "tanh":  # the exact GELU has no kernel: no Gemma checkpoint uses it
            return gelu_and_mul(x, self.approximate)
        return triton_or_reference(x, "gelu_and_mul", gelu_and_mul)(x)
