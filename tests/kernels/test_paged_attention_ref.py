"""The plain-torch paged attention against dense causal attention over contiguous K/V.

Every sequence's KV is written into a paged cache through scrambled block tables (blocks out of
order, interleaved between sequences), so a gather by the wrong block or offset shows up.
"""

import math

import pytest
import torch

from kernels.paged_attention_ref import (
    gather_kv,
    paged_decode_attention,
    paged_prefill_attention,
    reshape_and_cache,
    varlen_paged_prefill_attention,
)

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3}


def dense_attention(q, k, v, scale, first_query_pos, sliding_window=None, soft_cap=None):
    """q: [query_len, heads, dim] at positions first_query_pos..; k/v: [seq_len, kv_heads, dim].
    Reference in float64 with explicit loops over heads, repeating KV heads for GQA; a query at p
    sees keys p - sliding_window + 1 .. p, its scores soft-capped as c * tanh(s / c)."""
    query_len, num_heads, _ = q.shape
    seq_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    q, k, v = q.double(), k.double(), v.double()
    out = torch.empty(query_len, num_heads, q.shape[-1], dtype=torch.float64)
    for head in range(num_heads):
        kv_head = head // group
        scores = (q[:, head] @ k[:, kv_head].T) * scale  # [query_len, seq_len]
        if soft_cap is not None:
            scores = soft_cap * torch.tanh(scores / soft_cap)
        positions = torch.arange(seq_len)
        query_positions = torch.arange(first_query_pos, first_query_pos + query_len)
        scores[positions[None, :] > query_positions[:, None]] = -math.inf
        if sliding_window is not None:
            scores[positions[None, :] <= query_positions[:, None] - sliding_window] = -math.inf
        out[:, head] = torch.softmax(scores, dim=-1) @ v[:, kv_head]
    return out


