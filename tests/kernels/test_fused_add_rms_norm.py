"""The Triton RMSNorm (with and without the fused residual add) against the torch reference."""

import pytest
import torch

from engine.layers.norm import fused_add_rms_norm as reference
from kernels.fused_add_rms_norm import fused_add_rms_norm
from tests.kernels.kernel_testing import DEVICE, DTYPES, assert_matches, gpu_only, randn


def check(rows, hidden, dtype, with_residual, strided=False, one_plus_weight=False):
    x = randn(rows, hidden + 3 if strided else hidden, dtype=dtype, seed=hidden)[:, :hidden]
    residual = randn(rows, hidden, dtype=dtype, seed=hidden + 1) if with_residual else None
    weight = randn(hidden, dtype=dtype, seed=hidden + 2)
    out = torch.full((rows, hidden), float("nan"), dtype=dtype, device=x.device)  # poisoned
    result = fused_add_rms_norm(x, weight, 1e-6, residual, out=out, one_plus_weight=one_plus_weight)
    expected = reference(x, weight, 1e-6, residual, one_plus_weight=one_plus_weight)
    if with_residual:
        assert result[0] is out
        assert_matches(result[1], expected[1], dtype)
        assert_matches(out, expected[0], dtype)
    else:
        assert result is out
        assert_matches(out, expected, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows, hidden", [(1, 16), (5, 96), (3, 130)])  # hidden not a power of two
def test_matches_reference(dtype, with_residual, rows, hidden):
    check(rows, hidden, dtype, with_residual)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_gemma_norm_scales_by_one_plus_weight(dtype, with_residual):
    check(5, 96, dtype, with_residual, one_plus_weight=True)
    x, weight = randn(2, 8, dtype=torch.float32), torch.zeros(8, device=DEVICE)  # a zero weight: the bare norm
    assert_matches(fused_add_rms_norm(x, weight, 1e-6, one_plus_weight=True), x * x.pow(2).mean(-1, True).rsqrt(),
                   torch.float32)


def test_strided_rows_and_no_rows():
    check(4, 24, torch.float32, with_residual=True, strided=True)
    x = randn(0, 8, dtype=torch.float32)
    assert fused_add_rms_norm(x, torch.ones(8, device=x.device), 1e-6).shape == (0, 8)


def test_heads_are_normalised_one_by_one():
    """Qwen3's per-head q/k norm: a 3-D input normalises each head's `head_dim` values."""
    x = randn(3, 4, 16, dtype=torch.float32)
    weight = randn(16, dtype=torch.float32, seed=1)
    assert_matches(fused_add_rms_norm(x, weight, 1e-6), reference(x, weight, 1e-6), torch.float32)


@gpu_only
@pytest.mark.parametrize("hidden", [4096, 5123])
def test_bfloat16_on_gpu(hidden):
    check(300, hidden, torch.bfloat16, with_residual=True)
    check(300, hidden, torch.bfloat16, with_residual=False)
    check(300, hidden, torch.bfloat16, with_residual=True, one_plus_weight=True)
