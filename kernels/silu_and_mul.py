"""SiLU-and-multiply in Triton: out = silu(x[..., :d]) * x[..., d:], the gated activation of
Llama-style MLPs, in one pass over the merged gate/up projection instead of three torch kernels.
The same kernel computes Gemma's GeGLU with the tanh-approximated GELU (kernels/gelu_and_mul.py).

Drop-in for `engine.layers.activation.silu_and_mul`, rounding where it rounds (the activation's
result to x's dtype before the product), so results match transformers'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# A kernel may read only constexpr globals: a plain float compiles in the interpreter, not on a GPU.
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def gated_activation(row_ptr, cols, mask, d, GELU_TANH: tl.constexpr):
    """act(gate) * up at columns `cols` of one row [gate (d wide), up], in float32, the activation
    rounded to the row's dtype first: the one place this rounding is written (the GEMV that applies
    the activation as it reads its input, kernels/gemv.py, uses it too)."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0)
    up = tl.load(row_ptr + d + cols, mask=mask, other=0.0).to(tl.float32)
    gate32 = gate.to(tl.float32)
    if GELU_TANH:  # 0.5 * g * (1 + tanh(y)) = g * sigmoid(2y), y = sqrt(2 / pi) * (g + 0.044715 g^3)
        inner = _SQRT_2_OVER_PI * (gate32 + 0.044715 * gate32 * gate32 * gate32)
        activated = gate32 / (1.0 + tl.exp(-2.0 * inner))
    else:
        activated = gate32 / (1.0 + tl.exp(-gate32))
    return activated.to(gate.dtype).to(tl.float32) * up


@triton.jit
def _gated_kernel(out_ptr, x_ptr, d, stride_x, GELU_TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    product = gated_activation(x_ptr + row * stride_x, cols, mask, d, GELU_TANH)
    tl.store(out_ptr + row * d + cols, product.to(out_ptr.dtype.element_ty), mask=mask)


def gated_activation_and_mul(x: torch.Tensor, gelu_tanh: bool, out: torch.Tensor | None = None) -> torch.Tensor:
    """x `[..., 2 * d]` (rows may be strided) -> `[..., d]`; `out`, if given, must be contiguous."""
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if out is None:
        out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    assert rows.stride(-1) == 1 and out.is_contiguous()
    block = min(triton.next_power_of_2(d), 1024)
    if rows.shape[0]:
        _gated_kernel[(rows.shape[0], triton.cdiv(d, block))](out, rows, d, rows.stride(0), GELU_TANH=gelu_tanh,
                                                              BLOCK=block)
    return out


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    return gated_activation_and_mul(x, False, out)
