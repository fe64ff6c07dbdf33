"""The Triton paged decode kernel against the torch reference (interpreted on the CPU)."""

import pytest
import torch

from kernels.paged_attention_ref import paged_decode_attention as reference
from kernels.paged_decode_attention import paged_decode_attention
from tests.kernels.kernel_testing import PagedKV, assert_matches, gpu_only, randn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter is wrong for bfloat16; the GPU run covers it.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])


def make_case(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    max_blocks = max(-(-n // block_size) for n in seq_lens)
    num_blocks = len(seq_lens) * max_blocks + 3
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    key_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    value_cache = torch.randn(shape, generator=generator).to(DEVICE, dtype)
    # Scrambled, non-contiguous block tables; padding points at block 0.
    order = torch.randperm(num_blocks - 1, generator=generator) + 1
    block_tables = torch.zeros(len(seq_lens), max_blocks, dtype=torch.long)
    for row, n in enumerate(seq_lens):
        used = -(-n // block_size)
        block_tables[row, :used] = order[row * max_blocks: row * max_blocks + used]
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator).to(DEVICE, dtype)
    seq_lens = torch.tensor(seq_lens, dtype=torch.long)
    return query, key_cache, value_cache, block_tables.to(DEVICE), seq_lens.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seq_lens,num_heads,num_kv_heads,head_dim,block_size", [
    ([1, 17, 40], 4, 4, 32, 16),         # one-token context, lengths off the block size, no GQA
    ([5, 33, 64, 3], 8, 2, 64, 16),      # GQA group 4
    ([9, 70], 7, 1, 16, 8),              # group 7 (not a power of two), small blocks
    ([31, 2], 6, 3, 24, 4),              # head_dim not a power of two, block size 4
    ([50], 2, 2, 16, 32),                # block larger than the tile minimum
    ([12, 7], 3, 3, 16, 1),              # block size 1
    ([700, 3, 260], 4, 2, 32, 16),       # long contexts: split into chunks, some chunks empty
])
def test_matches_reference(dtype, seq_lens, num_heads, num_kv_heads, head_dim, block_size):
    query, key_cache, value_cache, block_tables, lens = make_case(seq_lens, num_heads, num_kv_heads, head_dim,
                                                                   block_size, dtype)
    scale = head_dim ** -0.5
    out = torch.full_like(query, float("nan"))  # poisoned: every element must be written
    paged_decode_attention(query, key_cache, value_cache, block_tables, lens, scale, out=out)
    expected = reference(query.float(), key_cache.float(), value_cache.float(), block_tables, lens, scale)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    assert not out.isnan().any()
    torch.testing.assert_close(out.float(), expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("max_seq_len", [2048, 700])
def test_launch_sized_for_a_larger_bound_gives_the_same_result(max_seq_len):
    """A CUDA graph launches the kernel sized for max_model_len: short sequences leave splits empty."""
    query, key_cache, value_cache, block_tables, lens = make_case([1, 17, 700, 64], 8, 2, 32, 16, torch.float32)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.2, out=out, max_seq_len=max_seq_len)
    expected = reference(query, key_cache, value_cache, block_tables, lens, 0.2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def check_window(seq_lens, num_heads, num_kv_heads, head_dim, block_size, dtype, sliding_window, soft_cap,
                 max_seq_len=None):
    """Against the reference, with NaN in every block behind a window (given back to the pool by then)."""
    kv = PagedKV(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    for seq, seq_len in enumerate(seq_lens):
        kv.poison_behind_window(seq, seq_len - 1, sliding_window)
    query = randn(len(seq_lens), num_heads, head_dim, dtype=dtype, seed=5)
    options = dict(sliding_window=sliding_window, logits_soft_cap=soft_cap)
    out = torch.full_like(query, float("nan"))
    paged_decode_attention(query, kv.key_cache, kv.value_cache, kv.block_tables, kv.seq_lens, head_dim ** -0.5,
                           out=out, max_seq_len=max_seq_len, **options)
    expected = reference(query.float(), kv.key_cache.float(), kv.value_cache.float(), kv.block_tables, kv.seq_lens,
                         head_dim ** -0.5, **options)
    assert_matches(out, expected, dtype)


# Windows of one token, under a block (16), not a multiple of it, equal to a context (40), beyond every one.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("soft_cap", [None, 0.6])
@pytest.mark.parametrize("sliding_window", [1, 5, 21, 40, 1000])
def test_sliding_window_and_soft_cap_match_reference(dtype, sliding_window, soft_cap):
    check_window([1, 17, 40, 130], 6, 2, 32, 16, dtype, sliding_window, soft_cap)


@pytest.mark.parametrize("block_size", [1, 4, 32])
def test_sliding_window_over_a_long_context_with_a_graph_sized_launch(block_size):
    """A window of 300 over contexts up to 900: the window is split into chunks (some empty) from its
    first token on, in a launch sized as a CUDA graph sizes it (max_model_len)."""
    check_window([900, 3, 310, 299], 4, 2, 16, block_size, torch.float32, 300, None, max_seq_len=4096)


@gpu_only
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads, num_kv_heads, head_dim, sliding_window, soft_cap", [
    (32, 8, 128, 4096, None),   # Mistral 7B
    (16, 8, 256, 4096, 50.0),   # Gemma 2 9B's local layers
    (16, 8, 256, 1023, None),   # a window off the block size
])
def test_sliding_window_on_gpu(dtype, num_heads, num_kv_heads, head_dim, sliding_window, soft_cap):
    """Real shapes, contexts up to four windows, a launch sized for a CUDA graph of max_model_len 32768."""
    check_window([1, 1000, 4097, 9000, 16384], num_heads, num_kv_heads, head_dim, 16, dtype, sliding_window,
                 soft_cap, max_seq_len=32768)


def test_split_count_fills_the_gpu_without_tiny_chunks():
    from kernels.paged_decode_attention import num_splits_for

    assert num_splits_for(batch=1, num_kv_heads=8, max_seq_len=4096, tile=64) == 16  # 4096 / (4 * 64)
    assert num_splits_for(batch=64, num_kv_heads=8, max_seq_len=4096, tile=64) == 2
    assert num_splits_for(batch=256, num_kv_heads=8, max_seq_len=100, tile=64) == 1


def test_empty_batch_returns_empty():
    query, key_cache, value_cache, block_tables, lens = make_case([4], 2, 2, 16, 16, torch.float32)
    out = paged_decode_attention(query[:0], key_cache, value_cache, block_tables[:0], lens[:0], 0.25)
    assert out.shape == (0, 2, 16)


def test_chunks_merged_by_their_last_program_leave_the_counters_at_zero():
    """The merge counters are shared by every launch (a CUDA graph replays with the same buffer): each
    launch must leave them at zero, so the same launch again, and another shape, still merge right."""
    from kernels.paged_decode_attention import split_counters

    for seq_lens, group in (([700, 3, 260, 1100], 4), ([1100, 600], 2), ([700, 3, 260, 1100], 4)):
        query, key_cache, value_cache, block_tables, lens = make_case(seq_lens, 2 * group, 2, 32, 16, torch.float32)
        out = torch.full_like(query, float("nan"))
        paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 0.2, out=out, max_seq_len=4096)
        torch.testing.assert_close(out, reference(query, key_cache, value_cache, block_tables, lens, 0.2),
                                   atol=1e-5, rtol=1e-5)
        assert not split_counters(query.device, 1).any()


