"""RMSNorm in Triton, optionally fused with the residual add before it: one read of x (and the
residual) and one write of each output, instead of torch's chain of elementwise kernels.

Drop-in for `engine.layers.norm.fused_add_rms_norm`, rounding where it rounds (the sum to the
residual dtype, the normalised row to x's dtype before the weight; Gemma's `one_plus_weight` norm
only after its (1 + weight) scale), so results match transformers'.
One program per row; the whole row sits in registers, so any hidden size works (the tail is masked).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(out_ptr, residual_out_ptr, x_ptr, residual_ptr, weight_ptr, eps, hidden,
                     stride_x, stride_residual, HAS_RESIDUAL: tl.constexpr, ONE_PLUS_WEIGHT: tl.constexpr,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x.dtype)
        tl.store(residual_out_ptr + row * hidden + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x32 * x32, axis=0) / hidden + eps)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    if ONE_PLUS_WEIGHT:
        normed = x32 * rstd * (1.0 + weight)
    else:
        normed = (x32 * rstd).to(x.dtype).to(tl.float32) * weight
    tl.store(out_ptr + row * hidden + cols, normed.to(out_ptr.dtype.element_ty), mask=mask)


def fused_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
                       out: torch.Tensor | None = None, one_plus_weight: bool = False):
    """Normalise over the last dimension; with `residual`, returns (norm(x + residual), x + residual).
    `out` (contiguous, x's shape) receives the normalised result."""
    hidden = x.shape[-1]
    rows = x.reshape(-1, hidden)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    residual_rows = rows if residual is None else residual.reshape(-1, hidden)  # unread without one
    residual_out = None if residual is None else torch.empty_like(x, memory_format=torch.contiguous_format)
    assert rows.stride(-1) == 1 and residual_rows.stride(-1) == 1 and weight.is_contiguous() and out.is_contiguous()
    if rows.shape[0]:
        block = triton.next_power_of_2(hidden)
        _rms_norm_kernel[(rows.shape[0],)](
            out, residual_out, rows, residual_rows, weight, eps, hidden, rows.stride(0), residual_rows.stride(0),
            HAS_RESIDUAL=residual is not None, ONE_PLUS_WEIGHT=one_plus_weight, BLOCK=block,
            num_warps=min(max(block // 256, 1), 16))
    return out if residual is None else (out, residual_out)
