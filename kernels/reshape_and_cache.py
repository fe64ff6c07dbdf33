"""Writing this step's K and V into their paged-cache slots, in Triton: one launch for both caches.

Drop-in for `kernels.paged_attention_ref.reshape_and_cache`, and also skips tokens whose slot is
negative: padding rows of a fixed-size (CUDA graph) batch, which own no slot.
One program per token copies all its KV heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _reshape_and_cache_kernel(key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                              stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
                              num_kv_heads, BLOCK_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr,
                              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM_PAD)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :] & (slot >= 0)
    cache_offsets = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
                     + heads[:, None] * stride_ch + dims[None, :])
    key = tl.load(key_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    value = tl.load(value_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(key_cache_ptr + cache_offsets, key, mask=mask)
    tl.store(value_cache_ptr + cache_offsets, value, mask=mask)


def reshape_and_cache(key: torch.Tensor, value: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor,
                      slot_mapping: torch.Tensor) -> None:
    """key/value `[num_tokens, num_kv_heads, head_dim]` (any token and head strides); caches
    `[num_blocks, block_size, num_kv_heads, head_dim]`; `slot_mapping` `[num_tokens]`, -1 to skip."""
    num_tokens, num_kv_heads, head_dim = key.shape
    block_size = key_cache.shape[1]
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and slot_mapping.stride(0) == 1
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    if num_tokens:
        _reshape_and_cache_kernel[(num_tokens,)](
            key, value, key_cache, value_cache, slot_mapping, key.stride(0), key.stride(1), value.stride(0),
            value.stride(1), key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), num_kv_heads,
            BLOCK_SIZE=block_size, HEADS_PAD=triton.next_power_of_2(num_kv_heads), HEAD_DIM=head_dim,
            HEAD_DIM_PAD=triton.next_power_of_2(head_dim))
