"""Neox-style rotary embedding in Triton, applied to query and key in place.

Drop-in for `engine.layers.rotary.rotary_embedding`: each head's halves (x1, x2) become
(x1 cos - x2 sin, x2 cos + x1 sin), in float32, at each token's position. In place, because q and k
are views into the fused qkv projection: no copies, one read and one write of each.
One program per token rotates all its query and key heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_token, stride_head, token, cos, sin, num_heads,
                  HEADS_PAD: tl.constexpr, HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HALF_PAD)
    mask = (heads < num_heads)[:, None] & (dims < HALF)[None, :]
    first = x_ptr + token * stride_token + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, positions_ptr, cos_ptr, sin_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cache, num_q_heads, num_k_heads, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
                   HALF: tl.constexpr, HALF_PAD: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    position = tl.load(positions_ptr + token).to(tl.int64)
    dims = tl.arange(0, HALF_PAD)
    cos = tl.load(cos_ptr + position * stride_cache + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(sin_ptr + position * stride_cache + dims, mask=dims < HALF, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(q_ptr, stride_qt, stride_qh, token, cos, sin, num_q_heads, Q_HEADS_PAD, HALF, HALF_PAD)
    _rotate_heads(k_ptr, stride_kt, stride_kh, token, cos, sin, num_k_heads, K_HEADS_PAD, HALF, HALF_PAD)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """query `[num_tokens, num_heads, head_dim]`, key `[num_tokens, num_kv_heads, head_dim]` (any token
    and head strides); cos/sin caches `[max_position, head_dim // 2]`. Rotates in place; returns both."""
    num_tokens, num_q_heads, head_dim = query.shape
    half = cos_cache.shape[1]
    assert head_dim == 2 * half and key.shape[-1] == head_dim and query.stride(-1) == 1 and key.stride(-1) == 1
    assert cos_cache.stride() == sin_cache.stride() and cos_cache.stride(1) == 1
    if num_tokens:
        _rotary_kernel[(num_tokens,)](
            query, key, positions, cos_cache, sin_cache, query.stride(0), query.stride(1), key.stride(0),
            key.stride(1), cos_cache.stride(0), num_q_heads, key.shape[1],
            Q_HEADS_PAD=triton.next_power_of_2(num_q_heads), K_HEADS_PAD=triton.next_power_of_2(key.shape[1]),
            HALF=half, HALF_PAD=triton.next_power_of_2(half))
    return query, key
