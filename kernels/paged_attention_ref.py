"""Paged attention in plain torch: the CPU path and the reference for the Triton kernels.

Cache layout (vLLM's flash layout): `[num_blocks, block_size, num_kv_heads, head_dim]` for K and V.
A sequence's KV lives in the blocks its block table lists, in order; slot = block_id * block_size
+ offset. Grouped-query attention lets each K/V head serve its group of query heads
(`enable_gqa`), so K and V are never repeated.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor,
                      value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Write each token's K and V (`[num_tokens, num_kv_heads, head_dim]`) into its cache slot."""
    num_kv_heads, head_dim = key.shape[1:]
    key_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, key)
    value_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, value)


def gather_blocks(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """The listed blocks, in order, as `[len(block_ids), block_size, num_kv_heads, head_dim]`.

    `index_select` on a 2-D view is an order of magnitude faster on CPU than advanced indexing.
    """
    rows = cache.view(cache.shape[0], -1).index_select(0, block_ids.flatten())
    return rows.view(-1, *cache.shape[1:])


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first `seq_len` cached tokens as `[seq_len, num_kv_heads, head_dim]`."""
    num_blocks = -(-seq_len // cache.shape[1])
    return gather_blocks(cache, block_table[:num_blocks]).flatten(0, 1)[:seq_len]


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence (`query`: `[batch, num_heads, head_dim]`) over its whole context.

    `block_tables` is `[batch, max_blocks]`, padded with any valid block id; `seq_lens` counts the
    context including the query token, whose KV must already be in the cache.
    """
    batch, max_blocks = block_tables.shape
    shape = (batch, max_blocks * key_cache.shape[1], *key_cache.shape[2:])
    keys = gather_blocks(key_cache, block_tables).view(shape).transpose(1, 2)  # [batch, kv_heads, len, dim]
    values = gather_blocks(value_cache, block_tables).view(shape).transpose(1, 2)
    positions = torch.arange(keys.shape[2], device=query.device)
    valid = (positions[None, :] < seq_lens[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(query.unsqueeze(2), keys, values, attn_mask=valid, scale=scale,
                                         enable_gqa=True)
    return out.squeeze(2)


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
    """A chunk of `query_len` tokens of one sequence (the last ones of its first `seq_len`), causal,
    attending to everything cached before it (a prefix-cache hit or earlier chunks)."""
    query_len = query.shape[0]
    # 4-D inputs take torch's fused CPU kernel, several times faster than 3-D ones.
    keys = gather_kv(key_cache, block_table, seq_len).transpose(0, 1)[None]  # [1, kv_heads, seq_len, head_dim]
    values = gather_kv(value_cache, block_table, seq_len).transpose(0, 1)[None]
    q = query.transpose(0, 1)[None]
    if query_len == seq_len:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale, enable_gqa=True)
    else:
        query_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale, enable_gqa=True)
    return out[0].transpose(0, 1)


SHORT_QUERY_LEN = 16  # speculative verification (a few tokens per sequence): one batched call, as decodes


def _short_queries_at_once(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                           max_query_len: int, out: torch.Tensor) -> torch.Tensor:
    """Many short chunks in one attention call (a loop of per-sequence calls costs more than the
    math at this size): queries padded to `max_query_len`, each row masked to its own causal context."""
    num_seqs, block_size = len(seq_lens), key_cache.shape[1]
    starts = query_start_loc.to(torch.long)
    query_lens = starts[1:] - starts[:-1]
    lens = seq_lens.to(torch.long)
    max_len = int(lens.max())
    tables = block_tables[:, :-(-max_len // block_size)]
    shape = (num_seqs, tables.shape[1] * block_size, *key_cache.shape[2:])
    # Slots past a sequence's end hold anything (NaN in a poisoned test cache): zeroed, since a masked
    # weight of 0 times NaN is still NaN.
    in_sequence = (torch.arange(shape[1], device=query.device)[None, :] < lens[:, None])[:, None, :, None]
    keys = gather_blocks(key_cache, tables).view(shape).transpose(1, 2).where(in_sequence, 0.0)  # [seqs, kv_heads, len, dim]
    values = gather_blocks(value_cache, tables).view(shape).transpose(1, 2).where(in_sequence, 0.0)
    slot = torch.arange(max_query_len, device=query.device)
    real = slot[None, :] < query_lens[:, None]  # [seqs, max_query_len]
    rows = (starts[:-1, None] + slot[None, :]).clamp(max=query.shape[0] - 1)
    padded = query[rows.flatten()].view(num_seqs, max_query_len, *query.shape[1:]).transpose(1, 2)
    query_pos = lens[:, None] - query_lens[:, None] + slot[None, :]  # each row's position in its sequence
    mask = torch.arange(keys.shape[2], device=query.device)[None, None, :] <= query_pos[:, :, None]
    mask &= real[:, :, None]
    mask[:, :, 0] |= ~real  # padded rows see one key, so no row is all -inf (their output is dropped)
    result = F.scaled_dot_product_attention(padded, keys, values, attn_mask=mask[:, None], scale=scale,
                                            enable_gqa=True).transpose(1, 2)  # [seqs, max_query_len, heads, dim]
    out[rows[real]] = result[real]
    return out


def varlen_paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                   query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Several sequences' prefill chunks, laid out as the Triton kernel takes them: sequence i's
    queries are rows `query_start_loc[i]:query_start_loc[i + 1]` of `query`, and only those rows of
    `out` are written. `max_query_len` sizes the kernel's grid; a loop needs no such bound."""
    if out is None:
        out = torch.empty_like(query)
    if max_query_len <= SHORT_QUERY_LEN and len(seq_lens) > 1:
        return _short_queries_at_once(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                                      max_query_len, out)
    starts = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[seq], starts[seq + 1]
        out[start:end] = paged_prefill_attention(query[start:end], key_cache, value_cache, block_tables[seq],
                                                 seq_len, scale)
    return out
