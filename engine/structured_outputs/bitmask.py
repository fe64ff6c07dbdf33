"""Applying a grammar's token bitmask to logits: the torch reference (the CPU path) and the dispatch
to the Triton kernel on CUDA (kernels/apply_token_bitmask.py).

A bitmask row is int32 words, bit t % 32 of word t // 32 set when token t is allowed: llguidance
fills it straight from its token trie, 32x smaller than a boolean row, so it crosses to the device
cheaply every step.
"""

from __future__ import annotations

import torch

from kernels import triton_or_reference



def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: logits[rows[k], t] = -inf where bit t of bitmask[k] is 0."""
    vocab = logits.shape[1]
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    allowed = ((bitmask[:, :, None] >> shifts) & 1).reshape(bitmask.shape[0], -1)[:, :vocab].bool()
    selected = logits.index_select(0, rows)
    logits.index_copy_(0, rows, selected.masked_fill(~allowed, float("-inf")))


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    triton_or_reference(logits, "apply_token_bitmask", apply_token_bitmask_reference)(logits, bitmask, rows)
