"""Paged decode attention in Triton: one query token per sequence over its paged K/V.

Drop-in for `kernels.paged_attention_ref.paged_decode_attention` (same arguments, same result).
Flash-decoding: the context of each (sequence, KV head) is split into chunks that run as separate
programs (so a small batch still fills the GPU), each with an online softmax in float32 over tiles
that may span several blocks (any block size works). The chunks are merged by whichever of their
programs finishes last (a counter per sequence and KV head says which), and a context that is one
chunk is written straight out: one launch per layer, not a second merge kernel, which batch-1
decoding paid ~2 us a layer for. All query heads sharing a KV head are served by one program, so
each K/V byte is read once.
The split count is fixed at launch from an upper bound of the context lengths; each sequence cuts
its own context into that many chunks of at least `MIN_TILES_PER_SPLIT` tiles, so the programs
a short sequence does not need exit at once. A CUDA graph can therefore launch it sized for
`max_model_len` and replay it for any lengths. With a sliding window the context is the window:
the chunks start at its first token, so a long sequence costs window-sized work and the blocks
behind the window (which the KV cache manager may have given away) are never read.
On the CPU it runs under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MIN_TILES_PER_SPLIT = 4
COUNTERS_AT_LEAST = 1 << 16  # 1,024 sequences x 64 KV heads before the buffer must grow
PIPELINE_STAGES = 3  # K/V tiles in flight per program (H200, batch 64 x 4096: 96% of copy bandwidth; 79% without)


@triton.jit
def apply_soft_cap(scores, cap):
    """cap * tanh(scores / cap), from the exponential of a non-positive number: no overflow for any score."""
    decay = tl.exp(-2.0 * tl.abs(scores) / cap)
    capped = cap * (1.0 - decay) / (1.0 + decay)
    return tl.where(scores < 0, -capped, capped)


@triton.jit
def _attend_tile(start, chunk_end, q, m_i, l_i, acc, k_head_ptr, v_head_ptr, table_ptr, scale, soft_cap, stride_cb,
                 stride_ct, dims, dim_mask, BLOCK_SIZE: tl.constexpr, TILE: tl.constexpr, SOFT_CAP: tl.constexpr):
    """Folds the TILE context tokens from `start` into the online softmax state (m_i, l_i, acc)."""
    tokens = start + tl.arange(0, TILE)
    token_mask = tokens < chunk_end
    block_ids = tl.load(table_ptr + tokens // BLOCK_SIZE, mask=token_mask, other=0)
    kv_offsets = (block_ids.to(tl.int64) * stride_cb + (tokens % BLOCK_SIZE) * stride_ct)[:, None] + dims[None, :]
    kv_mask = token_mask[:, None] & dim_mask[None, :]
    k = tl.load(k_head_ptr + kv_offsets, mask=kv_mask, other=0.0)
    v = tl.load(v_head_ptr + kv_offsets, mask=kv_mask, other=0.0)

    scores = tl.dot(q, tl.trans(k), input_precision="ieee").to(tl.float32) * scale  # [GROUP_PAD, TILE]
    if SOFT_CAP:
        scores = apply_soft_cap(scores, soft_cap)
    scores = tl.where(token_mask[None, :], scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    correction = tl.exp(m_i - m_new)
    p = tl.exp(scores - m_new[:, None])
    l_i = l_i * correction + tl.sum(p, axis=1)
    acc = acc * correction[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee").to(tl.float32)
    return m_new, l_i, acc


@triton.jit
def _paged_decode_kernel(
    out_ptr, partial_out_ptr, partial_max_ptr, partial_sum_ptr, counters_ptr, q_ptr, k_cache_ptr, v_cache_ptr,
    block_tables_ptr, seq_lens_ptr, scale, window, soft_cap,
    stride_ob, stride_oh, stride_qb, stride_qh, stride_cb, stride_ct, stride_ch, stride_bt,
    NUM_HEADS: tl.constexpr, NUM_KV_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    TILE: tl.constexpr, MIN_TILES: tl.constexpr, PIPELINED: tl.constexpr, NUM_STAGES: tl.constexpr,
    SLIDING: tl.constexpr, SOFT_CAP: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    context_start = 0
    if SLIDING:  # the query (at seq_len - 1) sees its last `window` tokens
        context_start = tl.maximum(seq_len - window, 0)
    chunk_len = tl.maximum(tl.cdiv(tl.cdiv(seq_len - context_start, NUM_SPLITS), TILE), MIN_TILES) * TILE
    num_chunks = tl.cdiv(seq_len - context_start, chunk_len)  # this sequence's; the other programs have none
    chunk_start = context_start + split * chunk_len
    chunk_end = tl.minimum(chunk_start + chunk_len, seq_len)  # an empty range for a program past them

    heads = tl.arange(0, GROUP_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    head_mask = heads < GROUP
    dim_mask = dims < HEAD_DIM
    q_offsets = seq * stride_qb + (kv_head * GROUP + heads)[:, None] * stride_qh + dims[None, :]
    q = tl.load(q_ptr + q_offsets, mask=head_mask[:, None] & dim_mask[None, :], other=0.0)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    k_head_ptr = k_cache_ptr + kv_head * stride_ch
    v_head_ptr = v_cache_ptr + kv_head * stride_ch
    table_ptr = block_tables_ptr + seq * stride_bt
    if PIPELINED:  # compiled: a `for` loop, which Triton pipelines (the next tiles' K/V loads in flight)
        for start in tl.range(chunk_start, chunk_end, TILE, num_stages=NUM_STAGES):
            m_i, l_i, acc = _attend_tile(start, chunk_end, q, m_i, l_i, acc, k_head_ptr, v_head_ptr, table_ptr,
                                         scale, soft_cap, stride_cb, stride_ct, dims, dim_mask, BLOCK_SIZE, TILE,
                                         SOFT_CAP)
    else:  # the interpreter cannot range over a loaded bound
        start = chunk_start
        while start < chunk_end:
            m_i, l_i, acc = _attend_tile(start, chunk_end, q, m_i, l_i, acc, k_head_ptr, v_head_ptr, table_ptr,
                                         scale, soft_cap, stride_cb, stride_ct, dims, dim_mask, BLOCK_SIZE, TILE,
                                         SOFT_CAP)
            start += TILE

    out_offsets = seq * stride_ob + (kv_head * GROUP + heads)[:, None] * stride_oh + dims[None, :]
    out_mask = head_mask[:, None] & dim_mask[None, :]
    first_row = (seq * NUM_HEADS + kv_head * GROUP + heads) * NUM_SPLITS
    if NUM_SPLITS == 1:  # a launch of one split (a large batch): every context is one chunk
        _store_softmax_output(out_ptr + out_offsets, acc, l_i, out_mask)
    elif num_chunks == 1:
        if split == 0:  # the whole context was this program's: the answer, no merge
            _store_softmax_output(out_ptr + out_offsets, acc, l_i, out_mask)
    elif split < num_chunks:
        tl.store(partial_max_ptr + first_row + split, m_i, mask=head_mask)
        tl.store(partial_sum_ptr + first_row + split, l_i, mask=head_mask)
        tl.store(partial_out_ptr + (first_row + split)[:, None] * HEAD_DIM + dims[None, :], acc, mask=out_mask)
        # Every thread's stores are done (the barrier) before one thread releases them with the
        # count; the program that counts last acquires them all and merges (CUTLASS's semaphore).
        tl.debug_barrier()
        counter = counters_ptr + seq * NUM_KV_HEADS + kv_head
        if tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == num_chunks - 1:
            tl.store(counter, 0)  # ready for the next launch: kernel boundaries order it
            _merge_chunks(out_ptr + out_offsets, out_mask, partial_out_ptr, partial_max_ptr, partial_sum_ptr,
                          first_row, head_mask, dims, num_chunks, NUM_SPLITS, GROUP_PAD, HEAD_DIM, HEAD_DIM_PAD)


@triton.jit
def _store_softmax_output(out_ptrs, acc, l_i, mask):
    tl.store(out_ptrs, (acc / l_i[:, None]).to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _merge_chunks(out_ptrs, out_mask, partial_out_ptr, partial_max_ptr, partial_sum_ptr, first_rows, head_mask, dims,
                  num_chunks, NUM_SPLITS: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                  HEAD_DIM_PAD: tl.constexpr):
    """The chunks' online-softmax states, folded in order. Read through L2 (.cg): other SMs wrote them."""
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM_PAD], tl.float32)
    for chunk in range(0, NUM_SPLITS):
        mask = head_mask & (chunk < num_chunks)
        rows = first_rows + chunk
        m_c = tl.load(partial_max_ptr + rows, mask=mask, other=float("-inf"), cache_modifier=".cg")
        l_c = tl.load(partial_sum_ptr + rows, mask=mask, other=0.0, cache_modifier=".cg")
        acc_c = tl.load(partial_out_ptr + rows[:, None] * HEAD_DIM + dims[None, :], mask=out_mask & mask[:, None],
                        other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_i, m_c)
        m_safe = tl.where(m_new > float("-inf"), m_new, 0.0)  # padded heads stay at -inf: no NaN from -inf - -inf
        old, new = tl.exp(m_i - m_safe), tl.exp(m_c - m_safe)
        l_i = l_i * old + l_c * new
        acc = acc * old[:, None] + acc_c * new[:, None]
        m_i = m_new
    _store_softmax_output(out_ptrs, acc, l_i, out_mask)


