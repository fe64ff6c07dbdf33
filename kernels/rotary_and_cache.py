"""Rotary embedding and the paged-cache write of K and V, in one Triton launch per layer.

Drop-in for `engine.layers.attention.rotary_and_cache` (rotary, then `reshape_and_cache`, in torch),
Neox-style in float32 at each token's position: the query is rotated in place
(it is a view into the fused qkv projection), and the key is rotated on its way into the cache, so
it is read once and never written back (attention reads keys from the cache only). It replaced a
rotary kernel and a cache-write kernel: one launch a layer fewer, which batch-1 decoding pays ~2 us for.
One program per token; a token whose slot is negative (a CUDA graph's padding row) writes no cache.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



@triton.jit
def _rotate_heads(x_ptr, stride_token, stride_head, token, cos, sin, num_heads,
                  HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    """Neox-style, in place: each head's halves (x1, x2) become (x1 cos - x2 sin, x2 cos + x1 sin)."""
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    first = x_ptr + token * stride_token + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_and_cache_kernel(q_ptr, k_ptr, v_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr, positions_ptr,
                             cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
                             stride_cb, stride_ct, stride_ch, stride_cos, num_q_heads, num_kv_heads,
                             BLOCK_SIZE: tl.constexpr, Q_HEADS_PAD: tl.constexpr, KV_HEADS_PAD: tl.constexpr,
                             HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + position * stride_cos + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, cos, sin, num_q_heads, Q_HEADS_PAD, HALF, HALF_PAD)

    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    heads = tl.arange(0, KV_HEADS_PAD)
    mask = (heads < num_kv_heads)[:, None] & (dims < HALF)[None, :] & (slot >= 0)
    cache = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
             + heads[:, None] * stride_ch + dims[None, :])
    key = k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :]
    k1 = tl.load(key, mask=mask, other=0.0).to(tl.float32)
    k2 = tl.load(key + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(key_cache_ptr + cache, (k1 * cos - k2 * sin).to(key_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(key_cache_ptr + cache + HALF, (k2 * cos + k1 * sin).to(key_cache_ptr.dtype.element_ty), mask=mask)
    value = v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :]
    tl.store(value_cache_ptr + cache, tl.load(value, mask=mask), mask=mask)
    tl.store(value_cache_ptr + cache + HALF, tl.load(value + HALF, mask=mask), mask=mask)


def rotary_and_cache(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cos_cache: torch.Tensor, sin_cache: torch.Tensor, key_cache: torch.Tensor,
                     value_cache: torch.Tensor, slot_mapping: torch.Tensor) -> torch.Tensor:
    """query `[num_tokens, num_heads, head_dim]`, key/value `[num_tokens, num_kv_heads, head_dim]` (any
    token and head strides); cos/sin `[max_position, head_dim // 2]`; caches `[num_blocks, block_size,
    num_kv_heads, head_dim]`; `slot_mapping` `[num_tokens]`, -1 to skip. Returns the rotated query."""
    num_tokens, num_q_heads, head_dim = query.shape
    num_kv_heads, half = key.shape[1], cos_cache.shape[1]
    assert head_dim == 2 * half and key.shape[-1] == head_dim and value.shape == key.shape
    assert query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1 and slot_mapping.stride(0) == 1
    assert cos_cache.stride() == sin_cache.stride() and cos_cache.stride(1) == 1
    assert key_cache.stride() == value_cache.stride() and key_cache.stride(-1) == 1
    if num_tokens:
        _rotary_and_cache_kernel[(num_tokens,)](
            query, key, value, key_cache, value_cache, slot_mapping, positions, cos_cache, sin_cache,
            query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            key_cache.stride(0), key_cache.stride(1), key_cache.stride(2), cos_cache.stride(0), num_q_heads,
            num_kv_heads, BLOCK_SIZE=key_cache.shape[1], Q_HEADS_PAD=triton.next_power_of_2(num_q_heads),
            KV_HEADS_PAD=triton.next_power_of_2(num_kv_heads), HALF=half, HALF_PAD=triton.next_power_of_2(half))
    return query
