"""The fused rotary + cache write against the torch reference, on q, k and v as the model has them:
strided views into one fused qkv projection. The query is rotated in place; the rotated key and the
value land in their scrambled cache slots (every other slot keeps its NaN poison); a slot of -1 (a
CUDA graph's padding row) writes nothing; k and v are left as they were."""

from types import SimpleNamespace

import pytest
import torch

from engine.layers.attention import rotary_and_cache as reference
from engine.layers.rotary import RotaryEmbedding, rotary_embedding
from kernels.rotary_and_cache import rotary_and_cache
from tests.kernels.kernel_testing import DEVICE, DTYPES, PagedKV, assert_matches, gpu_only, randn

MAX_POSITION = 4096


def check(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype):
    rope = RotaryEmbedding(SimpleNamespace(rope_theta=10000.0), head_dim, MAX_POSITION).to(DEVICE)
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv = randn(num_tokens, q_size + 2 * kv_size, dtype=dtype, seed=num_tokens)
    q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
    q, k, v = q.view(-1, num_heads, head_dim), k.view(-1, num_kv_heads, head_dim), v.view(-1, num_kv_heads, head_dim)
    positions = torch.randint(0, MAX_POSITION, (num_tokens,), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kv = PagedKV([num_tokens + 3], num_kv_heads, head_dim, block_size, dtype)  # scrambled blocks
    slots = kv.slots(0, 3, num_tokens + 3)
    if num_tokens > 1:
        slots[num_tokens // 2] = -1  # a padding row
    owned = slots >= 0  # the torch reference writes every row it is given: the owned ones
    expected_caches = kv.key_cache.clone(), kv.value_cache.clone()
    reference(positions[owned], q[owned], k[owned], v[owned], rope.cos_cache, rope.sin_cache, *expected_caches,
              slots[owned])
    expected_q, _ = rotary_embedding(positions, q, k, rope.cos_cache, rope.sin_cache)
    k_before, v_before = k.clone(), v.clone()

    rotated = rotary_and_cache(positions, q, k, v, rope.cos_cache, rope.sin_cache, kv.key_cache, kv.value_cache,
                               slots)
    assert rotated.data_ptr() == q.data_ptr()  # in place
    assert_matches(q, expected_q, dtype)
    for actual, expected in zip((kv.key_cache, kv.value_cache), expected_caches):
        written = ~expected.isnan()
        assert torch.equal(actual.isnan(), expected.isnan())  # no slot written that should not be
        assert_matches(actual[written], expected[written], dtype)
    assert torch.equal(k, k_before) and torch.equal(v, v_before)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim, block_size", [
    (1, 4, 4, 16, 16),    # one token, no GQA
    (7, 6, 2, 24, 4),     # GQA 3, half head_dim (12) not a power of two, small blocks
    (5, 8, 2, 64, 16),    # GQA 4
    (3, 5, 1, 32, 1),     # a single KV head, odd head count, block size 1
])
def test_matches_reference(dtype, num_tokens, num_heads, num_kv_heads, head_dim, block_size):
    check(num_tokens, num_heads, num_kv_heads, head_dim, block_size, dtype)


def test_no_tokens():
    q, k = randn(0, 2, 16, dtype=torch.float32), randn(0, 2, 16, dtype=torch.float32)
    table, cache = torch.zeros(8, 8, device=DEVICE), torch.zeros(2, 4, 2, 16, device=DEVICE)
    slots = torch.zeros(0, dtype=torch.long, device=DEVICE)
    assert rotary_and_cache(slots, q, k, k, table, table, cache, cache.clone(), slots).shape == (0, 2, 16)


@gpu_only
def test_bfloat16_on_gpu():
    check(1000, 32, 8, 128, 16, torch.bfloat16)
