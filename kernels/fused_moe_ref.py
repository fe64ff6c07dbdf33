"""The plain-torch mixture-of-experts computation: the CPU path of engine/layers/fused_moe.py and the
oracle of the Triton kernel in fused_moe.py (kept apart from it so CPU runs never import Triton).
One matmul pair per expert over the tokens routed to it, in the order transformers' MoE blocks use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.lora_mapping import LoRATokenMapping
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref


@dataclass
class MoELoRA:
    """LoRA on the experts (engine/lora/moe_layer.py): every (token, k) pair's slot is its adapter's
    slot times the number of experts plus its expert (-1: no adapter), so the batched LoRA kernels
    treat each (adapter, expert) as a slot of its own. gate/up share one A, as PEFT's adapters on
    the stacked gate_up parameter do; B is scaled."""

    pair_mapping: LoRATokenMapping  # filled with the pairs' slots, `[T * top_k]` in pair order
    a13: torch.Tensor  # [slots * E, rank, H]
    b13: torch.Tensor  # [slots * E, 2I, rank]
    a2: torch.Tensor  # [slots * E, rank, I]
    b2: torch.Tensor  # [slots * E, H, rank]


def add_lora_gate_up(x_pairs: torch.Tensor, gate_up: torch.Tensor, lora: MoELoRA, shrink, expand) -> None:
    """gate_up `[P, 2I]` += each adapter pair's B13 @ A13 @ x (in place); x_pairs `[P, H]`."""
    shrunk = torch.empty(x_pairs.shape[0], lora.a13.shape[1], dtype=torch.float32, device=x_pairs.device)
    shrink(x_pairs, lora.a13, lora.pair_mapping, shrunk)
    expand(shrunk, lora.b13, lora.pair_mapping, (0, gate_up.shape[1]), gate_up)


def lora_down_delta(activated: torch.Tensor, hidden_size: int, lora: MoELoRA, shrink, expand) -> torch.Tensor:
    """Each adapter pair's B2 @ A2 @ act `[P, H]`, zero for pairs without an adapter (the router weight
    is the caller's to apply)."""
    shrunk = torch.empty(activated.shape[0], lora.a2.shape[1], dtype=torch.float32, device=activated.device)
    shrink(activated, lora.a2, lora.pair_mapping, shrunk)
    delta = torch.zeros(activated.shape[0], hidden_size, dtype=activated.dtype, device=activated.device)
    return expand(shrunk, lora.b2, lora.pair_mapping, (0, hidden_size), delta)


def fused_moe_ref(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, lora: MoELoRA | None = None) -> torch.Tensor:
    """hidden_states `[T, H]`; w13 `[E, 2I, H]` (each expert's gate rows, then its up rows); w2 `[E, H, I]`;
    topk_weights, topk_ids `[T, top_k]` -> `[T, H]`:
    out[t] = sum over k of topk_weights[t, k] * w2[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = topk_ids[t, k]."""
    if lora is not None:
        return _fused_moe_with_lora_ref(hidden_states, w13, w2, topk_weights, topk_ids, lora)
    out = torch.zeros_like(hidden_states)
    top_k = topk_ids.shape[1]
    pair_experts, pair_weights = topk_ids.reshape(-1), topk_weights.reshape(-1)
    for expert in pair_experts.unique().tolist():
        pairs = (pair_experts == expert).nonzero().squeeze(1)
        tokens = pairs // top_k
        gate, up = F.linear(hidden_states[tokens], w13[expert]).chunk(2, dim=-1)
        expert_out = F.linear(F.silu(gate) * up, w2[expert]) * pair_weights[pairs, None]
        out.index_add_(0, tokens, expert_out.to(out.dtype))
    return out


def _fused_moe_with_lora_ref(hidden_states, w13, w2, topk_weights, topk_ids, lora: MoELoRA) -> torch.Tensor:
    """The same, pair by pair, with each adapter pair's LoRA on gate/up (before the activation) and down."""
    top_k = topk_ids.shape[1]
    pair_experts, pair_weights = topk_ids.reshape(-1), topk_weights.reshape(-1)
    x_pairs = hidden_states.repeat_interleave(top_k, dim=0)
    gate_up = torch.empty(x_pairs.shape[0], w13.shape[1], dtype=hidden_states.dtype, device=hidden_states.device)
    for expert in pair_experts.unique().tolist():
        pairs = (pair_experts == expert).nonzero().squeeze(1)
        gate_up[pairs] = F.linear(x_pairs[pairs], w13[expert])
    add_lora_gate_up(x_pairs, gate_up, lora, lora_shrink_ref, lora_expand_ref)
    gate, up = gate_up.chunk(2, dim=-1)
    activated = F.silu(gate) * up
    down = torch.empty_like(x_pairs)
    for expert in pair_experts.unique().tolist():
        pairs = (pair_experts == expert).nonzero().squeeze(1)
        down[pairs] = F.linear(activated[pairs], w2[expert])
    down += lora_down_delta(activated, hidden_states.shape[1], lora, lora_shrink_ref, lora_expand_ref)
    down = down * pair_weights[:, None]
    return down.view(-1, top_k, down.shape[1]).sum(dim=1).to(hidden_states.dtype)
