"""Mixture-of-experts relatives of Llama: Mixtral, Qwen2-MoE and Qwen3-MoE.

Attention, norms and the residual stream are Llama's (Qwen2-MoE's q/k/v bias is Qwen2's, Qwen3-MoE's
per-head q/k norms are Qwen3's). The MLP of a sparse layer is a SparseMoeBlock: a router (`gate`)
picks top_k experts per token and FusedMoE runs them. Qwen's models keep a dense MLP on the layers
that `mlp_only_layers` and `decoder_sparse_step` name, and Qwen2-MoE adds a shared expert that every
token passes through, scaled by a sigmoid gate.

Checkpoints store each expert's weights apart (`block_sparse_moe.experts.N.w1/w3/w2` in Mixtral's,
`mlp.experts.N.gate_proj/up_proj/down_proj` in Qwen's), as the Hub's checkpoints and transformers'
save_pretrained write them, or stacked over the experts (`mlp.experts.gate_up_proj [E, 2I, H]` and
`mlp.experts.down_proj [E, H, I]`), as transformers 5 holds them in memory; both load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from engine.distributed.parallel_state import all_reduce
from engine.layers.fused_moe import FusedMoE
from engine.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP

EXPERT_WEIGHT = re.compile(r"(?P<experts>.+\.mlp\.experts)\."
                           r"(?:(?P<index>\d+)\.(?P<projection>\w+)\.weight|(?P<stacked>gate_up_proj|down_proj))")
EXPERT_PARTS = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}


def num_experts_of(config) -> int:
    return getattr(config, "num_local_experts", None) or config.num_experts


def is_sparse_layer(config, layer_index: int) -> bool:
    """transformers' rule for Qwen MoE (Mixtral's configs name no dense layers: every layer is sparse)."""
    dense_layers = getattr(config, "mlp_only_layers", None) or []
    step = getattr(config, "decoder_sparse_step", None) or 1
    return layer_index not in dense_layers and num_experts_of(config) > 0 and (layer_index + 1) % step == 0


class SparseMoeBlock(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"MoE experts with {config.hidden_act!r} activations are not supported (only silu)")
        num_experts = num_experts_of(config)
        self.gate = nn.Linear(config.hidden_size, num_experts, bias=False)
        # Mixtral always renormalises the top-k weights and keeps them in float32; Qwen's MoE routers
        # renormalise when norm_topk_prob says so and round the weights to the logits' dtype.
        self.experts = FusedMoE(num_experts, config.num_experts_per_tok, config.hidden_size,
                                getattr(config, "moe_intermediate_size", None) or config.intermediate_size,
                                renormalize=getattr(config, "norm_topk_prob", True),
                                round_weights=config.model_type != "mixtral")
        shared_size = getattr(config, "shared_expert_intermediate_size", 0)
        self.shared_expert = LlamaMLP(config, shared_size, reduce_results=False) if shared_size else None
        self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False) if shared_size else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Under tensor parallelism the routed and shared experts' partial sums meet in one all-reduce."""
        out = self.experts(hidden_states, self.gate(hidden_states))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(hidden_states)) * self.shared_expert(hidden_states)
        return all_reduce(out)


class MoeDecoderLayer(LlamaDecoderLayer):
    @staticmethod
    def make_mlp(config, layer_index: int) -> nn.Module:
        return SparseMoeBlock(config) if is_sparse_layer(config, layer_index) else LlamaMLP(config)


class MixtralForCausalLM(LlamaForCausalLM):
    decoder_layer = MoeDecoderLayer

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Expert weights go to their FusedMoE layer; everything else takes Llama's path."""
        loaded_experts: set[str] = set()
        loaded = super().load_weights(self._load_experts(weights, loaded_experts))
        return loaded | loaded_experts

    def _load_experts(self, weights: Iterable[tuple[str, torch.Tensor]],
                      loaded: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Loads the expert tensors as they pass (adding what they cover to `loaded`); yields the rest."""
        for name, tensor in weights:
            name = name.replace(".block_sparse_moe.", ".mlp.")  # Mixtral's checkpoint name for its MoE block
            match = EXPERT_WEIGHT.fullmatch(name)
            if match is None:
                yield name, tensor
                continue
            experts = self._experts_at(match["experts"], name)
            if match["stacked"] == "gate_up_proj":  # [E, 2I, H]: each expert's gate rows, then its up rows
                parts = zip(("gate", "up"), tensor.chunk(2, dim=-2))
            elif match["stacked"] == "down_proj":
                parts = [("down", tensor)]
            elif match["projection"] in EXPERT_PARTS:
                parts = [(EXPERT_PARTS[match["projection"]], tensor)]
            else:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            expert = None if match["stacked"] else int(match["index"])
            for part, piece in parts:
                loaded.update(f"{match['experts']}.{covered}" for covered in experts.load(part, piece, expert))

    def _experts_at(self, path: str, name: str) -> FusedMoE:
        try:
            experts = self.get_submodule(path)
        except AttributeError:
            experts = None
        if not isinstance(experts, FusedMoE):
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__} "
                             f"(is this layer dense in the config?)")
        return experts

    def expected_weight_names(self) -> set[str]:
        names = {name for name in super().expected_weight_names() if not name.endswith(("w13_weight", "w2_weight"))}
        for path, module in self.named_modules():
            if isinstance(module, FusedMoE):
                names.update(f"{path}.{name}" for name in module.weight_names())
        return names


class Qwen3MoeForCausalLM(MixtralForCausalLM):
    qk_norm = True
