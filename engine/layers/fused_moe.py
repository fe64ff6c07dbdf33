"""A mixture-of-experts layer: a router's top-k choice per token, then every expert of the layer in one
fused kernel (kernels/fused_moe.py on CUDA, its torch reference elsewhere).

The experts' weights are stacked as vLLM stacks them: `w13_weight [E, 2I, H]` (each expert's gate rows,
then its up rows) and `w2_weight [E, H, I]`. Under tensor parallelism every rank keeps a slice of each
expert's intermediate dimension (`intermediate_rows`, set by engine/distributed/shard.py), so its output
is a partial sum that the MoE block all-reduces once.
"""

from __future__ import annotations

import torch
from torch import nn

from kernels import triton_or_reference
from kernels.fused_moe_ref import MoELoRA, fused_moe_ref


def select_experts(router_logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights float32, expert ids) `[T, top_k]`: softmax over all experts in float32, the top k, and
    with `renormalize` those k divided by their sum, as transformers' Mixtral and Qwen MoE routers do."""
    probabilities = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probabilities, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


class FusedMoE(nn.Module):
    def __init__(self, num_experts: int, top_k: int, hidden_size: int, intermediate_size: int, renormalize: bool,
                 round_weights: bool) -> None:
        """`round_weights`: the router weights are rounded to the logits' dtype before use (Qwen MoE
        does, Mixtral keeps them in float32)."""
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.renormalize, self.round_weights = renormalize, round_weights
        self.intermediate_size = intermediate_size  # this rank's
        self.intermediate_rows = (0, intermediate_size)  # (first, count) of each expert's full rows held here
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        """This rank's part of sum_k weight_k * expert_k(x), to be all-reduced under tensor parallelism."""
        return self.run_experts(hidden_states, *self.route(router_logits))

    def route(self, router_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(router weights, expert ids) `[T, top_k]` as this model's router gives them."""
        weights, ids = select_experts(router_logits, self.top_k, self.renormalize)
        return (weights.to(router_logits.dtype) if self.round_weights else weights), ids

    def run_experts(self, hidden_states: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor,
                    lora: MoELoRA | None = None) -> torch.Tensor:
        experts = triton_or_reference(hidden_states, "fused_moe", fused_moe_ref)
        return experts(hidden_states, self.w13_weight, self.w2_weight, weights, ids, lora=lora)

    def load(self, part: str, tensor: torch.Tensor, expert: int | None) -> list[str]:
        """Copy in one expert's `gate` or `up` `[I, H]` or `down` `[H, I]` weight, or with expert None
        the same stacked over all experts (`[E, I, H]`, `[E, H, I]`); this rank keeps its rows of I.
        Returns the names the load covered (as weight_names() lists them)."""
        if expert is not None and not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is beyond the model's {self.num_experts} experts")
        start, size = self.intermediate_rows
        experts = slice(None) if expert is None else expert
        if part == "down":
            source, destination = tensor.narrow(-1, start, size), self.w2_weight.data[experts]
        else:
            source = tensor.narrow(-2, start, size)
            destination = self.w13_weight.data[experts].narrow(-2, 0 if part == "gate" else size, size)
        if source.shape != destination.shape:
            raise ValueError(f"expert {part} weight of shape {tuple(tensor.shape)} does not fit "
                             f"{self.num_experts} experts of intermediate size {self.intermediate_size}")
        destination.copy_(source)
        covered = range(self.num_experts) if expert is None else [expert]
        return [f"{'w2' if part == 'down' else 'w13'}_weight:{e}:{part}" for e in covered]

    def weight_names(self) -> list[str]:
        return [f"{param}:{e}:{part}" for e in range(self.num_experts)
                for param, parts in (("w13_weight", ("gate", "up")), ("w2_weight", ("down",))) for part in parts]
