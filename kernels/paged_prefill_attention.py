"""Paged prefill attention in Triton: every prefill chunk of a step in one launch (varlen).

Drop-in for `kernels.paged_attention_ref.varlen_paged_prefill_attention`. Sequence i's chunk is rows
`query_start_loc[i]:query_start_loc[i + 1]` of `query`, the last tokens of its first `seq_lens[i]`;
it attends causally to everything cached before it (a prefix-cache hit or earlier chunks) and to
itself, so its own K/V must already be in the cache. Flash-attention style: each program takes a
tile of one chunk's queries times all query heads of one KV head (so each K/V byte is read once per
group) and runs an online softmax in float32 over K/V tiles gathered through the block table; a
tile may span several blocks, so any block size works. Rows outside the chunks are left untouched.
With a sliding window the K/V loop starts at the window of the tile's first query (later rows mask
what lies before theirs), so no block behind it is read. On the CPU it runs under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.paged_decode_attention import apply_soft_cap

TILE_N = 64  # keys per step of the online softmax
LOG2E = 1.4426950408889634  # scores in log2 units: exp2 is the GPU's native exponential


@triton.jit
def _prefill_kernel(
    out_ptr, q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, seq_lens_ptr, query_start_loc_ptr, qk_scale,
    window, soft_cap, stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ct, stride_ch, stride_bt,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, HEAD_DIM: tl.constexpr,
    HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, SLIDING: tl.constexpr,
    SOFT_CAP: tl.constexpr,
):
    seq = tl.program_id(0)
    q_tile = tl.program_id(1)
    kv_head = tl.program_id(2)
    chunk_start = tl.load(query_start_loc_ptr + seq)
    query_len = tl.load(query_start_loc_ptr + seq + 1) - chunk_start
    if q_tile * BLOCK_Q >= query_len:  # the grid fits the longest chunk
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - query_len

    rows = tl.arange(0, BLOCK_M)  # BLOCK_Q query tokens times GROUP heads, then padding
    q_index = q_tile * BLOCK_Q + rows // GROUP  # within the chunk
    heads = kv_head * GROUP + rows % GROUP
    row_mask = (rows < BLOCK_Q * GROUP) & (q_index < query_len)
    # Padded rows take the last query's place, so no row sees no key (all -inf).
    query_pos = context_len + tl.minimum(q_index, query_len - 1)
    dims = tl.arange(0, HEAD_DIM_PAD)
    dim_mask = dims < HEAD_DIM
    q_rows = (chunk_start + q_index).to(tl.int64)
    q = tl.load(q_ptr + (q_rows * stride_qt + heads * stride_qh)[:, None] + dims[None, :],
                mask=row_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], tl.float32)
    offsets = tl.arange(0, TILE_N)
    kv_end = context_len + tl.minimum((q_tile + 1) * BLOCK_Q, query_len)  # past the tile's last query
    start = 0
    if SLIDING:  # the window of the tile's first query
        start = tl.maximum(context_len + q_tile * BLOCK_Q - window + 1, 0)
    while start < kv_end:  # `while`, not `range`: the interpreter cannot range over a loaded bound
        tokens = start + offsets
        token_mask = tokens < kv_end
        block_ids = tl.load(block_tables_ptr + seq * stride_bt + tokens // BLOCK_SIZE, mask=token_mask, other=0)
        kv_offsets = (block_ids.to(tl.int64) * stride_cb + (tokens % BLOCK_SIZE) * stride_ct
                      + kv_head * stride_ch)[:, None] + dims[None, :]
        kv_mask = token_mask[:, None] & dim_mask[None, :]
        k = tl.load(k_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offsets, mask=kv_mask, other=0.0)

        scores = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * qk_scale  # log2 units
        if SOFT_CAP:  # c * tanh(s / c) in log2 units is the same with c in log2 units
            scores = apply_soft_cap(scores, soft_cap)
        visible = token_mask[None, :] & (tokens[None, :] <= query_pos[:, None])
        if SLIDING:
            visible &= tokens[None, :] > query_pos[:, None] - window
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, axis=1))
        correction = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * correction + tl.sum(p, axis=1)
        acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
        m_i = m_new
        start += TILE_N

    out = acc / l_i[:, None]
    tl.store(out_ptr + (q_rows * stride_ot + heads * stride_oh)[:, None] + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & dim_mask[None, :])


def paged_prefill_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            scale: float, max_query_len: int, out: torch.Tensor | None = None,
                            sliding_window: int | None = None, logits_soft_cap: float | None = None) -> torch.Tensor:
    """query `[num_tokens, num_heads, head_dim]`; caches `[num_blocks, block_size, num_kv_heads, head_dim]`;
    block_tables `[num_seqs, max_blocks]`, seq_lens `[num_seqs]`, query_start_loc `[num_seqs + 1]` (rows
    of `query`; need not start at 0); `max_query_len` bounds the chunk lengths (sizes the grid, no sync)."""
    num_heads, head_dim = query.shape[1:]
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    num_seqs = seq_lens.shape[0]
    if num_seqs == 0 or max_query_len == 0:
        return out
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    assert query.stride(-1) == 1 and out.stride(-1) == 1 and block_tables.stride(-1) == 1
    # A tile holds BLOCK_M // group query tokens; no wider than the longest chunk needs.
    block_m = max(16, triton.next_power_of_2(group), min(128, triton.next_power_of_2(max_query_len * group)))
    block_q = block_m // group
    head_dim_pad = max(16, triton.next_power_of_2(head_dim))
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        out, query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale * LOG2E, sliding_window or 0,
        (logits_soft_cap or 0.0) * LOG2E, query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0), GROUP=group,
        BLOCK_M=block_m, BLOCK_Q=block_q, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_SIZE=block_size,
        TILE_N=TILE_N, SLIDING=sliding_window is not None, SOFT_CAP=logits_soft_cap is not None,
        num_warps=8 if block_m * head_dim_pad >= 128 * 128 else 4,
    )
    return out
