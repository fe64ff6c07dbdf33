"""Tensor parallelism as a module swap (as gpt-fast does it), so the model file stays single-device.

The model is built on the meta device (no memory), its linears and embeddings are swapped for
sharded ones allocated on the real device, and the few small tensors left (norms, rotary tables)
are materialised; then `load_weights` fills each shard from the checkpoint, one tensor at a time.

Query heads are split evenly; KV heads are split when there are at least as many as ranks, and
replicated otherwise (each group of tp / num_kv_heads ranks shares one KV head), as in vLLM. MLPs
are split along their intermediate dimension, each MoE expert's too (every rank holds a slice of
every expert, so the routing needs no communication).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.distributed.layers import (ColumnParallelLinear, ParallelRMSNorm, RowParallelLinear,
                                       VocabParallelEmbedding)
from engine.distributed.parallel_state import tp_rank, tp_world_size
from engine.layers.fused_moe import FusedMoE
from engine.layers.rotary import RotaryEmbedding
from engine.models.llama import LlamaAttention, LlamaMLP


def check_tensor_parallel_size(model_config, size: int) -> None:
    """Refuse a tensor_parallel_size that cannot split the model's heads and MLP evenly."""
    heads = model_config.num_attention_heads
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    mlp_sizes = [(label, getattr(model_config, name, None)) for name, label in (
        ("intermediate_size", "MLP size"), ("moe_intermediate_size", "expert MLP size"),
        ("shared_expert_intermediate_size", "shared expert MLP size"))]
    uneven = [f"{label} {value}" for label, value in mlp_sizes if value and value % size]
    problem = None
    if heads % size:
        problem = f"does not divide the model's {heads} attention heads"
    elif kv_heads >= size and kv_heads % size:
        problem = f"does not divide the model's {kv_heads} KV heads"
    elif kv_heads < size and size % kv_heads:
        problem = f"is not a multiple of the model's {kv_heads} KV heads (needed to replicate them)"
    elif uneven:
        problem = f"does not divide the model's {uneven[0]}"
    if problem:
        raise ValueError(f"tensor_parallel_size={size} {problem}")


def build_sharded_model(model_class, config, device: torch.device, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = model_class(config)
    factory = dict(device=device, dtype=dtype)
    for module in list(model.modules()):
        if isinstance(module, LlamaAttention):
            _shard_attention(module, factory)
        elif isinstance(module, LlamaMLP):
            _shard_mlp(module, factory)
        elif isinstance(module, FusedMoE):
            _shard_experts(module, factory)
    model.model.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **factory)
    if model.lm_head is not None:
        model.lm_head = VocabParallelEmbedding(config.vocab_size, config.hidden_size, **factory)
    _materialize_the_rest(model, config, device)
    return model


def _shard_attention(attn: LlamaAttention, factory: dict) -> None:
    size, rank, head_dim = tp_world_size(), tp_rank(), attn.head_dim
    heads, kv_heads = attn.num_heads // size, max(1, attn.num_kv_heads // size)
    kv_index = rank if attn.num_kv_heads >= size else rank // (size // attn.num_kv_heads)
    q_rows = (rank * heads * head_dim, heads * head_dim)
    kv_rows = (kv_index * kv_heads * head_dim, kv_heads * head_dim)
    attn.qkv_proj = ColumnParallelLinear(attn.qkv_proj.in_features, {"q": q_rows, "k": kv_rows, "v": kv_rows},
                                         bias=attn.qkv_proj.bias is not None, **factory)
    attn.o_proj = RowParallelLinear(heads * head_dim, attn.o_proj.out_features, bias=attn.o_proj.bias is not None,
                                    **factory)
    if attn.q_norm is not None and attn.q_norm.weight.shape[0] == attn.q_size:  # one norm over all heads (OLMo 2)
        eps, replicas = attn.q_norm.eps, max(1, size // attn.num_kv_heads)
        attn.q_norm = ParallelRMSNorm(q_rows, attn.q_size, eps, **factory)
        attn.k_norm = ParallelRMSNorm(kv_rows, attn.kv_size, eps, replicas, **factory)
    attn.num_heads = attn.attn.num_heads = heads
    attn.num_kv_heads = attn.attn.num_kv_heads = kv_heads
    attn.q_size, attn.kv_size = heads * head_dim, kv_heads * head_dim


def _shard_mlp(mlp: LlamaMLP, factory: dict) -> None:
    size = mlp.intermediate_size // tp_world_size()
    rows = (tp_rank() * size, size)
    bias = mlp.down_proj.bias is not None
    mlp.gate_up_proj = ColumnParallelLinear(mlp.gate_up_proj.in_features, {0: rows, 1: rows}, bias=bias, **factory)
    mlp.down_proj = RowParallelLinear(size, mlp.down_proj.out_features, bias=bias,
                                      reduce_results=mlp.reduce_results, **factory)
    mlp.intermediate_size = size


def _shard_experts(experts: FusedMoE, factory: dict) -> None:
    size = experts.intermediate_size // tp_world_size()
    num_experts, hidden_size = experts.w2_weight.shape[:2]
    experts.intermediate_rows = (tp_rank() * size, size)
    experts.intermediate_size = size
    experts.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * size, hidden_size, **factory), requires_grad=False)
    experts.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, size, **factory), requires_grad=False)


def _materialize_the_rest(model: nn.Module, config, device: torch.device) -> None:
    """Norm weights get memory (the checkpoint fills them); rotary tables are rebuilt, not loaded (a
    table that layers share, as Gemma's do, stays shared)."""
    rebuilt = {}
    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if isinstance(child, RotaryEmbedding):
                if id(child) not in rebuilt:
                    max_position, half_dim = child.cos_cache.shape
                    table = RotaryEmbedding(config, 2 * half_dim, max_position, child.layer_type)
                    rebuilt[id(child)] = table.to(device)
                setattr(parent, name, rebuilt[id(child)])
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if param.is_meta:
                setattr(module, name, nn.Parameter(torch.empty_like(param, device=device), requires_grad=False))
