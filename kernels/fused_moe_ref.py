"""The plain-torch mixture-of-experts computation: the CPU path of engine/layers/fused_moe.py and the
oracle of the Triton kernel in fused_moe.py (kept apart from it so CPU runs never import Triton).
One matmul pair per expert over the tokens routed to it, in the order transformers' MoE blocks use.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fused_moe_ref(hidden_states: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """hidden_states `[T, H]`; w13 `[E, 2I, H]` (each expert's gate rows, then its up rows); w2 `[E, H, I]`;
    topk_weights, topk_ids `[T, top_k]` -> `[T, H]`:
    out[t] = sum over k of topk_weights[t, k] * w2[e] @ (silu(gate[e] @ x[t]) * (up[e] @ x[t])), e = topk_ids[t, k]."""
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
