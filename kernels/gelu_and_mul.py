"""GELU-and-multiply in Triton (Gemma's GeGLU): silu_and_mul's kernel with the tanh-approximated GELU.

Drop-in for `engine.layers.activation.gelu_and_mul` with `approximate="tanh"` (what Gemma checkpoints
use), rounding where it rounds.
"""

from __future__ import annotations

import torch

from kernels.silu_and_mul import gated_activation_and_mul


def gelu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x `[..., 2 * d]` = [gate, up] (rows may be strided) -> gelu_tanh(gate) * up, `[..., d]`."""
    return gated_activation_and_mul(x, True, out)
