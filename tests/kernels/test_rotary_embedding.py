"""The Triton rotary embedding against the torch reference, on q and k as the model has them:
strided views into one fused qkv projection, rotated in place without touching v."""

from types import SimpleNamespace

import pytest
import torch

from engine.layers.rotary import RotaryEmbedding, rotary_embedding as reference
from kernels.rotary_embedding import rotary_embedding
from tests.kernels.kernel_testing import DEVICE, DTYPES, assert_matches, gpu_only, randn

MAX_POSITION = 4096


def check(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), head_dim, MAX_POSITION).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=num_tokens)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    expected_q, expected_k = reference(positions, q.clone(), k.clone(), rope.cos_cache, rope.sin_cache)
    v_before = v.clone()
    rotated_q, rotated_k = rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    assert rotated_q.data_ptr() == q.data_ptr() and rotated_k.data_ptr() == k.data_ptr()  # in place
    assert_matches(q, expected_q, dtype)
    assert_matches(k, expected_k, dtype)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim", [
    (1, 4, 4, 16),    # one token, no GQA
    (7, 6, 2, 24),    # GQA 3, half head_dim (12) not a power of two
    (5, 8, 2, 64),    # GQA 4
    (3, 5, 1, 32),    # a single KV head, odd head count
])
def test_matches_reference(dtype, num_tokens, num_heads, num_kv_heads, head_dim):
    check(num_tokens, num_heads, num_kv_heads, head_dim, dtype)


def test_no_tokens():
    q, k = randn(0, 2, 16, dtype=torch.float32), randn(0, 2, 16, dtype=torch.float32)
    cache = torch.zeros(8, 8, device=DEVICE)
    assert rotary_embedding(torch.zeros(0, dtype=torch.long, device=DEVICE), q, k, cache, cache)[0].shape == (0, 2, 16)


@gpu_only
def test_bfloat16_on_gpu():
    check(1000, 32, 8, 128, torch.bfloat16)
