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
    A mixture of experts' MLP is its experts: they take adapters through PEFT's target_parameters
    (engine/lora/moe_layer.py), not as projections of their own."""
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


def expert_matrix_shapes(model_config, parameter: str, rank: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The (A, B) shapes of PEFT's LoRA on a stacked expert parameter: A `[r * E, in]`, B `[out, r * E]`."""
    from engine.models.moe import num_experts_of

    experts, hidden = num_experts_of(model_config), model_config.hidden_size
    intermediate = getattr(model_config, "moe_intermediate_size", None) or model_config.intermediate_size
    if parameter == "gate_up_proj":
        return (rank * experts, hidden), (2 * intermediate, rank * experts)
    return (rank * experts, intermediate), (hidden, rank * experts)


@dataclass
class LoRALayerWeights:
    """One projection's adapter: per slice, A [rank, in] and B [rows, rank] (scaled), or None where the
    adapter leaves that slice alone."""

    lora_a: list[torch.Tensor | None]
    lora_b: list[torch.Tensor | None]


@dataclass
class LoRAExpertWeights:
    """One MoE layer's adapter, per expert, B scaled: gate_up A `[E, r, H]` and B `[E, 2I, r]` (one A for
    gate and up), down A `[E, r, I]` and B `[E, H, r]` (full size), or None where the adapter leaves that
    projection alone."""

    gate_up: tuple[torch.Tensor, torch.Tensor] | None
    down: tuple[torch.Tensor, torch.Tensor] | None


@dataclass
class LoRAAdapterWeights:
    name: str
    rank: int
    # By module name in the model, e.g. model.layers.3.self_attn.qkv_proj (or model.layers.3.mlp.experts).
    layers: dict[str, LoRALayerWeights | LoRAExpertWeights]


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
        if name.on_experts:
            _check_expert_matrix(peft, name, model_config)
            continue
        module, part = _TARGETS[name.module]
        if module not in specs:
            raise LoRAAdapterError(f"{weights_file}: {name.file_key} targets {name.module}, but this model's MLP is a "
                                   f"mixture of experts: LoRA applies to its attention projections (q/k/v/o), and "
                                   f"to its experts through target_parameters (mlp.experts.gate_up_proj, down_proj)")
        spec = specs[module]
        rows = sum(spec.slice_sizes) if part is None else spec.slice_sizes[part]
        expected = (peft.rank, spec.in_features) if name.kind == "lora_A" else (rows, peft.rank)
        found = peft.tensors[name.file_key].shape
        if tuple(found) != expected:
            raise LoRAAdapterError(f"{weights_file}: {name.file_key} has shape {list(found)}, but this model needs "
                                   f"{list(expected)} (an adapter made for a different model?)")


def _check_expert_matrix(peft: PeftAdapterConfig, name, model_config) -> None:
    from engine.models.moe import is_sparse_layer

    weights_file = peft.path / WEIGHTS_FILE
    if not is_mixture_of_experts(model_config) or not is_sparse_layer(model_config, name.layer):
        raise LoRAAdapterError(f"{weights_file}: {name.file_key} targets experts, but layer {name.layer} of this "
                               f"model has none")
    shape_a, shape_b = expert_matrix_shapes(model_config, name.module.removeprefix("experts."), peft.rank)
    expected = shape_a if name.kind == "lora_A" else shape_b
    found = peft.tensors[name.file_key].shape
    if tuple(found) != expected:
        raise LoRAAdapterError(f"{weights_file}: {name.file_key} ({name.module}) has shape {list(found)}, but this "
                               f"model needs {list(expected)} (rank {peft.rank} for each of its experts)")


def _expert_weights(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int, scaling: float
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's layout to per-expert matrices: A `[r * E, in]` is E blocks of r rows; B `[out, r * E]` has
    expert e's columns at e, e + E, ... (PEFT reshapes it to `[out, r, E]`). Returns A `[E, r, in]` and
    B `[E, out, r]`, scaled."""
    experts = lora_a.shape[0] // rank
    per_expert_a = lora_a.reshape(experts, rank, lora_a.shape[1])
    per_expert_b = lora_b.reshape(lora_b.shape[0], rank, experts).permute(2, 0, 1) * scaling
    return per_expert_a.contiguous(), per_expert_b.contiguous()


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
        if name.on_experts:
            module = f"model.layers.{name.layer}.mlp.experts"
            pair = _expert_weights(tensors[name.file_key].float(),
                                   tensors[name.file_key.replace(".lora_A.", ".lora_B.")].float(), peft.rank,
                                   peft.scaling)
            experts = layers.setdefault(module, LoRAExpertWeights(None, None))
            if name.module == "experts.gate_up_proj":
                experts.gate_up = pair
            else:
                experts.down = pair
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
