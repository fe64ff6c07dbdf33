"""The one-token GEMV against F.linear: odd widths (masked tiles), a bias, and a weight that is a view
of a wider buffer whose columns past the layer's width are NaN (never to be read); on CUDA also
Llama 8B's shapes in bfloat16 and `linear`'s choice between the GEMV and cuBLAS."""

import pytest
import torch
import torch.nn.functional as F

from kernels.gemv import GemvLaunch, gemv
from tests.kernels.kernel_testing import DEVICE, DTYPES, assert_matches, gpu_only, randn


def poisoned_weight(out_features: int, in_features: int, dtype, seed: int = 0) -> torch.Tensor:
    """`[out, in]` with row stride in + 7: the 7 columns after each row are NaN."""
    wide = randn(out_features, in_features + 7, dtype=dtype, seed=seed) / in_features ** 0.5
    wide[:, in_features:] = float("nan")
    return wide[:, :in_features]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features, in_features, bias, launch", [
    (64, 256, False, GemvLaunch(16, 256)),     # even tiles
    (37, 100, True, GemvLaunch(8, 64)),        # rows and width past the tiles' edges
    (5, 300, False, GemvLaunch(4, 128, num_warps=2, num_stages=2)),
    (48, 96, True, None),                      # the default launch
])
def test_matches_f_linear(dtype, out_features, in_features, bias, launch):
    weight = poisoned_weight(out_features, in_features, dtype)
    x = randn(1, in_features, dtype=dtype, seed=1)
    b = randn(out_features, dtype=dtype, seed=2) if bias else None
    assert_matches(gemv(x, weight, b, launch=launch), F.linear(x.float(), weight.float(),
                                                                 None if b is None else b.float()), dtype)


@gpu_only
@pytest.mark.parametrize("shape", [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096)])
def test_bfloat16_llama_8b_shapes_on_gpu(shape):
    weight = randn(*shape, dtype=torch.bfloat16, seed=3) / shape[1] ** 0.5
    x = randn(1, shape[1], dtype=torch.bfloat16, seed=4)
    assert_matches(gemv(x, weight), F.linear(x.float(), weight.float()), torch.bfloat16)


@gpu_only
def test_linear_takes_the_gemv_for_one_row_only():
    from engine.layers.linear import linear

    weight = randn(256, 128, dtype=torch.bfloat16, seed=5)
    one, many = randn(1, 128, dtype=torch.bfloat16, seed=6), randn(3, 128, dtype=torch.bfloat16, seed=7)
    assert torch.equal(linear(one, weight), gemv(one, weight))
    assert torch.equal(linear(many, weight), F.linear(many, weight))
    assert torch.equal(linear(one.float(), weight.float()), F.linear(one.float(), weight.float()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_features, in_features, launch", [
    (64, 256, GemvLaunch(16, 256)),   # even tiles
    (37, 100, GemvLaunch(8, 64)),     # rows and width past the tiles' edges
])
def test_silu_gated_is_the_activation_then_the_product_bit_for_bit(dtype, out_features, in_features, launch):
    """The down projection reading the gate/up projection gives exactly what the activation kernel
    and then the GEMV give: the same rounding of the activation, the same sums."""
    from kernels.silu_and_mul import silu_and_mul

    weight = poisoned_weight(out_features, in_features, dtype, seed=8)
    gate_up = randn(1, 2 * in_features, dtype=dtype, seed=9) * 3
    fused = gemv(gate_up, weight, launch=launch, silu_gated=True)
    assert torch.equal(fused, gemv(silu_and_mul(gate_up), weight, launch=launch))


@gpu_only
def test_llama_mlp_at_one_token_gives_the_unfused_result_exactly():
    from types import SimpleNamespace

    from engine.models.llama import LlamaMLP

    mlp = LlamaMLP(SimpleNamespace(hidden_size=4096, intermediate_size=14336)).to(DEVICE, torch.bfloat16)
    x = randn(1, 4096, dtype=torch.bfloat16, seed=10)
    unfused = mlp.down_proj(mlp.act_fn(mlp.gate_up_proj(x)))
    assert torch.equal(mlp(x), unfused)
