"""The Triton gated activations against their torch references: SiLU-and-multiply (Llama) and
GELU(tanh)-and-multiply (Gemma), one kernel."""

import pytest
import torch

from engine.layers import activation
from kernels.gelu_and_mul import gelu_and_mul
from kernels.silu_and_mul import silu_and_mul
from tests.kernels.kernel_testing import DEVICE, DTYPES, assert_matches, gpu_only, randn

KERNELS = {"silu": (silu_and_mul, activation.silu_and_mul), "gelu_tanh": (gelu_and_mul, activation.gelu_and_mul)}


def check(shape, d, dtype, kernel, strided=False):
    triton_kernel, reference = KERNELS[kernel]
    x = randn(*shape, 2 * d + 5 if strided else 2 * d, dtype=dtype, seed=d)[..., :2 * d] * 3  # gelu's curved part
    out = torch.full((*shape, d), float("nan"), dtype=dtype, device=x.device)  # poisoned
    assert triton_kernel(x, out=out) is out
    assert_matches(out, reference(x), dtype)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, d", [
    ((1,), 1),
    ((7,), 13),          # odd width
    ((3,), 1100),        # wider than one program's block
    ((2, 3), 40),        # leading dimensions flattened
])
def test_matches_reference(dtype, shape, d, kernel):
    check(shape, d, dtype, kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_rows_and_no_rows(kernel):
    check((4,), 24, torch.float32, kernel, strided=True)
    assert KERNELS[kernel][0](randn(0, 8, dtype=torch.float32)).shape == (0, 4)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # a very negative gate: g / inf = 0, as meant
def test_gelu_is_the_tanh_approximation_and_large_inputs_stay_finite():
    x = torch.tensor([[-30.0, -3.0, 0.0, 0.5, 3.0, 30.0] + [1.0] * 6], device=DEVICE)
    assert_matches(gelu_and_mul(x), torch.nn.functional.gelu(x[:, :6], approximate="tanh"), torch.float32)


@gpu_only
@pytest.mark.parametrize("kernel", KERNELS)
def test_bfloat16_on_gpu(kernel):
    check((500,), 14336, torch.bfloat16, kernel)
