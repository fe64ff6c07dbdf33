"""OLMo 2: Llama's blocks with the norms moved. Each block's attention and MLP outputs are
RMS-normalised before their residual add (no norms in front of them), and q and k are each
normalised over all heads at once, right after the projection, before rotary.

Under tensor parallelism a rank holds only its heads, so `shard.py` swaps those two norms for
`ParallelRMSNorm`, which all-reduces the sum of squares: the same norm as on one device.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.layers.norm import RMSNorm
from engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


class Olmo2Attention(LlamaAttention):
    def __init__(self, config, qkv_bias: bool) -> None:
        super().__init__(config, qkv_bias, qk_norm=False)
        self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden_states).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q).view(-1, self.num_heads, self.head_dim)
        k = self.k_norm(k).view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, positions, self.rotary_emb).flatten(1))


class Olmo2DecoderLayer(nn.Module):
    def __init__(self, config, qkv_bias: bool, qk_norm: bool, layer_index: int) -> None:
        super().__init__()
        self.self_attn = Olmo2Attention(config, qkv_bias)
        self.mlp = LlamaMLP(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions, hidden_states, residual):
        """Llama's protocol: returns (block output, residual), whose sum the next layer (or the final
        norm) takes as its input."""
        if residual is not None:
            hidden_states = hidden_states + residual
        residual = hidden_states + self.post_attention_layernorm(self.self_attn(positions, hidden_states))
        return self.post_feedforward_layernorm(self.mlp(residual)), residual


class Olmo2ForCausalLM(LlamaForCausalLM):
    decoder_layer = Olmo2DecoderLayer
