"""Token sorting for the fused MoE GEMMs (vLLM's `moe_align_block_size`): group the (token, k) pairs of
a step by expert, each expert's group padded to a multiple of the GEMM's row tile, so every row tile
of the grouped GEMM belongs to one expert.

Three launches, no host sync, buffers sized from the host-known pair count (so CUDA graphs capture
it): per-chunk expert counts; one program turning them into each chunk's offsets and each expert's
padded start (and writing the per-tile expert ids and the padding slots); a scatter of every pair to
its slot. Within an expert, pairs keep their order (token-major), as a stable sort would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ONE_HOT_ELEMENTS = 8192  # a chunk's [pairs, experts] one-hot matrix, sized to sit in registers


@dataclass(frozen=True)
class ExpertAlignment:
    """`sorted_ids [max_padded]`: flat pair indices t * top_k + k grouped by expert, each group padded
    with `num_pairs`; `expert_ids [max_padded // block_size]`: the expert of each row tile;
    `num_padded [1]`: the length of the used prefix (tiles past it are empty)."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    num_padded: torch.Tensor
    num_pairs: int
    block_size: int


def max_padded_pairs(num_pairs: int, num_experts: int, block_size: int) -> int:
    """An upper bound on the padded length: each expert that gets a pair wastes at most block_size - 1
    slots, and at most min(pairs, experts) experts get one. A multiple of block_size."""
    bound = num_pairs + min(num_pairs, num_experts) * (block_size - 1)
    return triton.cdiv(bound, block_size) * block_size


@triton.jit
def _count_kernel(ids_ptr, chunk_counts_ptr, num_pairs, CHUNK: tl.constexpr, EXPERTS: tl.constexpr):
    chunk = tl.program_id(0)
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    experts = tl.arange(0, EXPERTS)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    tl.store(chunk_counts_ptr + chunk * EXPERTS + experts, tl.sum(one_hot, axis=0))


@triton.jit
def _offsets_kernel(chunk_counts_ptr, padded_starts_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                    num_chunks, num_pairs, num_experts, num_tiles, BLOCK_SIZE: tl.constexpr,
                    EXPERTS: tl.constexpr, ROWS: tl.constexpr, TILES: tl.constexpr, PAD: tl.constexpr):
    """Rewrites chunk_counts[c, e] as the pairs of expert e in chunks before c. (`while`, not `range`:
    the interpreter cannot range over a runtime bound.)"""
    experts = tl.arange(0, EXPERTS)
    totals = tl.zeros([EXPERTS], tl.int32)
    first = 0
    while first < num_chunks:
        rows = first + tl.arange(0, ROWS)
        ptrs = chunk_counts_ptr + rows[:, None] * EXPERTS + experts[None, :]
        counts = tl.load(ptrs, mask=rows[:, None] < num_chunks, other=0)
        before = tl.cumsum(counts, axis=0) - counts + totals[None, :]
        tl.store(ptrs, before, mask=rows[:, None] < num_chunks)
        totals += tl.sum(counts, axis=0)
        first += ROWS
    padded = tl.where(experts < num_experts, tl.cdiv(totals, BLOCK_SIZE) * BLOCK_SIZE, 0)
    padded_ends = tl.cumsum(padded, axis=0)
    padded_starts = padded_ends - padded
    tl.store(padded_starts_ptr + experts, padded_starts)
    tl.store(num_padded_ptr, tl.sum(padded, axis=0))
    # Each group's padding slots (fewer than BLOCK_SIZE) hold num_pairs, which the GEMMs skip.
    fill = tl.arange(0, PAD)
    slots = (padded_starts + totals)[:, None] + fill[None, :]
    tl.store(sorted_ids_ptr + slots, tl.full([EXPERTS, PAD], num_pairs, tl.int32),
             mask=slots < padded_ends[:, None])
    # A tile's expert is the number of groups that end at or before the tile's first slot.
    first = 0
    while first < num_tiles:
        tiles = first + tl.arange(0, TILES)
        ended = (padded_ends[None, :] <= tiles[:, None] * BLOCK_SIZE) & (experts[None, :] < num_experts)
        tl.store(expert_ids_ptr + tiles, tl.sum(ended.to(tl.int32), axis=1), mask=tiles < num_tiles)
        first += TILES


@triton.jit
def _scatter_kernel(ids_ptr, chunk_counts_ptr, padded_starts_ptr, sorted_ids_ptr, num_pairs,
                    CHUNK: tl.constexpr, EXPERTS: tl.constexpr):
    chunk = tl.program_id(0)
    pairs = chunk * CHUNK + tl.arange(0, CHUNK)
    ids = tl.load(ids_ptr + pairs, mask=pairs < num_pairs, other=-1)
    experts = tl.arange(0, EXPERTS)
    one_hot = (ids[:, None] == experts[None, :]).to(tl.int32)
    earlier_in_chunk = tl.cumsum(one_hot, axis=0) - one_hot
    base = tl.load(padded_starts_ptr + experts) + tl.load(chunk_counts_ptr + chunk * EXPERTS + experts)
    slots = tl.sum(one_hot * (earlier_in_chunk + base[None, :]), axis=1)
    tl.store(sorted_ids_ptr + slots, pairs, mask=pairs < num_pairs)


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int, block_size: int) -> ExpertAlignment:
    """topk_ids `[T, top_k]` (int32 or int64, every id below num_experts) -> the step's ExpertAlignment."""
    num_pairs = topk_ids.numel()
    device = topk_ids.device
    max_padded = max_padded_pairs(num_pairs, num_experts, block_size)
    sorted_ids = torch.empty(max_padded, dtype=torch.int32, device=device)
    expert_ids = torch.empty(max_padded // block_size, dtype=torch.int32, device=device)
    num_padded = torch.zeros(1, dtype=torch.int32, device=device)
    alignment = ExpertAlignment(sorted_ids, expert_ids, num_padded, num_pairs, block_size)
    if num_pairs == 0:
        return alignment
    experts = triton.next_power_of_2(num_experts)
    rows = max(16, min(1024, ONE_HOT_ELEMENTS // experts))  # of a [rows, experts] matrix in one program
    chunk = min(rows, max(16, triton.next_power_of_2(num_pairs)))
    num_chunks = triton.cdiv(num_pairs, chunk)
    ids = topk_ids.reshape(-1)
    chunk_counts = torch.empty(num_chunks, experts, dtype=torch.int32, device=device)
    padded_starts = torch.empty(experts, dtype=torch.int32, device=device)
    _count_kernel[(num_chunks,)](ids, chunk_counts, num_pairs, CHUNK=chunk, EXPERTS=experts)
    _offsets_kernel[(1,)](chunk_counts, padded_starts, sorted_ids, expert_ids, num_padded, num_chunks, num_pairs,
                          num_experts, expert_ids.numel(), BLOCK_SIZE=block_size, EXPERTS=experts, ROWS=rows,
                          TILES=rows, PAD=triton.next_power_of_2(block_size))
    _scatter_kernel[(num_chunks,)](ids, chunk_counts, padded_starts, sorted_ids, num_pairs, CHUNK=chunk,
                                   EXPERTS=experts)
    return alignment
