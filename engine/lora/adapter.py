"""A PEFT adapter's matrices, checked against one model and arranged as its LoRA layers need them.

Our models merge q/k/v into `qkv_proj` and gate/up into `gate_up_proj`; a LoRA layer over a merged
projection has one slice per part. PEFT's separate q_proj/k_proj/v_proj matrices go to those
slices; Phi-3's fused qkv_proj / gate_up_proj adapters (one A for all parts) become the same
slices, each with that A and its rows of B. The scaling (alpha / r, or alpha / sqrt(r) for
rsLoRA) is folded into B, so serving is just x @ A^T @ B^T.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from engine.lora.peft_config import WEIGHTS_FILE, LoRAAdapterError, PeftAdapterConfig, read_peft_adapter

# PEFT's leaf name -> (our module under the decoder layer, the slice it fills; None: all, one shared A)
_TARGETS = {"q_proj": ("self_attn.qkv_proj", 0), "k_proj": ("self_attn.qkv_proj", 1),
            "v_proj": ("self_attn.qkv_proj", 2), "qkv_proj": ("self_attn.qkv_proj", None),
            "o_proj": ("self_attn.o_proj", 0), "gate_proj": ("mlp.gate_up_proj", 0),
            "up_proj": ("mlp.gate_up_proj", 1), "gate_up_proj": ("mlp.gate_up_proj", None),
            "down_proj": ("mlp.down_proj", 0)}


@dataclass(frozen=True)
class LoRAModuleSpec:
    """One projection of a decoder layer, at full (unsharded) size: its input width and the output
    rows of each slice."""

    in_features: int
    slice_sizes: tuple[int, ...]


def model_lora_modules(model_config) -> dict[str, LoRAModuleSpec]:
    """Every projection LoRA applies to, by its path under a decoder layer (e.g. self_attn.qkv_proj).
    A mixture of experts takes adapters on its attention only: its experts are one fused kernel's
    stacked weights (and transformers' own are 3-D parameters, which PEFT's target_modules cannot name)."""
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    q_size = heads * head_dim
    kv_size = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    specs = {"self_attn.qkv_proj": LoRAModuleSpec(hidden, (q_size, kv_size, kv_size)),
             "self_attn.o_proj": LoRAModuleSpec(q_size, (hidden,))}
    if is_mixture_of_experts(model_config):
        return specs
    intermediate = model_config.intermediate_size
    return specs | {"mlp.gate_up_proj": LoRAModuleSpec(hidden, (intermediate, intermediate)),
                    "mlp.down_proj": LoRAModuleSpec(intermediate, (hidden,))}


def is_mixture_of_experts(model_config) -> bool:
    return bool(getattr(model_config, "num_local_experts", None) or getattr(model_config, "num_experts", None))


@dataclass
class LoRALayerWeights:
    """One projection's adapter: per slice, A [rank, in] and B [rows, rank] (scaled), or None where the
    adapter leaves that slice alone."""

    lora_a: list[torch.Tensor | None]
    lora_b: list[torch.Tensor | None]


@dataclass
class LoRAAdapterWeights:
    name: str
    rank: int
    layers: dict[str, LoRALayerWeights]  # by module name in the model, e.g. model.layers.3.self_attn.qkv_proj


def check_adapter(peft: PeftAdapterConfig, model_config, max_lora_rank: int) -> None:
    """Refuse an adapter this model cannot take, from the header alone (no tensor is read)."""
    weights_file = peft.path / WEIGHTS_FILE
    if peft.rank > max_lora_rank:
        raise LoRAAdapterError(f"{peft.path / 'adapter_config.json'}: rank r={peft.rank} is more than the "
                               f"engine's max_lora_rank={max_lora_rank}")
    specs = model_lora_modules(model_config)
    for name in peft.names:
        if name.layer >= model_config.num_hidden_layers:
            raise LoRAAdapterError(f"{weights_file}: {name.file_key} is for layer {name.layer}, but the model has "
                                   f"{model_config.num_hidden_layers} layers")
        module, part = _TARGETS[name.module]
        if module not in specs:
            raise LoRAAdapterError(f"{weights_file}: {name.file_key} targets {name.module}, but this model's MLP is a "
                                   f"mixture of experts: LoRA applies to its attention projections (q/k/v/o) only")
        spec = specs[module]
        rows = sum(spec.slice_sizes) if part is None else spec.slice_sizes[part]
        expected = (peft.rank, spec.in_features) if name.kind == "lora_A" else (rows, peft.rank)
        found = peft.tensors[name.file_key].shape
        if tuple(found) != expected:
            raise LoRAAdapterError(f"{weights_file}: {name.file_key} has shape {list(found)}, but this model needs "
                                   f"{list(expected)} (an adapter made for a different model?)")


def load_adapter(path: str | Path, name: str, model_config, max_lora_rank: int) -> LoRAAdapterWeights:
    """Read, check and arrange an adapter for the model (float32, on the host)."""
    peft = read_peft_adapter(path)
    check_adapter(peft, model_config, max_lora_rank)
    try:
        tensors = load_file(str(peft.path / WEIGHTS_FILE))
    except Exception as error:  # safetensors raises its own types on a damaged file
        raise LoRAAdapterError(f"{peft.path / WEIGHTS_FILE}: unreadable ({error})") from None
    specs = model_lora_modules(model_config)
    layers: dict[str, LoRALayerWeights] = {}
    for name in peft.names:
        if name.kind != "lora_A":
            continue
        module, part = _TARGETS[name.module]
        spec = specs[module]
        weights = layers.setdefault(f"model.layers.{name.layer}.{module}",
                                    LoRALayerWeights([None] * len(spec.slice_sizes), [None] * len(spec.slice_sizes)))
        lora_a = tensors[name.file_key].float()
        lora_b = tensors[name.file_key.replace(".lora_A.", ".lora_B.")].float() * peft.scaling
        parts = range(len(spec.slice_sizes)) if part is None else (part,)
        pieces = lora_b.split(spec.slice_sizes) if part is None else (lora_b,)
        for index, piece in zip(parts, pieces):
            weights.lora_a[index], weights.lora_b[index] = lora_a, piece.contiguous()
    return LoRAAdapterWeights(name, peft.rank, layers)