class PagedCache:
    """A paged KV cache with sequences laid out through shuffled block tables."""

    def __init__(self, seq_lens, num_kv_heads, head_dim, block_size, dtype, seed=0):
        generator = torch.Generator().manual_seed(seed)
        self.block_size = block_size
        blocks_needed = [-(-n // block_size) for n in seq_lens]
        num_blocks = sum(blocks_needed) + 3  # spare blocks (and block 0) stay garbage
        block_ids = (torch.randperm(num_blocks - 1, generator=generator) + 1).tolist()
        self.key_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
        self.value_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(dtype)
        self.tables, self.keys, self.values = [], [], []
        for seq_len, needed in zip(seq_lens, blocks_needed):
            table, block_ids = block_ids[:needed], block_ids[needed:]
            self.tables.append(table)
            keys = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
            values = torch.randn(seq_len, num_kv_heads, head_dim, generator=generator).to(dtype)
            reshape_and_cache(keys, values, self.key_cache, self.value_cache, self.slots(table, 0, seq_len))
            self.keys.append(keys)
            self.values.append(values)

    def slots(self, table, start, end):
        return torch.tensor([table[p // self.block_size] * self.block_size + p % self.block_size
                             for p in range(start, end)], dtype=torch.long)

    def poison_before(self, seq, position):
        """NaN in sequence `seq`'s blocks wholly before `position`: the KV cache manager may have given
        the blocks behind a sliding window to another request."""
        for block in self.tables[seq][:max(0, position) // self.block_size]:
            self.key_cache[block] = float("nan")
            self.value_cache[block] = float("nan")

    def padded_tables(self, pad_with=0):
        width = max(len(t) for t in self.tables) + 2  # wider than needed, like a shared batch table
        return torch.tensor([t + [pad_with] * (width - len(t)) for t in self.tables], dtype=torch.long)


def test_reshape_and_cache_writes_the_right_slots():
    block_size, kv_heads, dim = 4, 2, 8
    key_cache = torch.zeros(6, block_size, kv_heads, dim)
    value_cache = torch.zeros(6, block_size, kv_heads, dim)
    keys = torch.arange(5 * kv_heads * dim, dtype=torch.float32).view(5, kv_heads, dim) + 1
    values = -keys
    slot_mapping = torch.tensor([4 * 5 + 3, 4 * 2 + 0, 4 * 2 + 1, 4 * 1 + 2, 4 * 5 + 0])
    reshape_and_cache(keys, values, key_cache, value_cache, slot_mapping)
    for token, slot in enumerate(slot_mapping.tolist()):
        block, offset = divmod(slot, block_size)
        assert torch.equal(key_cache[block, offset], keys[token])
        assert torch.equal(value_cache[block, offset], values[token])
    written = torch.zeros(6, block_size, dtype=torch.bool)
    for slot in slot_mapping.tolist():
        written[divmod(slot, block_size)] = True
    assert key_cache[~written].abs().sum() == 0 and value_cache[~written].abs().sum() == 0


def test_gather_kv_follows_the_block_table():
    cache = PagedCache([11], num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)
    table = torch.tensor(cache.tables[0])
    assert torch.equal(gather_kv(cache.key_cache, table, 11), cache.keys[0])
    assert torch.equal(gather_kv(cache.value_cache, table, 7), cache.values[0][:7])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2), (6, 1)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_decode_matches_dense_attention(dtype, num_heads, num_kv_heads, block_size):
    head_dim, seq_lens = 16, [1, 5, 16, 17, 40]
    cache = PagedCache(seq_lens, num_kv_heads, head_dim, block_size, dtype)
    generator = torch.Generator().manual_seed(1)
    query = torch.randn(len(seq_lens), num_heads, head_dim, generator=generator).to(dtype)
    scale = head_dim ** -0.5
    out = paged_decode_attention(query, cache.key_cache, cache.value_cache, cache.padded_tables(),
                                 torch.tensor(seq_lens), scale)
    assert out.shape == query.shape and out.dtype == dtype
    for i, seq_len in enumerate(seq_lens):
        expected = dense_attention(query[i:i + 1], cache.keys[i], cache.values[i], scale, seq_len - 1)[0]
        torch.testing.assert_close(out[i].double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_decode_ignores_whatever_the_padding_blocks_hold():
    cache = PagedCache([3, 9], num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    query = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    seq_lens = torch.tensor([3, 9])
    padded_with_null = paged_decode_attention(query, cache.key_cache, cache.value_cache, cache.padded_tables(0),
                                              seq_lens, 0.3)
    cache.key_cache[0] = 1e4  # the null block full of huge values must not leak into the result
    cache.value_cache[0] = 1e4
    padded_again = paged_decode_attention(query, cache.key_cache, cache.value_cache, cache.padded_tables(0),
                                          seq_lens, 0.3)
    torch.testing.assert_close(padded_with_null, padded_again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("num_heads, num_kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("seq_len, query_len", [(1, 1), (13, 13), (32, 32), (29, 7), (40, 1), (40, 16)])
def test_paged_prefill_matches_dense_causal_attention(dtype, num_heads, num_kv_heads, seq_len, query_len):
    """query_len < seq_len: a chunk after a cached prefix (prefix-cache hit or earlier chunks)."""
    head_dim, block_size = 16, 4
    cache = PagedCache([seq_len], num_kv_heads, head_dim, block_size, dtype, seed=seq_len)
    generator = torch.Generator().manual_seed(3)
    query = torch.randn(query_len, num_heads, head_dim, generator=generator).to(dtype)
    scale = 0.2
    table = torch.tensor(cache.tables[0] + [0, 0])  # a row of a padded batch table
    out = paged_prefill_attention(query, cache.key_cache, cache.value_cache, table, seq_len, scale)
    expected = dense_attention(query, cache.keys[0], cache.values[0], scale, seq_len - query_len)
    assert out.shape == query.shape and out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_prefill_in_chunks_equals_prefill_at_once():
    """Computing a sequence chunk by chunk, writing each chunk's KV first, gives the same outputs."""
    seq_len, heads, kv_heads, dim, block_size = 23, 4, 2, 8, 4
    generator = torch.Generator().manual_seed(4)
    q = torch.randn(seq_len, heads, dim, generator=generator)
    k = torch.randn(seq_len, kv_heads, dim, generator=generator)
    v = torch.randn(seq_len, kv_heads, dim, generator=generator)
    table = [5, 2, 7, 1, 3, 6]
    slots = torch.tensor([table[p // block_size] * block_size + p % block_size for p in range(seq_len)])
    key_cache = torch.zeros(8, block_size, kv_heads, dim)
    value_cache = torch.zeros(8, block_size, kv_heads, dim)
    outputs = []
    for start, end in [(0, 9), (9, 10), (10, 23)]:
        reshape_and_cache(k[start:end], v[start:end], key_cache, value_cache, slots[start:end])
        outputs.append(paged_prefill_attention(q[start:end], key_cache, value_cache, torch.tensor(table), end, 0.35))
    expected = dense_attention(q, k, v, 0.35, 0)
    torch.testing.assert_close(torch.cat(outputs).double(), expected, atol=1e-5, rtol=1e-5)


def test_decode_and_prefill_agree_on_the_last_token():
    cache = PagedCache([19], num_kv_heads=2, head_dim=8, block_size=4, dtype=torch.float32)
    query = torch.randn(1, 4, 8, generator=torch.Generator().manual_seed(5))
    table = torch.tensor(cache.tables[0])
    decode = paged_decode_attention(query, cache.key_cache, cache.value_cache, table[None, :], torch.tensor([19]), 0.3)
    prefill = paged_prefill_attention(query, cache.key_cache, cache.value_cache, table, 19, 0.3)
    torch.testing.assert_close(decode, prefill, atol=1e-6, rtol=1e-6)


# Windows smaller than a block, not a multiple of the block size (4), equal to a context, larger than all.
WINDOWS = [1, 3, 6, 8, 17, 100]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("soft_cap", [None, 0.5])
@pytest.mark.parametrize("sliding_window", WINDOWS)
def test_paged_decode_with_a_window_and_soft_cap_matches_dense(dtype, sliding_window, soft_cap):
    head_dim, seq_lens, block_size = 16, [1, 5, 16, 17, 40], 4
    cache = PagedCache(seq_lens, 2, head_dim, block_size, dtype)
    for seq, seq_len in enumerate(seq_lens):
        cache.poison_before(seq, seq_len - sliding_window)
    query = torch.randn(len(seq_lens), 8, head_dim, generator=torch.Generator().manual_seed(1)).to(dtype)
    out = paged_decode_attention(query, cache.key_cache, cache.value_cache, cache.padded_tables(),
                                 torch.tensor(seq_lens), 1.0, sliding_window=sliding_window, logits_soft_cap=soft_cap)
    for i, seq_len in enumerate(seq_lens):
        expected = dense_attention(query[i:i + 1], cache.keys[i], cache.values[i], 1.0, seq_len - 1,
                                   sliding_window, soft_cap)[0]
        torch.testing.assert_close(out[i].double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_the_window_and_the_soft_cap_change_the_result():
    """Guards the tests above: scale 1 and a cap of 0.5 cap most scores; a window of 17 cuts a context of 40."""
    cache = PagedCache([40], 2, 16, 4, torch.float32)
    query = torch.randn(1, 8, 16, generator=torch.Generator().manual_seed(1))
    args = (query, cache.key_cache, cache.value_cache, cache.padded_tables(), torch.tensor([40]), 1.0)
    plain = paged_decode_attention(*args)
    assert not torch.allclose(plain, paged_decode_attention(*args, sliding_window=17), atol=1e-3)
    assert not torch.allclose(plain, paged_decode_attention(*args, logits_soft_cap=0.5), atol=1e-3)
    torch.testing.assert_close(plain, paged_decode_attention(*args, sliding_window=40))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("soft_cap", [None, 0.5])
@pytest.mark.parametrize("sliding_window", WINDOWS)
@pytest.mark.parametrize("seq_len, query_len", [(13, 13), (40, 1), (40, 16), (40, 40)])
def test_paged_prefill_with_a_window_and_soft_cap_matches_dense(dtype, seq_len, query_len, sliding_window, soft_cap):
    cache = PagedCache([seq_len], 2, 16, 4, dtype, seed=seq_len)
    cache.poison_before(0, seq_len - query_len - sliding_window + 1)  # behind the first query's window
    query = torch.randn(query_len, 4, 16, generator=torch.Generator().manual_seed(3)).to(dtype)
    table = torch.tensor(cache.tables[0] + [0, 0])
    out = paged_prefill_attention(query, cache.key_cache, cache.value_cache, table, seq_len, 0.7,
                                  sliding_window=sliding_window, logits_soft_cap=soft_cap)
    expected = dense_attention(query, cache.keys[0], cache.values[0], 0.7, seq_len - query_len, sliding_window,
                               soft_cap)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("soft_cap", [None, 0.5])
@pytest.mark.parametrize("sliding_window", [None, *WINDOWS])
@pytest.mark.parametrize("query_lens", [[1, 3, 2, 4], [20, 3, 1, 7]], ids=["short-at-once", "one-by-one"])
def test_varlen_prefill_with_a_window_equals_each_sequence_alone(query_lens, sliding_window, soft_cap):
    """Short chunks take the batched path, longer ones a loop: both give each sequence's own attention."""
    seq_lens = [22, 3, 9, 40]
    cache = PagedCache(seq_lens, 2, 8, 4, torch.float32)
    for seq, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        if sliding_window is not None:
            cache.poison_before(seq, seq_len - query_len - sliding_window + 1)
    query = torch.randn(sum(query_lens), 4, 8, generator=torch.Generator().manual_seed(6))
    starts = torch.tensor([0, *query_lens]).cumsum(0)
    tables = cache.padded_tables()
    out = varlen_paged_prefill_attention(query, cache.key_cache, cache.value_cache, tables, torch.tensor(seq_lens),
                                         starts, 0.5, max(query_lens), sliding_window=sliding_window,
                                         logits_soft_cap=soft_cap)
    for seq, (seq_len, query_len) in enumerate(zip(seq_lens, query_lens)):
        expected = dense_attention(query[starts[seq]:starts[seq + 1]], cache.keys[seq], cache.values[seq], 0.5,
                                   seq_len - query_len, sliding_window, soft_cap)
        torch.testing.assert_close(out[starts[seq]:starts[seq + 1]].double(), expected, atol=1e-5, rtol=1e-5)


def test_gather_kv_from_a_start_reads_no_block_before_it():
    cache = PagedCache([11], num_kv_heads=2, head_dim=4, block_size=4, dtype=torch.float32)
    cache.poison_before(0, 8)
    table = torch.tensor(cache.tables[0])
    assert torch.equal(gather_kv(cache.key_cache, table, 11, start=9), cache.keys[0][9:])
    assert torch.equal(gather_kv(cache.value_cache, table, 10, start=8), cache.values[0][8:10])
