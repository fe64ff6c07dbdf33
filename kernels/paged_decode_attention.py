"""Paged decode attention in Triton: one query token per sequence over its paged K/V.

Drop-in for `kernels.paged_attention_ref.paged_decode_attention` (same arguments, same result).
One program per (sequence, KV head) serves the whole group of query heads that share the head, so
each K/V byte is read once; tokens are visited in tiles that may span several blocks (any block
size works), with an online softmax in float32. On the CPU it runs under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, scale,
    stride_qb, stride_qh, stride_ob, stride_oh, stride_cb, stride_ct, stride_ch, stride_bt,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)

    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_mask = heads < GROUP
    dim_mask = dims < HEAD_DIM
    q_offsets = seq * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=head_mask[:, None] & dim_mask[None, :], other=0.0).to(tl.float32)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    offsets = tl.arange(0, TILE)
    start = 0
    while start < seq_len:  # `while`, not `range`: the interpreter cannot range over a loaded bound
        tokens = start + offsets
        token_mask = tokens < seq_len
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + tokens // BLOCK_SIZE, mask=token_mask, other=0)
        kv_offsets = (block_ids.to(tl.int64) * stride_cb + (tokens % BLOCK_SIZE) * stride_ct
                      + kv_head * stride_ch)[:, None] + dims[None, :]
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0).to(tl.float32)

        scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale  # [GROUP_PAD, TILE]
        scores = tl.where(token_mask[None, :], scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        correction = tl.exp(m_i - m_new)
        p = tl.exp(scores - m_new[:, None])
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m_i = m_new
        start += TILE

    out = acc / l_i[:, None]
    out_offsets = seq * stride_ob + (kv_head * GROUP + heads)[:, None] * stride_oh + dims[None, :]
    tl.store(out_ptr + out_offsets, out.to(out_ptr.dtype.element_ty), mask=head_mask[:, None] & dim_mask[None, :])


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """query `[batch, num_heads, head_dim]`; caches `[num_blocks, block_size, num_kv_heads, head_dim]`;
    every sequence must have at least one cached token."""
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    assert query.stride(-1) == 1 and out.stride(-1) == 1
    tile = max(16, block_size) if query.device.type == "cpu" else max(64, block_size)
    _paged_decode_kernel[(batch, num_kv_heads)](
        out, query, key_cache, value_cache, block_tables, seq_lens, scale,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_PAD=triton.next_power_of_2(group), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size, TILE=tile,
    )
    return out
