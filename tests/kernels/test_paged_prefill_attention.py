"""The Triton varlen paged prefill attention against the torch reference, several chunks per launch.

Each case lists (cached, new) token counts per sequence: `new` query tokens after `cached` ones
already in the cache (a prefix-cache hit or earlier chunks). The batch starts with rows that are not
prefill (decodes), which the kernel must leave alone; the output starts as NaN everywhere.
"""

import pytest
import torch

from kernels.paged_attention_ref import varlen_paged_prefill_attention as reference
from kernels.paged_prefill_attention import paged_prefill_attention
from tests.kernels.kernel_testing import DEVICE, DTYPES, PagedKV, assert_matches, gpu_only, randn

NUM_DECODE_ROWS = 2


def check(chunks, num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window=None, soft_cap=None):
    kv = PagedKV([cached + new for cached, new in chunks], num_kv_heads, head_dim, block_size, dtype)
    if sliding_window is not None:
        for seq, (cached, _) in enumerate(chunks):
            kv.poison_behind_window(seq, cached, sliding_window)
    query_lens = [new for _, new in chunks]
    query = randn(NUM_DECODE_ROWS + sum(query_lens), num_heads, head_dim, dtype=dtype, seed=7)
    query_start_loc = (torch.tensor([0, *query_lens]).cumsum(0) + NUM_DECODE_ROWS).to(DEVICE, torch.int32)
    scale = head_dim ** -0.5
    options = dict(sliding_window=sliding_window, logits_soft_cap=soft_cap)
    out = torch.full_like(query, float("nan"))
    paged_prefill_attention(query, kv.key_cache, kv.value_cache, kv.block_tables, kv.seq_lens, query_start_loc,
                            scale, max(query_lens), out=out, **options)
    expected = reference(query.float(), kv.key_cache.float(), kv.value_cache.float(), kv.block_tables, kv.seq_lens,
                         query_start_loc, scale, max(query_lens), **options)
    assert out[:NUM_DECODE_ROWS].isnan().all()
    assert_matches(out[NUM_DECODE_ROWS:], expected[NUM_DECODE_ROWS:], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("chunks, num_heads, num_kv_heads, head_dim, block_size", [
    ([(0, 1)], 4, 4, 16, 16),                           # a one-token prompt, no GQA
    ([(0, 19), (20, 7), (32, 5), (0, 1)], 6, 2, 32, 16),  # GQA 3; off the block size; mid-block and
                                                        # block-start prefix hits; lengths mixed
    ([(10, 70), (0, 33)], 8, 2, 16, 32),                # GQA 4: several query tiles and key tiles
    ([(40, 1), (3, 9)], 4, 1, 24, 32),                  # GQA 4 on one KV head; head_dim not a power of two
])
def test_matches_reference(dtype, chunks, num_heads, num_kv_heads, head_dim, block_size):
    check(chunks, num_heads, num_kv_heads, head_dim, block_size, dtype)


@pytest.mark.parametrize("block_size", [1, 128])  # the smallest and largest the engine allows
def test_extreme_block_sizes(block_size):
    check([(5, 12), (130, 3)], 4, 2, 16, block_size, torch.float32)


# Windows of one token, under a block (16), not a multiple of it, equal to the longest context, beyond it.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft_cap", [None, 0.6])
@pytest.mark.parametrize("sliding_window", [1, 5, 21, 80, 1000])
def test_sliding_window_and_soft_cap_match_reference(dtype, sliding_window, soft_cap):
    """Chunks after long cached prefixes (the window starts mid-block, blocks behind it are NaN), a
    whole prompt, a one-token chunk; GQA 3 with query tiles of several tokens."""
    check([(40, 30), (0, 25), (62, 1), (9, 14)], 6, 2, 32, 16, dtype, sliding_window, soft_cap)


def test_soft_cap_holds_huge_scores():
    """Scores of thousands (scale 50) saturate the cap instead of overflowing tanh's exponentials."""
    kv = PagedKV([20], 2, 16, 4, torch.float32)
    query = randn(20, 2, 16, dtype=torch.float32, seed=3)
    loc = torch.tensor([0, 20], dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(query, kv.key_cache, kv.value_cache, kv.block_tables, kv.seq_lens, loc, 50.0, 20,
                                  logits_soft_cap=5.0)
    expected = reference(query, kv.key_cache, kv.value_cache, kv.block_tables, kv.seq_lens, loc, 50.0, 20,
                         logits_soft_cap=5.0)
    assert_matches(out, expected, torch.float32)


def test_no_queries_writes_nothing():
    kv = PagedKV([4], 2, 16, 16, torch.float32)
    query = torch.full((3, 2, 16), float("nan"), device=DEVICE)
    loc = torch.tensor([3, 3], dtype=torch.int32, device=DEVICE)
    out = paged_prefill_attention(query, kv.key_cache, kv.value_cache, kv.block_tables[:0], kv.seq_lens[:0],
                                  loc[:1], 0.25, 0, out=query.clone())
    assert out.isnan().all()


@gpu_only
@pytest.mark.parametrize("num_heads, num_kv_heads, block_size", [(32, 8, 16), (32, 32, 32), (24, 8, 16)])
def test_bfloat16_on_gpu(num_heads, num_kv_heads, block_size):
    chunks = [(0, 1000), (512, 512), (1000, 37), (0, 1), (16, 256), (2000, 1)]
    check(chunks, num_heads, num_kv_heads, 128, block_size, torch.bfloat16)


@gpu_only
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, sliding_window, soft_cap", [
    (32, 8, 128, 4096, None),   # Mistral 7B
    (16, 8, 256, 4096, 50.0),   # Gemma 2 9B's local layers
    (16, 8, 256, 1023, None),   # a window off the block size
])
def test_sliding_window_bfloat16_on_gpu(num_heads, num_kv_heads, head_dim, sliding_window, soft_cap):
    chunks = [(0, 1000), (512, 512), (5000, 37), (0, 1), (16, 256), (9000, 1), (3000, 2048)]
    check(chunks, num_heads, num_kv_heads, head_dim, 16, torch.bfloat16, sliding_window, soft_cap)
