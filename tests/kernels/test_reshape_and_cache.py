"""The Triton reshape_and_cache against the torch reference: new K/V (strided views into a fused
qkv projection) land in their slots, padding tokens (slot -1) write nothing, no other slot changes."""

import pytest
import torch

from kernels.paged_attention_ref import reshape_and_cache as reference
from kernels.reshape_and_cache import reshape_and_cache
from tests.kernels.kernel_testing import DEVICE, DTYPES, PagedKV, gpu_only, randn


def check(chunks, num_kv_heads, head_dim, block_size, dtype, num_padding=2):
    """chunks: (already cached, new) token counts per sequence; the new tokens are written."""
    kv = PagedKV([cached + new for cached, new in chunks], num_kv_heads, head_dim, block_size, dtype)
    slots = [kv.slots(seq, cached, cached + new) for seq, (cached, new) in enumerate(chunks)]
    padding = torch.full((num_padding,), -1, dtype=torch.long, device=DEVICE)
    slot_mapping = torch.cat([slots[0], padding, *slots[1:]])  # padding in the middle of the batch
    kv_size = num_kv_heads * head_dim
    fused = randn(len(slot_mapping), 3 * kv_size, dtype=dtype)  # q, k, v of each token
    key = fused[:, kv_size:2 * kv_size].view(-1, num_kv_heads, head_dim)
    value = fused[:, 2 * kv_size:].view(-1, num_kv_heads, head_dim)
    expected_keys, expected_values = kv.key_cache.clone(), kv.value_cache.clone()
    real = slot_mapping >= 0
    reference(key[real], value[real], expected_keys, expected_values, slot_mapping[real])
    reshape_and_cache(key, value, kv.key_cache, kv.value_cache, slot_mapping)
    # Exact, NaN (unowned slots, untouched) included.
    torch.testing.assert_close(kv.key_cache, expected_keys, atol=0, rtol=0, equal_nan=True)
    torch.testing.assert_close(kv.value_cache, expected_values, atol=0, rtol=0, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks, num_kv_heads, head_dim, block_size", [
    ([(0, 1)], 1, 16, 16),                  # a one-token prompt
    ([(0, 19), (20, 7), (32, 1)], 2, 24, 16),  # off the block size; mid-block and block-start prefix hits
    ([(5, 40), (0, 3)], 3, 16, 32),         # three KV heads, block size 32
    ([(3, 4)], 2, 8, 1),                    # block size 1
])
def test_matches_reference(dtype, chunks, num_kv_heads, head_dim, block_size):
    check(chunks, num_kv_heads, head_dim, block_size, dtype)


def test_only_padding_writes_nothing():
    check([(4, 0)], 2, 16, 16, torch.float32, num_padding=3)


@gpu_only
def test_bfloat16_on_gpu():
    check([(0, 2000), (700, 300), (33, 1)] * 4, 8, 128, 16, torch.bfloat16)