_counters: dict[torch.device, list[torch.Tensor]] = {}


def split_counters(device: torch.device, count: int) -> torch.Tensor:
    """At least `count` zeroed int32 counters of finished chunks, one per (sequence, KV head), kept
    for the process: each launch leaves them at zero again, so a CUDA graph replays with the same
    buffer. Made outside graph capture (the engine's eager warm-up of each size comes first). A larger
    need makes a larger buffer; the smaller ones stay allocated, as graphs captured with them read them."""
    made = _counters.setdefault(device, [])
    if not made or made[-1].numel() < count:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("paged decode attention's split counters must be made before graph capture")
        made.append(torch.zeros(max(count, COUNTERS_AT_LEAST), dtype=torch.int32, device=device))
    return made[-1]


def num_splits_for(batch: int, num_kv_heads: int, max_seq_len: int, tile: int) -> int:
    """Enough chunks to give the GPU ~1024 programs, none shorter than MIN_TILES_PER_SPLIT tiles."""
    wanted = max(1, 1024 // max(1, batch * num_kv_heads))
    return max(1, min(wanted, -(-max_seq_len // (MIN_TILES_PER_SPLIT * tile)), 64))


def paged_decode_attention(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, max_seq_len: int | None = None,
                           sliding_window: int | None = None, logits_soft_cap: float | None = None) -> torch.Tensor:
    """query `[batch, num_heads, head_dim]`; caches `[num_blocks, block_size, num_kv_heads, head_dim]`;
    every sequence must have at least one cached token. `max_seq_len`, an upper bound of `seq_lens`,
    sizes the launch: pass it to avoid a device sync (a CUDA graph passes `max_model_len`)."""
    batch, num_heads, head_dim = query.shape
    _, block_size, num_kv_heads, _ = key_cache.shape
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    if batch == 0:
        return out
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    assert query.stride(-1) == 1 and out.stride(-1) == 1
    if max_seq_len is None:
        max_seq_len = int(seq_lens.max())
    if sliding_window is not None:  # no sequence attends to more
        max_seq_len = min(max_seq_len, sliding_window)
    tile = max(64, block_size)
    num_splits = num_splits_for(batch, num_kv_heads, max_seq_len, tile)
    rows = batch * num_heads * num_splits if num_splits > 1 else 0  # one split: written straight to `out`
    partial_out = torch.empty(rows, head_dim, dtype=torch.float32, device=query.device)
    partial_max = torch.empty(rows, dtype=torch.float32, device=query.device)
    partial_sum = torch.empty(rows, dtype=torch.float32, device=query.device)
    counters = split_counters(query.device, batch * num_kv_heads) if num_splits > 1 else partial_max
    _paged_decode_kernel[(batch, num_kv_heads, num_splits)](
        out, partial_out, partial_max, partial_sum, counters, query, key_cache, value_cache, block_tables, seq_lens,
        scale, sliding_window or 0, logits_soft_cap or 0.0, out.stride(0), out.stride(1), query.stride(0),
        query.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, NUM_KV_HEADS=num_kv_heads, NUM_SPLITS=num_splits, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        HEAD_DIM_PAD=max(16, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size, TILE=tile,
        MIN_TILES=MIN_TILES_PER_SPLIT, PIPELINED=query.is_cuda, NUM_STAGES=PIPELINE_STAGES,
        SLIDING=sliding_window is not None, SOFT_CAP=logits_soft_cap is not None,
    )
    return out
