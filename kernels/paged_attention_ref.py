"""Paged attention in plain torch: the CPU path and the reference for the Triton kernels.

Cache layout (vLLM's flash layout): `[num_blocks, block_size, num_kv_heads, head_dim]` for K and V.
A sequence's KV lives in the blocks its block table lists, in order; slot = block_id * block_size
+ offset. Grouped-query attention is done by viewing the query heads as `[num_kv_heads, group]`,
so K and V are never repeated.
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


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """One sequence's first `seq_len` cached tokens as `[seq_len, num_kv_heads, head_dim]`."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    return cache[block_table[:num_blocks]].flatten(0, 1)[:seq_len]


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per sequence (`query`: `[batch, num_heads, head_dim]`) over its whole context.

    `block_tables` is `[batch, max_blocks]`, padded with any valid block id; `seq_lens` counts the
    context including the query token, whose KV must already be in the cache.
    """
    batch, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    group = num_heads // num_kv_heads
    keys = key_cache[block_tables].flatten(1, 2)  # [batch, max_len, kv_heads, head_dim]
    values = value_cache[block_tables].flatten(1, 2)
    max_len = keys.shape[1]
    q = query.view(batch, num_kv_heads, group, head_dim).float()
    scores = torch.matmul(q, keys.permute(0, 2, 3, 1).float()) * scale  # [batch, kv_heads, group, max_len]
    positions = torch.arange(max_len, device=query.device)
    padding = positions[None, :] >= seq_lens[:, None]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, values.permute(0, 2, 1, 3).float())  # [batch, kv_heads, group, head_dim]
    return out.reshape(batch, num_heads, head_dim).to(query.dtype)


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_table: torch.Tensor, seq_len: int, scale: float) -> torch.Tensor:
    """A chunk of `query_len` tokens of one sequence (the last ones of its first `seq_len`), causal,
    attending to everything cached before it (a prefix-cache hit or earlier chunks)."""
    query_len, num_heads, head_dim = query.shape
    num_kv_heads = key_cache.shape[2]
    keys = gather_kv(key_cache, block_table, seq_len).transpose(0, 1)  # [kv_heads, seq_len, head_dim]
    values = gather_kv(value_cache, block_table, seq_len).transpose(0, 1)
    q = query.transpose(0, 1)
    if num_heads != num_kv_heads:
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=0)
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=0)
    if query_len == seq_len:
        out = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale)
    else:
        query_pos = torch.arange(seq_len - query_len, seq_len, device=query.device)
        mask = torch.arange(seq_len, device=query.device)[None, :] <= query_pos[:, None]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)
