"""The Triton SiLU-and-multiply against the torch reference."""

import pytest
import torch

from engine.layers.activation import silu_and_mul as reference
from kernels.silu_and_mul import silu_and_mul
from tests.kernels.kernel_testing import DTYPES, assert_matches, gpu_only, randn


def check(shape, d, dtype, strided=False):
    x = randn(*shape, 2 * d + 5 if strided else 2 * d, dtype=dtype, seed=d)[..., :2 * d]
    out = torch.full((*shape, d), float("nan"), dtype=dtype, device=x.device)  # poisoned
    assert silu_and_mul(x, out=out) is out
    assert_matches(out, reference(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, d", [
    ((1,), 1),
    ((7,), 13),          # odd width
    ((3,), 1100),        # wider than one program's block
    ((2, 3), 40),        # leading dimensions flattened
])
def test_matches_reference(dtype, shape, d):
    check(shape, d, dtype)


def test_strided_rows_and_no_rows():
    check((4,), 24, torch.float32, strided=True)
    assert silu_and_mul(randn(0, 8, dtype=torch.float32)).shape == (0, 4)


@gpu_only
def test_bfloat16_on_gpu():
    check((500,), 14336, torch.bfloat16)
