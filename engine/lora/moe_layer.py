"""LoRA on a mixture of experts' experts: each adapter has A/B per expert for the stacked gate/up
weight (one A for both, as PEFT's adapters on transformers' `gate_up_proj` parameter) and for down.

The layer keeps `max_loras x E` LoRA slots per projection, and each step maps every (token, k) pair
to its adapter's slot times E plus its expert (`kernels/fused_moe_ref.py`'s MoELoRA), so the batched
LoRA kernels run the whole layer's adapter pairs in one shrink and one expand per projection. Under
tensor parallelism a rank keeps the B rows (gate/up) and the A columns (down) of its slice of every
expert's intermediate dimension, as FusedMoE keeps its weights; the down deltas are partial sums
that join the block's one all-reduce.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.fused_moe import FusedMoE
from engine.lora.adapter import LoRAExpertWeights
from engine.lora.layers import LoRAContext
from kernels.fused_moe_ref import MoELoRA
from kernels.lora_mapping import NO_ADAPTER, LoRATokenMapping


class LoRAFusedMoE(nn.Module):
    def __init__(self, base_layer: FusedMoE, context: LoRAContext, pair_mapping: LoRATokenMapping, max_loras: int,
                 max_rank: int) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.context = context
        self.pair_mapping = pair_mapping  # shared by the model's MoE layers: each refills it in turn
        self.max_rank = max_rank
        experts, hidden, local = base_layer.num_experts, base_layer.w2_weight.shape[1], base_layer.intermediate_size
        factory = dict(dtype=base_layer.w13_weight.dtype, device=base_layer.w13_weight.device)
        slots = max_loras * experts
        self.register_buffer("a13", torch.zeros(slots, max_rank, hidden, **factory), persistent=False)
        self.register_buffer("b13", torch.zeros(slots, 2 * local, max_rank, **factory), persistent=False)
        self.register_buffer("a2", torch.zeros(slots, max_rank, local, **factory), persistent=False)
        self.register_buffer("b2", torch.zeros(slots, hidden, max_rank, **factory), persistent=False)

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        base = self.base_layer
        if not self.context.active:
            return base(hidden_states, router_logits)
        weights, ids = base.route(router_logits)
        token_slots = self.context.mapping.token_slots[:hidden_states.shape[0], None]
        pair_slots = torch.where(token_slots == NO_ADAPTER, NO_ADAPTER, token_slots * base.num_experts + ids)
        self.pair_mapping.fill(pair_slots.view(-1).to(torch.int32))
        return base.run_experts(hidden_states, weights, ids, MoELoRA(self.pair_mapping, self.a13, self.b13, self.a2,
                                                                     self.b2))

    def slot_image(self, weights: LoRAExpertWeights | None) -> tuple[torch.Tensor, ...] | None:
        """This rank's contents of one adapter's E slots (host tensors, zero-padded to max_rank)."""
        if weights is None:
            return None
        experts, rank = self.base_layer.num_experts, self.max_rank
        images = [torch.zeros(experts, *buffer.shape[1:], dtype=buffer.dtype)
                  for buffer in (self.a13, self.b13, self.a2, self.b2)]
        start, size = self.base_layer.intermediate_rows
        if weights.gate_up is not None:
            lora_a, lora_b = weights.gate_up
            full = lora_b.shape[1] // 2  # each expert's gate rows, then its up rows: this rank's of each
            images[0][:, :lora_a.shape[1]] = lora_a
            images[1][:, :, :lora_b.shape[2]] = torch.cat([lora_b[:, start:start + size],
                                                           lora_b[:, full + start:full + start + size]], dim=1)
        if weights.down is not None:
            lora_a, lora_b = weights.down
            images[2][:, :lora_a.shape[1]] = lora_a[:, :, start:start + size]
            images[3][:, :, :lora_b.shape[2]] = lora_b
        if self.a13.is_cuda:  # pinned, so slot copies queue on the stream without a host wait
            images = [image.pin_memory() for image in images]
        return tuple(images)

    def set_slot(self, slot: int, image: tuple[torch.Tensor, ...] | None) -> None:
        """Slot `slot`'s E expert slots; ordered on the stream after the steps already launched."""
        experts = self.base_layer.num_experts
        rows = slice(slot * experts, (slot + 1) * experts)
        for index, buffer in enumerate((self.a13, self.b13, self.a2, self.b2)):
            if image is None:
                buffer[rows].zero_()
            else:
                buffer[rows].copy_(image[index], non_blocking=True)


def wrap_lora_experts(model: nn.Module, context: LoRAContext, max_loras: int, max_rank: int,
                      max_num_tokens: int) -> dict[str, LoRAFusedMoE]:
    """Swap every FusedMoE for its LoRA layer (after the weights are loaded); by module name."""
    found = [(name, module) for name, module in model.named_modules() if isinstance(module, FusedMoE)]
    if not found:
        return {}
    top_k, experts = found[0][1].top_k, found[0][1].num_experts
    pair_mapping = LoRATokenMapping(max_num_tokens * top_k, max_loras * experts, context.mapping.token_slots.device)
    wrapped = {}
    for name, module in found:
        parent_name, leaf = name.rsplit(".", 1)
        wrapped[name] = LoRAFusedMoE(module, context, pair_mapping, max_loras, max_rank)
        setattr(model.get_submodule(parent_name), leaf, wrapped[name])
    return wrapped
