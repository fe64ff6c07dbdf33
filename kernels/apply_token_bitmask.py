"""A grammar's token bitmask applied to logits in Triton: every token whose bit is 0 gets -inf.

Drop-in for `engine.structured_outputs.bitmask.apply_token_bitmask` (the torch reference and CPU
path). Only the constrained rows are touched, in place; one program covers BLOCK tokens of one row,
reading the BLOCK / 32 mask words they need, so the mask is never expanded to a vocabulary-sized
boolean tensor (batch x 128k bytes written and read again, as torch's unpacking does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _apply_token_bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, vocab_size, stride_logits, stride_bitmask,
                                BLOCK: tl.constexpr):
    k = tl.program_id(0)
    row = tl.load(rows_ptr + k).to(tl.int64)
    tokens = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = tokens < vocab_size
    words = tl.load(bitmask_ptr + k * stride_bitmask + tokens // 32, mask=in_vocab, other=-1)
    allowed = (words >> (tokens % 32)) & 1
    tl.store(logits_ptr + row * stride_logits + tokens, float("-inf"), mask=in_vocab & (allowed == 0))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[k], t] = -inf where bit t of bitmask[k] is 0. `bitmask` is int32
    [len(rows), ceil(vocab / 32)], bit t % 32 of word t // 32 (llguidance's layout)."""
    assert logits.stride(-1) == 1 and bitmask.is_contiguous() and bitmask.dtype == torch.int32
    assert bitmask.shape[1] * 32 >= logits.shape[1], "the mask must cover the vocabulary"
    if rows.numel():
        grid = (rows.numel(), triton.cdiv(logits.shape[1], BLOCK))
        _apply_token_bitmask_kernel[grid](logits, bitmask, rows, logits.shape[1], logits.stride(0),
                                          bitmask.stride(0), BLOCK=BLOCK, num_warps=8)
