"""The attention layer: writes this step's K/V into the paged cache, then attends over it.

Per-step metadata (built once by the model runner) is published through `set_forward_context`,
so the model code reads like the paper and never threads batching details through its calls.
Each layer may have its own `sliding_window` (Mistral, Gemma 2/3's local layers) and
`logits_soft_cap` (Gemma 2), with the semantics of kernels/paged_attention_ref.py.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from engine.layers.rotary import RotaryEmbedding, rotary_embedding
from kernels import triton_or_reference
from kernels.paged_attention_ref import paged_decode_attention, reshape_and_cache, varlen_paged_prefill_attention


@dataclass
class AttentionMetadata:
    """The batch is ordered decodes first: `num_decodes` one-token queries, then prefill chunks."""

    # One row per KV cache group (engine/core/kv_cache_groups.py); a layer reads its group's.
    slot_mapping: torch.Tensor  # [num_groups, num_tokens] cache slot of each token
    block_tables: torch.Tensor  # [num_groups, num_seqs, max_blocks] padded with the null block 0
    seq_lens: torch.Tensor  # [num_seqs] context length including this step's tokens
    num_decodes: int
    decode_max_blocks: int  # block-table columns the decodes need (the rest is prefill padding)
    # Upper bound of the decodes' seq_lens that sizes the decode kernel's launch: this step's
    # maximum when eager, max_model_len in a CUDA graph (one launch must fit every replay).
    decode_max_seq_len: int
    seq_lens_cpu: list[int]
    query_start_loc_cpu: list[int]  # [num_seqs + 1]


_context: AttentionMetadata | None = None


@contextmanager
def set_forward_context(metadata: AttentionMetadata):
    global _context
    previous, _context = _context, metadata
    try:
        yield
    finally:
        _context = previous


def get_forward_context() -> AttentionMetadata:
    if _context is None:
        raise RuntimeError("attention called outside set_forward_context()")
    return _context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float, *,
                 sliding_window: int | None = None, logits_soft_cap: float | None = None) -> None:
        super().__init__()
        if sliding_window is not None and sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {sliding_window}")
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.sliding_window, self.logits_soft_cap = sliding_window, logits_soft_cap
        self.key_cache = torch.empty(0)  # bound by the model runner once the cache is allocated
        self.value_cache = torch.empty(0)
        self.kv_group = 0  # its KV cache group: which block table it reads (set with the cache)

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, positions: torch.Tensor,
                rotary_emb: RotaryEmbedding) -> torch.Tensor:
        """query: `[num_tokens, num_heads, head_dim]`; key/value: `[num_tokens, num_kv_heads, head_dim]`,
        rotated at `positions` by `rotary_emb` here: on CUDA in the launch that writes the cache (the
        query in place, the key only in the cache)."""
        meta = get_forward_context()
        block_tables = meta.block_tables[self.kv_group]
        rotate_and_write = triton_or_reference(query, "rotary_and_cache", rotary_and_cache)
        query = rotate_and_write(positions, query, key, value, rotary_emb.cos_cache, rotary_emb.sin_cache,
                                 self.key_cache, self.value_cache, meta.slot_mapping[self.kv_group])
        out = torch.empty_like(query)
        num_decodes = meta.num_decodes
        if num_decodes:
            # Written straight into `out`: a copy would be one more launch per layer, which batch-1
            # decoding feels.
            decode = triton_or_reference(query, "paged_decode_attention", paged_decode_attention)
            decode(query[:num_decodes], self.key_cache, self.value_cache,
                   block_tables[:num_decodes, :meta.decode_max_blocks], meta.seq_lens[:num_decodes], self.scale,
                   out=out[:num_decodes], max_seq_len=meta.decode_max_seq_len, sliding_window=self.sliding_window,
                   logits_soft_cap=self.logits_soft_cap)
        if num_decodes < len(meta.seq_lens_cpu):
            self._prefill(query, meta, block_tables, out)
        return out

    def _prefill(self, query: torch.Tensor, meta: AttentionMetadata, block_tables: torch.Tensor,
                 out: torch.Tensor) -> None:
        """Every prefill chunk (the rows after the decodes) in one call: one Triton launch on CUDA."""
        num_decodes = meta.num_decodes
        starts = meta.query_start_loc_cpu[num_decodes:]
        # A few bytes from the host list; non_blocking, so no wait for the device.
        query_start_loc = torch.tensor(starts, dtype=torch.int32).to(query.device, non_blocking=True)
        prefill = triton_or_reference(query, "paged_prefill_attention", varlen_paged_prefill_attention)
        prefill(query, self.key_cache, self.value_cache, block_tables[num_decodes:], meta.seq_lens[num_decodes:],
                query_start_loc, self.scale, max(end - start for start, end in zip(starts, starts[1:])), out=out,
                sliding_window=self.sliding_window, logits_soft_cap=self.logits_soft_cap)


def rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """The reference (and CPU path) of kernels/rotary_and_cache.py: rotary, then the cache write of
    the rotated key and the value; returns the rotated query."""
    query, key = rotary_embedding(positions, query, key, cos_cache, sin_cache)
    reshape_and_cache(key, value, key_cache, value_cache, slot_mapping)
    return query
