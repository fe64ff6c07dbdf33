"""Rotary position embedding with the scaling types Llama 3.x, Qwen, Mistral and Phi-3 ship.

Inverse frequencies for scaled variants (linear, llama3, yarn, longrope) come from transformers'
own `ROPE_INIT_FUNCTIONS`, so they match the reference exactly; "dynamic" NTK, which changes with
the sequence length, is not supported.

LongRoPE (Phi-3's "longrope"; Phi3Config renames the older "su") has short factors for sequences up to
`original_max_position_embeddings` and long ones beyond. transformers switches per forward call by
the call's length, so keys already cached under one set meet queries of the other. As vLLM does, we
choose once, by the longest position the table serves: long factors when it exceeds the original
length (always, for the 128k checkpoints), so every token of every sequence uses the same set.

Gemma 3 keys its parameters by layer type (`rope_parameters["sliding_attention"]` and
`["full_attention"]`: local and global layers rotate with bases, and scaling, of their own); a table
for one of them is built with that `layer_type`.

`config.rope_freq_factors` (set by the GGUF loader from a file's `rope_freqs` tensor, which is how
llama.cpp stores Llama 3.1-style scaling) divides each inverse frequency, on top of any scaling type,
as llama.cpp's `freq_factors` do.
"""

from __future__ import annotations

import torch
from torch import nn


def rope_parameters(config, layer_type: str | None = None) -> dict:
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    if layer_type is not None:
        params = dict(params[layer_type])
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def inverse_frequencies(config, head_dim: int, max_position: int,
                        layer_type: str | None = None) -> tuple[torch.Tensor, float]:
    inv_freq, attention_factor = _scaled_inverse_frequencies(config, head_dim, max_position, layer_type)
    if (freq_factors := getattr(config, "rope_freq_factors", None)) is not None:
        inv_freq = inv_freq / torch.tensor(freq_factors, dtype=inv_freq.dtype, device=inv_freq.device)
    return inv_freq, attention_factor


def _scaled_inverse_frequencies(config, head_dim: int, max_position: int,
                                layer_type: str | None) -> tuple[torch.Tensor, float]:
    params = rope_parameters(config, layer_type)
    rope_type = params["rope_type"]
    if params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial rotary embeddings (partial_rotary_factor < 1) are not supported")
    if rope_type == "default":
        exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
        return 1.0 / (params["rope_theta"] ** exponents), 1.0
    if rope_type == "dynamic":
        raise ValueError("rope scaling type 'dynamic' is not supported")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unsupported rope scaling type {rope_type!r}")
    # longrope takes its long factors iff `seq_len` exceeds original_max_position_embeddings.
    length = {"seq_len": max_position} if rope_type == "longrope" else {}
    which = {} if layer_type is None else {"layer_type": layer_type}
    with torch.device("cpu"):  # real numbers even while the model is being built on `meta`
        return ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"), **length, **which)


class RotaryEmbedding(nn.Module):
    """The cos/sin tables of a Neox-style rotation (rotate halves) at absolute token positions. The
    attention layer applies them (`Attention.forward`'s `rotary_emb`), on CUDA in the launch that
    writes the KV cache (kernels/rotary_and_cache.py)."""

    def __init__(self, config, head_dim: int, max_position: int, layer_type: str | None = None) -> None:
        super().__init__()
        self.layer_type = layer_type
        inv_freq, attention_factor = inverse_frequencies(config, head_dim, max_position, layer_type)
        t = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq.float().to(t.device))
        self.register_buffer("cos_cache", freqs.cos() * attention_factor, persistent=False)
        self.register_buffer("sin_cache", freqs.sin() * attention_factor, persistent=False)


def rotary_embedding(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor, cos_cache: torch.Tensor,
                     sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotation in torch: rotates each head's halves, in float32; returns new tensors."""
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)
    return _rotate(query, cos, sin), _rotate(key, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.to(x.dtype)
