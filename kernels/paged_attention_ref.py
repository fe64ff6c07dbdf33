"""Paged attention in plain torch: the CPU path and the reference for the Triton kernels.

Cache layout (vLLM's flash layout): `[num_blocks, block_size, num_kv_heads, head_dim]` for K and V.
A sequence's KV lives in the blocks its block table lists, in order; slot = block_id * block_size
+ offset. Grouped-query attention lets each K/V head serve its group of query heads
(`enable_gqa`), so K and V are never repeated.

Two per-layer options, with the semantics of transformers and vLLM:
- `sliding_window` W: the query at position p sees the keys at positions p - W + 1 .. p (W tokens,
  itself included; transformers' `kv_idx > q_idx - sliding_window`). Blocks wholly before a
  query's window are never read: the KV cache manager may have given them to another request.
- `logits_soft_cap` c (Gemma 2): the scaled scores s become c * tanh(s / c) before the mask and the
  softmax.
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


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int, start: int = 0) -> torch.Tensor:
    """One sequence's cached tokens `start .. seq_len - 1` as `[seq_len - start, num_kv_heads, head_dim]`;
    the blocks before `start`'s are not read."""
    block_size = cache.shape[1]
    first_block = start // block_size
    blocks = gather_blocks(cache, block_table[first_block:-(-seq_len // block_size)]).flatten(0, 1)
    return blocks[start - first_block * block_size:seq_len - first_block * block_size]


def window_start(query_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """The first key position each query at `query_pos` sees."""
    if sliding_window is None:
        return torch.zeros_like(query_pos)
    return (query_pos - sliding_window + 1).clamp(min=0)


def visible_keys(query_pos: torch.Tensor, key_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """`[..., query_len, key_len]`: which keys each query sees (causal, within its window)."""
    mask = key_pos[..., None, :] <= query_pos[..., :, None]
    if sliding_window is not None:
        mask &= key_pos[..., None, :] > query_pos[..., :, None] - sliding_window
    return mask


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
           logits_soft_cap: float | None, is_causal: bool = False) -> torch.Tensor:
    """q `[batch, heads, query_len, dim]`, keys/values `[batch, kv_heads, key_len, dim]`, mask broadcastable
    to `[batch, 1, query_len, key_len]` (True: visible). Soft-capping needs the scores themselves,
    which SDPA does not expose: then the scores are computed here, per KV-head group."""
    if logits_soft_cap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              enable_gqa=True)
    batch, num_heads, query_len, head_dim = q.shape
    num_kv_heads, key_len = keys.shape[1], keys.shape[2]
    if is_causal:
        mask = torch.ones(query_len, key_len, dtype=torch.bool, device=q.device).tril()
    grouped = q.reshape(batch, num_kv_heads, num_heads // num_kv_heads, query_len, head_dim)
    scores = (grouped.float() @ keys.float().unsqueeze(2).transpose(-1, -2)) * scale
    scores = logits_soft_cap * torch.tanh(scores / logits_soft_cap)
    scores = scores.masked_fill(~mask.expand(batch, 1, query_len, key_len).unsqueeze(2), float("-inf"))
    out = torch.softmax(scores, dim=-1) @ values.float().unsqueeze(2)
    return out.reshape(batch, num_heads, query_len, head_dim).to(q.dtype)


def _gather_windows(cache: torch.Tensor, block_tables: torch.Tensor, first_block: torch.Tensor | None,
                    width: int) -> torch.Tensor:
    """Sequence i's `width` blocks from `first_block[i]` on (from its first when `first_block` is None) as
    `[batch, kv_heads, width * block_size, head_dim]`. Columns past the table repeat its last."""
    if first_block is None:
        block_tables = block_tables[:, :width]
    else:
        columns = (first_block[:, None] + torch.arange(width, device=block_tables.device)).clamp(
            max=block_tables.shape[1] - 1)
        block_tables = block_tables.gather(1, columns.to(torch.long))
    shape = (block_tables.shape[0], width * cache.shape[1], *cache.shape[2:])
    return gather_blocks(cache, block_tables).view(shape).transpose(1, 2)


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, max_seq_len: int | None = None,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None) -> torch.Tensor:
    """One query token per sequence (`query`: `[batch, num_heads, head_dim]`) over its context.

    `block_tables` is `[batch, max_blocks]`, padded with any valid block id; `seq_lens` counts the
    context including the query token, whose KV must already be in the cache. `max_seq_len` sizes
    the Triton kernel's launch; a loop needs no such bound.
    """
    batch, max_blocks = block_tables.shape
    block_size = key_cache.shape[1]
    first_block, width = None, max_blocks
    lens = seq_lens.to(torch.long)[:, None]
    if sliding_window is not None:  # each sequence's window only, at most this many blocks
        first_block = window_start(lens[:, 0] - 1, sliding_window) // block_size
        width = min(max_blocks, -(-(sliding_window - 1) // block_size) + 1)
    keys = _gather_windows(key_cache, block_tables, first_block, width)  # [batch, kv_heads, len, dim]
    values = _gather_windows(value_cache, block_tables, first_block, width)
    positions = torch.arange(keys.shape[2], device=query.device)[None, :]
    if first_block is not None:
        positions = positions + first_block[:, None] * block_size
    valid = positions < lens
    if sliding_window is not None:
        valid &= positions >= lens - sliding_window
        # Slots outside the window hold anything (another request's KV): 0 * NaN would still be NaN.
        keys = keys.where(valid[:, None, :, None], 0.0)
        values = values.where(valid[:, None, :, None], 0.0)
    result = attend(query.unsqueeze(2), keys, values, valid[:, None, None, :], scale, logits_soft_cap).squeeze(2)
    if out is None:
        return result
    return out.copy_(result)


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_len: int, scale: float, sliding_window: int | None = None,
                            logits_soft_cap: float | None = None) -> torch.Tensor:
    """A chunk of `query_len` tokens of one sequence (the last ones of its first `seq_len`), causal,
    attending to everything cached before it (a prefix-cache hit or earlier chunks) in its window."""
    query_len = query.shape[0]
    first_query = seq_len - query_len
    first_key = 0 if sliding_window is None else max(0, first_query - sliding_window + 1)
    # 4-D inputs take torch's fused CPU kernel, several times faster than 3-D ones.
    keys = gather_kv(key_cache, block_table, seq_len, first_key).transpose(0, 1)[None]  # [1, kv_heads, len, dim]
    values = gather_kv(value_cache, block_table, seq_len, first_key).transpose(0, 1)[None]
    q = query.transpose(0, 1)[None]
    if query_len == seq_len and (sliding_window is None or sliding_window >= seq_len):
        out = attend(q, keys, values, None, scale, logits_soft_cap, is_causal=True)
    else:
        query_pos = torch.arange(first_query, seq_len, device=query.device)
        key_pos = torch.arange(first_key, seq_len, device=query.device)
        out = attend(q, keys, values, visible_keys(query_pos, key_pos, sliding_window), scale, logits_soft_cap)
    return out[0].transpose(0, 1)


SHORT_QUERY_LEN = 16  # speculative verification (a few tokens per sequence): one batched call, as decodes


def _short_queries_at_once(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                           max_query_len: int, out: torch.Tensor, sliding_window: int | None,
                           logits_soft_cap: float | None) -> torch.Tensor:
    """Many short chunks in one attention call (a loop of per-sequence calls costs more than the
    math at this size): queries padded to `max_query_len`, each row masked to its own causal context."""
    num_seqs, block_size = len(seq_lens), key_cache.shape[1]
    starts = query_start_loc.to(torch.long)
    query_lens = starts[1:] - starts[:-1]
    lens = seq_lens.to(torch.long)
    first_key = window_start(lens - query_lens, sliding_window)  # of each sequence's first query
    first_block, width = None, -(-int(lens.max()) // block_size)
    if sliding_window is not None:
        first_block = first_key // block_size
        width = min(width, -(-(max_query_len + sliding_window - 1) // block_size) + 1)
    keys = _gather_windows(key_cache, block_tables, first_block, width)  # [seqs, kv_heads, len, dim]
    values = _gather_windows(value_cache, block_tables, first_block, width)
    key_pos = torch.arange(keys.shape[2], device=query.device)[None, :]
    if first_block is not None:
        key_pos = key_pos + first_block[:, None] * block_size
    # Slots past a sequence's end (or before its window) hold anything (NaN in a poisoned test cache):
    # zeroed, since a masked weight of 0 times NaN is still NaN.
    in_sequence = (key_pos < lens[:, None]) & (key_pos >= first_key[:, None])
    _zero_slots(keys, ~in_sequence)
    _zero_slots(values, ~in_sequence)
    slot = torch.arange(max_query_len, device=query.device)
    real = slot[None, :] < query_lens[:, None]  # [seqs, max_query_len]
    rows = (starts[:-1, None] + slot[None, :]).clamp(max=query.shape[0] - 1)
    padded = query[rows.flatten()].view(num_seqs, max_query_len, *query.shape[1:]).transpose(1, 2)
    query_pos = lens[:, None] - query_lens[:, None] + slot[None, :]  # each row's position in its sequence
    mask = visible_keys(query_pos, key_pos, sliding_window)  # [seqs, max_query_len, len]
    mask &= real[:, :, None]
    mask[:, :, 0] |= ~real  # padded rows see one key, so no row is all -inf (their output is dropped)
    result = attend(padded, keys, values, mask[:, None], scale, logits_soft_cap).transpose(1, 2)
    out[rows[real]] = result[real]  # [seqs, max_query_len, heads, dim] -> the real rows
    return out


def _zero_slots(gathered: torch.Tensor, slots: torch.Tensor) -> None:
    """Zero, in place, the `slots` ([seqs, len] bool) of KV gathered by `_gather_windows` (a transposed
    view of a fresh `[seqs, len, kv_heads, dim]` tensor): only those rows are written, where a masked
    `where` over the transposed whole cost more than the attention itself."""
    seqs, kv_heads, length, head_dim = gathered.shape
    rows = gathered.transpose(1, 2).view(seqs * length, kv_heads * head_dim)
    rows.index_fill_(0, slots.flatten().nonzero().squeeze(1), 0.0)


def varlen_paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                                   block_tables: torch.Tensor, seq_lens: torch.Tensor,
                                   query_start_loc: torch.Tensor, scale: float, max_query_len: int,
                                   out: torch.Tensor | None = None, sliding_window: int | None = None,
                                   logits_soft_cap: float | None = None) -> torch.Tensor:
    """Several sequences' prefill chunks, laid out as the Triton kernel takes them: sequence i's
    queries are rows `query_start_loc[i]:query_start_loc[i + 1]` of `query`, and only those rows of
    `out` are written. `max_query_len` sizes the kernel's grid; a loop needs no such bound."""
    if out is None:
        out = torch.empty_like(query)
    if max_query_len <= SHORT_QUERY_LEN and len(seq_lens) > 1:
        return _short_queries_at_once(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                                      max_query_len, out, sliding_window, logits_soft_cap)
    starts = query_start_loc.tolist()
    for seq, seq_len in enumerate(seq_lens.tolist()):
        start, end = starts[seq], starts[seq + 1]
        out[start:end] = paged_prefill_attention(query[start:end], key_cache, value_cache, block_tables[seq],
                                                 seq_len, scale, sliding_window, logits_soft_cap)
    return out
