"""SiLU-and-multiply in Triton: out = silu(x[..., :d]) * x[..., d:], the gated activation of
Llama-style MLPs, in one pass over the merged gate/up projection instead of three torch kernels.

Drop-in for `engine.layers.activation.silu_and_mul`, rounding where it rounds (silu's result to
x's dtype before the product), so results match transformers'.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(out_ptr, x_ptr, d, stride_x, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    gate32 = gate.to(tl.float32)
    silu = (gate32 / (1.0 + tl.exp(-gate32))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * d + cols, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """x `[..., 2 * d]` (rows may be strided) -> `[..., d]`; `out`, if given, must be contiguous."""
    d = x.shape[-1] // 2
    rows = x.reshape(-1, 2 * d)
    if out is None:
        out = torch.empty(*x.shape[:-1], d, dtype=x.dtype, device=x.device)
    assert rows.stride(-1) == 1 and out.is_contiguous()
    block = min(triton.next_power_of_2(d), 1024)
    if rows.shape[0]:
        _silu_and_mul_kernel[(rows.shape[0], triton.cdiv(d, block))](out, rows, d, rows.stride(0), BLOCK=block)
    return out