@gpu_only
@pytest.mark.parametrize("batch", [1, 3, 16])
def test_llama_8b_shapes_with_many_chunks_on_gpu(batch):
    """Llama 8B's heads at contexts from one tile to 64 chunks, many launches in a row: a merge that
    read a chunk before its program had written it would show as a mismatch in some launch."""
    seq_lens = [(17 + 4093 * i) % 16384 + 1 for i in range(batch)]
    query, key_cache, value_cache, block_tables, lens = make_case(seq_lens, 32, 8, 128, 16, torch.bfloat16)
    expected = reference(query.float(), key_cache.float(), value_cache.float(), block_tables, lens, 128 ** -0.5)
    for _ in range(20):
        out = paged_decode_attention(query, key_cache, value_cache, block_tables, lens, 128 ** -0.5,
                                     max_seq_len=16384)
        assert_matches(out, expected, torch.bfloat16)


def test_a_larger_need_keeps_the_smaller_counters_alive():
    """A graph captured with the first buffer still reads it after a larger batch made a second one."""
    from kernels.paged_decode_attention import COUNTERS_AT_LEAST, _counters, split_counters

    device = torch.device(DEVICE)
    first = split_counters(device, 1)
    larger = split_counters(device, COUNTERS_AT_LEAST + 1)
    assert larger.numel() > first.numel() and split_counters(device, 1) is larger
    assert any(buffer is first for buffer in _counters[device])
