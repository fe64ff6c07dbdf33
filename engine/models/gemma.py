"""Gemma 1, 2 and 3 (text): Llama's skeleton with Gemma's numerics, matching transformers.

All three: a GeGLU MLP (gelu, tanh approximation), RMSNorms that scale by (1 + w) in float32
(checkpoints store the weight minus one), token embeddings times sqrt(hidden_size) rounded to the
model's dtype (as transformers casts it: 59.75, not 59.87, for hidden 3584 in bfloat16), a head_dim
of its own (256 in the real models, not hidden / heads) and tied embeddings.

Gemma 2 normalises each block's attention and MLP outputs before their residual adds (and the MLP's
input), scales attention by query_pre_attn_scalar ** -0.5, soft-caps attention logits and the final
logits (cap * tanh(x / cap)), and alternates local (sliding-window) and global layers (`layer_types`).
Gemma 3 keeps that, drops the attention soft-cap (transformers ignores `attn_logit_softcapping`
there), adds per-head q/k norms before rotary, and gives local and global layers rope bases (and
scaling) of their own: `rope_parameters` keyed by layer type. Layers of one rope share its table.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from engine.layers.activation import GeluAndMul
from engine.layers.attention import Attention
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP

# transformers' activation names -> F.gelu's `approximate`
_GELU_APPROXIMATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}


def gemma_norm(config, size: int | None = None) -> RMSNorm:
    return RMSNorm(size or config.hidden_size, config.rms_norm_eps, one_plus_weight=True)


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


@functools.cache
def in_dtype(value: float, dtype: torch.dtype) -> float:
    """`value` as `dtype` holds it (worked out on the host: no device sync, also inside a CUDA graph capture)."""
    return torch.tensor(value, dtype=dtype, device="cpu").item()


class GemmaMLP(LlamaMLP):
    def __init__(self, config, activation: str) -> None:
        super().__init__(config)
        if activation not in _GELU_APPROXIMATIONS:
            raise ValueError(f"unsupported Gemma activation {activation!r}; supported: {sorted(_GELU_APPROXIMATIONS)}")
        self.act_fn = GeluAndMul(_GELU_APPROXIMATIONS[activation])


class GemmaAttention(LlamaAttention):
    """Llama's attention (projections, q/k norms, rotary, paged attention) with Gemma's scale, and
    its layer type's rotary table and sliding window."""

    def __init__(self, config, layer_type: str, rotary_emb: RotaryEmbedding, qk_norm: bool,
                 logits_soft_cap: float | None) -> None:
        super().__init__(config, bool(getattr(config, "attention_bias", False)), False, rotary_emb)
        if qk_norm:
            self.q_norm, self.k_norm = gemma_norm(config, self.head_dim), gemma_norm(config, self.head_dim)
        scale = (getattr(config, "query_pre_attn_scalar", None) or self.head_dim) ** -0.5
        window = config.sliding_window if layer_type == "sliding_attention" else None
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale, sliding_window=window,
                              logits_soft_cap=logits_soft_cap)


class GemmaDecoderLayer(nn.Module):
    """Gemma 1: Llama's block (norm, attention, add; norm, MLP, add)."""

    activation_field = "hidden_act"  # Gemma 2 and 3 read `hidden_activation`, as transformers does

    def __init__(self, config, attention: GemmaAttention) -> None:
        super().__init__()
        self.self_attn = attention
        self.mlp = GemmaMLP(config, getattr(config, self.activation_field))
        self.input_layernorm = gemma_norm(config)
        self.post_attention_layernorm = gemma_norm(config)

    def forward(self, positions, hidden_states, residual):
        """Llama's protocol: returns (block output, residual), whose sum is the stream."""
        hidden_states, residual = self._input_norm(hidden_states, residual)
        hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual

    def _input_norm(self, hidden_states, residual):
        if residual is None:
            return self.input_layernorm(hidden_states), hidden_states
        return self.input_layernorm(hidden_states, residual)


class Gemma2DecoderLayer(GemmaDecoderLayer):
    """Gemma 2 and 3: attention and MLP outputs are normalised before their residual adds."""

    activation_field = "hidden_activation"

    def __init__(self, config, attention: GemmaAttention) -> None:
        super().__init__(config, attention)
        self.pre_feedforward_layernorm = gemma_norm(config)
        self.post_feedforward_layernorm = gemma_norm(config)

    def forward(self, positions, hidden_states, residual):
        hidden_states, residual = self._input_norm(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


class GemmaModel(nn.Module):
    def __init__(self, config, decoder_layer, qk_norm: bool, caps_attention_logits: bool) -> None:
        super().__init__()
        if getattr(config, "use_bidirectional_attention", False):
            raise ValueError("a Gemma with use_bidirectional_attention (an embedding model) does not generate text")
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_scale = config.hidden_size ** 0.5
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * config.num_hidden_layers
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope_per_type = set(layer_types) <= set(getattr(config, "rope_parameters", None) or {})
        tables = {}  # rope key -> the table its layers share
        for key in {t if rope_per_type else None for t in layer_types}:
            tables[key] = RotaryEmbedding(config, head_dim, config.max_position_embeddings, key)
        cap = getattr(config, "attn_logit_softcapping", None) if caps_attention_logits else None
        self.layers = nn.ModuleList(
            decoder_layer(config, GemmaAttention(config, t, tables[t if rope_per_type else None], qk_norm, cap))
            for t in layer_types)
        self.norm = gemma_norm(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states, residual = self.embed(input_ids), None
        for layer in self.layers:
            hidden_states, residual = layer(positions, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Embeddings times sqrt(hidden_size), a factor first rounded to their dtype (as transformers does)."""
        embeddings = self.embed_tokens(input_ids)
        return embeddings * in_dtype(self.embed_scale, embeddings.dtype)


class GemmaForCausalLM(LlamaForCausalLM):
    """Llama's weight loading (into merged q/k/v and gate/up projections) and tensor-parallel sharding
    (the attention and MLP are Llama's kinds); Gemma's own model and final soft-cap."""

    decoder_layer = GemmaDecoderLayer
    qk_norm = False
    caps_attention_logits = False

    def __init__(self, config) -> None:
        nn.Module.__init__(self)  # not Llama's: its model is not Gemma's
        self.config = config
        self.model = GemmaModel(config, self.decoder_layer, self.qk_norm, self.caps_attention_logits)
        tied = self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", True))
        self.lm_head = None if tied else Linear(config.hidden_size, config.vocab_size, bias=False)
        self.packed_lm_head = None
        self.final_logit_soft_cap = getattr(config, "final_logit_softcapping", None)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Capped here, so sampling and every logprob see what transformers' logits are."""
        logits = self.output_projection(hidden_states)
        return logits if self.final_logit_soft_cap is None else soft_cap(logits, self.final_logit_soft_cap)


class Gemma2ForCausalLM(GemmaForCausalLM):
    decoder_layer = Gemma2DecoderLayer
    caps_attention_logits = True


class Gemma3ForCausalLM(GemmaForCausalLM):
    decoder_layer = Gemma2DecoderLayer
    qk_norm = True
