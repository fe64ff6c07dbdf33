"""Row argmax in Triton: greedy decoding's one read of the logits.

Drop-in for `torch.argmax(logits, dim=-1)`, with its rule for ties (the first index of the maximum)
and for NaN (a NaN is the maximum: the first NaN's index). At batch 1 torch reduces a row of 128k
logits in one block, 36 us on an H200 (Llama 3's vocabulary); here the row is cut into chunks that
run as separate programs, each writing its (value, index), and a second launch keeps the best chunk.
Chunks are in index order, so among equal values the first chunk's holds the first index. With
enough rows to fill the GPU a row is one chunk, and that program writes the answer itself.
On the CPU it runs under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # logits a program reduces at a time
TARGET_PROGRAMS = 512  # rows x chunks wanted in flight


@triton.jit
def _best(values, indices, index_limit):
    """(value, index) of the maximum of a tile under torch's rules; `index_limit` pads the masked lanes."""
    is_nan = values != values
    has_nan = tl.max(is_nan.to(tl.int32), axis=0) > 0
    best_value = tl.max(tl.where(is_nan, float("-inf"), values), axis=0)
    chosen = tl.where(has_nan, is_nan, values == best_value)
    best_index = tl.min(tl.where(chosen, indices, index_limit), axis=0)
    return tl.where(has_nan, float("nan"), best_value), best_index


@triton.jit
def _beats(value, index, best_value, best_index):
    """Whether (value, index) wins over (best_value, best_index): larger, NaN above all, then first."""
    value_nan = value != value
    best_nan = best_value != best_value
    larger = (value > best_value) | (value_nan & ~best_nan)
    equal = (value == best_value) | (value_nan & best_nan)
    return larger | (equal & (index < best_index))


@triton.jit
def _argmax_chunk_kernel(logits_ptr, partial_value_ptr, partial_index_ptr, out_ptr, stride_row,
                         VOCAB: tl.constexpr, CHUNK: tl.constexpr, NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunk = tl.program_id(1)
    start = chunk * CHUNK
    best_value = tl.full([], float("-inf"), tl.float32)
    best_index = tl.full([], VOCAB, tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        indices = start + offset + tl.arange(0, BLOCK)
        values = tl.load(logits_ptr + row * stride_row + indices, mask=indices < VOCAB,
                         other=float("-inf")).to(tl.float32)
        value, index = _best(values, indices, VOCAB)
        wins = _beats(value, index, best_value, best_index)
        best_value = tl.where(wins, value, best_value)
        best_index = tl.where(wins, index, best_index)
    if NUM_CHUNKS == 1:
        tl.store(out_ptr + row, tl.minimum(best_index, VOCAB - 1).to(tl.int64))
    else:
        tl.store(partial_value_ptr + row * NUM_CHUNKS + chunk, best_value)
        tl.store(partial_index_ptr + row * NUM_CHUNKS + chunk, best_index)


@triton.jit
def _argmax_pick_kernel(partial_value_ptr, partial_index_ptr, out_ptr, VOCAB: tl.constexpr,
                        NUM_CHUNKS: tl.constexpr, CHUNKS_PAD: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    chunks = tl.arange(0, CHUNKS_PAD)
    mask = chunks < NUM_CHUNKS
    values = tl.load(partial_value_ptr + row * NUM_CHUNKS + chunks, mask=mask, other=float("-inf"))
    _, chunk = _best(values, chunks, CHUNKS_PAD)
    index = tl.load(partial_index_ptr + row * NUM_CHUNKS + chunk)
    tl.store(out_ptr + row, tl.minimum(index, VOCAB - 1).to(tl.int64))


def num_chunks_for(rows: int, vocab: int) -> int:
    """Chunks per row: enough programs to fill the GPU, none shorter than one BLOCK."""
    return max(1, min(triton.cdiv(TARGET_PROGRAMS, max(rows, 1)), triton.cdiv(vocab, BLOCK)))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """`logits` `[rows, vocab]` (any row stride); int64 `[rows]`."""
    rows, vocab = logits.shape
    assert vocab > 0
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.int64, device=logits.device)
    if rows == 0:
        return out
    num_chunks = num_chunks_for(rows, vocab)
    chunk = triton.cdiv(triton.cdiv(vocab, num_chunks), BLOCK) * BLOCK
    num_chunks = triton.cdiv(vocab, chunk)
    partial_value = torch.empty(rows * num_chunks if num_chunks > 1 else 0, dtype=torch.float32,
                                device=logits.device)
    partial_index = torch.empty_like(partial_value, dtype=torch.int32)
    _argmax_chunk_kernel[(rows, num_chunks)](logits, partial_value, partial_index, out, logits.stride(0),
                                             VOCAB=vocab, CHUNK=chunk, NUM_CHUNKS=num_chunks, BLOCK=BLOCK, num_warps=8)
    if num_chunks > 1:
        _argmax_pick_kernel[(rows,)](partial_value, partial_index, out, VOCAB=vocab, NUM_CHUNKS=num_chunks,
                                     CHUNKS_PAD=triton.next_power_of_2(num_chunks))
    return out
