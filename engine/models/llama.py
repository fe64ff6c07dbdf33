"""The Llama family (Llama 2/3, SmolLM2, Mistral with its sliding window; `attention_bias` and
`mlp_bias` where a config sets them) and its close relatives Qwen2 (q/k/v bias), Qwen3 (per-head q/k
RMSNorm) and Granite (four scalar multipliers, read from its config), as one flat-batch model over
the paged KV cache.

Inputs are flat: all scheduled tokens of all requests in one `[num_tokens]` tensor with their
positions; the attention layers find each token's sequence through the forward context.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.layers.activation import SiluAndMul
from engine.layers.attention import Attention
from engine.layers.linear import Linear, linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding


def sliding_window_of(config, layer_index: int) -> int | None:
    """A layer's sliding window as transformers applies it: Mistral's and Phi-3's `sliding_window` on
    every layer; Qwen2/Qwen3's only where `layer_types` says so (from `max_window_layers` on, and only
    with `use_sliding_window`)."""
    window = getattr(config, "sliding_window", None)
    if not window or not getattr(config, "use_sliding_window", True):
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and layer_types[layer_index] != "sliding_attention":
        return None
    return window


class LlamaAttention(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, rotary_emb: RotaryEmbedding | None = None, *,
                 sliding_window: int | None = None) -> None:
        """`rotary_emb`: a table the model's layers share (Gemma's: one per layer type), else one of its own."""
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        # Llama's attention_bias covers o_proj too; Qwen2's q/k/v bias does not.
        self.o_proj = Linear(self.q_size, config.hidden_size, bias=bool(getattr(config, "attention_bias", False)))
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rotary_emb = rotary_emb or RotaryEmbedding(config, self.head_dim, config.max_position_embeddings)
        # Granite's attention_multiplier replaces 1/sqrt(head_dim).
        scale = getattr(config, "attention_multiplier", None) or self.head_dim ** -0.5
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window=sliding_window)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        out = self.attn(q, k, v, positions, self.rotary_emb)
        return self.o_proj(out.flatten(1))


class LlamaMLP(nn.Module):
    def __init__(self, config, intermediate_size: int | None = None, reduce_results: bool = True) -> None:
        """`intermediate_size`: the config's unless given (an MoE block's shared expert has its own).
        `reduce_results=False`: under tensor parallelism the down projection leaves its partial sums to
        the caller, which all-reduces them with others at once (an MoE block's shared expert)."""
        super().__init__()
        self.intermediate_size = intermediate_size or config.intermediate_size
        self.reduce_results = reduce_results
        bias = bool(getattr(config, "mlp_bias", False))
        self.gate_up_proj = Linear(config.hidden_size, 2 * self.intermediate_size, bias=bias)
        self.down_proj = Linear(self.intermediate_size, config.hidden_size, bias=bias)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if type(self.act_fn) is SiluAndMul and isinstance(self.down_proj, Linear):  # not wrapped (LoRA, prepacked)
            return self.down_proj(gate_up, silu_gated=True)  # the activation inside the product (batch 1)
        return self.down_proj(self.act_fn(gate_up))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, layer_index: int) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, qkv_bias, qk_norm,
                                        sliding_window=sliding_window_of(config, layer_index))
        self.mlp = self.make_mlp(config, layer_index)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        # Granite scales each block's output before the residual add.
        self.residual_multiplier = getattr(config, "residual_multiplier", 1.0)

    def forward(self, positions, hidden_states, residual):
        """Returns (block output, residual): their sum is the stream, added by the next norm (fused)."""
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self._scaled(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self._scaled(self.mlp(hidden_states)), residual

    def _scaled(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.residual_multiplier == 1.0 else x * self.residual_multiplier

    @staticmethod
    def make_mlp(config, layer_index: int) -> nn.Module:
        """The layer's feed-forward block (mixture-of-experts models put their experts here)."""
        return LlamaMLP(config)


class LlamaModel(nn.Module):
    def __init__(self, config, decoder_layer, qkv_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embedding_multiplier = getattr(config, "embedding_multiplier", 1.0)  # Granite
        self.layers = nn.ModuleList(decoder_layer(config, qkv_bias, qk_norm, index)
                                    for index in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed_tokens(input_ids), None
        if self.embedding_multiplier != 1.0:
            hidden_states = hidden_states * self.embedding_multiplier
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class LlamaForCausalLM(nn.Module):
    decoder_layer = LlamaDecoderLayer
    qkv_bias = False
    qk_norm = False
    # Checkpoint names folded into our merged projections: (ours, theirs, shard).
    stacked_params = (("qkv_proj", "q_proj", "q"), ("qkv_proj", "k_proj", "k"), ("qkv_proj", "v_proj", "v"),
                      ("gate_up_proj", "gate_proj", 0), ("gate_up_proj", "up_proj", 1))

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False) or getattr(config, "qkv_bias", False)
        self.model = LlamaModel(config, self.decoder_layer, qkv_bias, self.qk_norm)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        self.lm_head = None if self.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.packed_lm_head = None  # the CPU's float32 output projection (engine/layers/prepacked_linear.py)
        self.logits_scaling = getattr(config, "logits_scaling", 1.0)  # Granite divides its logits by it

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        logits = self.output_projection(hidden_states)
        return logits if self.logits_scaling == 1.0 else logits / self.logits_scaling

    def output_projection(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Hidden states times the lm_head (the embedding when tied), before any scaling or soft-cap."""
        if self.packed_lm_head is not None:
            return self.packed_lm_head(hidden_states)
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return linear(hidden_states, weight)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy checkpoint tensors (Hugging Face names) in; returns the names of parameters loaded."""
        params = dict(self.named_parameters())
        loaded = set()
        for name, tensor in weights:
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the output projection
            target, shard = self._resolve(name)
            if target not in params:
                raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
            param = params[target]
            if hasattr(param, "tp_slice"):  # a tensor-parallel shard keeps only its part
                tensor = param.tp_slice(tensor, shard)
            destination = param.data if shard is None else self._shard_of(param.data, target, shard)
            if destination.shape != tensor.shape:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"expected {tuple(destination.shape)}")
            destination.copy_(tensor)
            loaded.add(target if shard is None else f"{target}:{shard}")
        return loaded

    def _resolve(self, name: str) -> tuple[str, object]:
        for ours, theirs, shard in self.stacked_params:
            if f".{theirs}." in name:
                return name.replace(theirs, ours), shard
        return name, None

    def _shard_of(self, param: torch.Tensor, name: str, shard) -> torch.Tensor:
        owner = self.get_submodule(name.rsplit(".", 2)[0])  # the attention or MLP holding the merged projection
        if "qkv_proj" in name:
            offsets = {"q": (0, owner.q_size), "k": (owner.q_size, owner.kv_size),
                       "v": (owner.q_size + owner.kv_size, owner.kv_size)}
            start, size = offsets[shard]
        else:
            size = owner.intermediate_size
            start = shard * size
        return param.narrow(0, start, size)

    def expected_weight_names(self) -> set[str]:
        names = set()
        for name, _ in self.named_parameters():
            stacked = [(s, ours) for ours, _, s in self.stacked_params if ours in name]
            names.update(f"{name}:{s}" for s, _ in stacked) if stacked else names.add(name)
        return names


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
