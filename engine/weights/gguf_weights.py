"""GGUF files (llama.cpp's format), dequantized to float with the `gguf` package.

llama.cpp's converter permutes the q and k projections of Llama-family models for its own rotary
layout; `_unpermute` undoes it (as transformers does), or the model computes nonsense. Rope scaling
metadata (and llama3's `rope_freqs` tensor) is read by `gguf_rope.py`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from engine.weights.gguf_rope import rope_config

_ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "LlamaForCausalLM",
                  "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@lru_cache(maxsize=4)
def open_gguf(path: Path):
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as error:  # the reader raises assorted errors on damaged files
        raise ValueError(f"corrupt or unreadable GGUF file {path}: {error}") from error


def _field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def load_gguf_config(path: Path):
    """A transformers config built from the GGUF metadata."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    reader = open_gguf(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(_ARCHITECTURES)}")
    if experts := _field(reader, f"{arch}.expert_count"):
        raise ValueError(f"mixture-of-experts GGUF files ({arch}.expert_count={experts}) are not supported; "
                         "load the model's Hugging Face checkpoint instead")
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    num_heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    head_dim = _field(reader, f"{arch}.attention.key_length", hidden // num_heads)
    kwargs = dict(
        architectures=[_ARCHITECTURES[arch]],
        vocab_size=_field(reader, f"{arch}.vocab_size") or len(_field(reader, "tokenizer.ggml.tokens")),
        hidden_size=hidden,
        intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
        num_hidden_layers=_field(reader, f"{arch}.block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=_field(reader, f"{arch}.attention.head_count_kv", num_heads),
        head_dim=head_dim,
        max_position_embeddings=_field(reader, f"{arch}.context_length", 2048),
        rms_norm_eps=_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    rope_freqs = tensors.get("rope_freqs.weight")
    kwargs |= rope_config(lambda key, default=None: _field(reader, f"{arch}.{key}", default), head_dim,
                          None if rope_freqs is None else _values(rope_freqs, path))
    config_class = {"qwen2": Qwen2Config, "qwen3": Qwen3Config}.get(arch, LlamaConfig)
    return config_class(**kwargs)


def iterate_gguf(path: Path, config) -> Iterator[tuple[str, torch.Tensor]]:
    reader = open_gguf(path)
    permute = _field(reader, "general.architecture") in ("llama", "mistral")
    for tensor in reader.tensors:
        name = _hf_name(tensor.name)
        if name is None:
            continue
        values = _values(tensor, path)
        if permute and name.endswith("q_proj.weight"):
            values = _unpermute(values, config.num_attention_heads)
        elif permute and name.endswith("k_proj.weight"):
            values = _unpermute(values, config.num_key_value_heads)
        yield name, torch.from_numpy(values)


def _values(tensor, path: Path) -> np.ndarray:
    """The tensor dequantized to a writable, owned float32 array."""
    from gguf.quants import dequantize

    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except Exception as error:
        raise ValueError(f"corrupt GGUF tensor {tensor.name} in {path}: {error}") from error
    return np.array(values, dtype=np.float32, order="C")


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}.{suffix}"
    if base in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[base]}.{suffix}"
    return None


def _unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    half = weights.shape[0] // num_heads // 2
    shaped = weights.reshape(num_heads, half, 2, *weights.shape[1:])
    return np.ascontiguousarray(shaped.swapaxes(2, 1).reshape(weights.shape))
