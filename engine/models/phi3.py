"""Phi-3: a Llama whose checkpoints store q/k/v as one `qkv_proj` and gate/up as one `gate_up_proj`.

The fused tensors are cut back into their parts as they are read, so each part takes the path of
a Llama checkpoint's separate tensor, tensor-parallel slicing included (a rank's slice of a fused
tensor is not a contiguous block of it). LongRoPE lives in `engine/layers/rotary.py`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from engine.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        return super().load_weights(self._unfused(weights))

    def _unfused(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        config = self.config  # full sizes: under tensor parallelism the layers hold one rank's
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        q_size = config.num_attention_heads * head_dim
        kv_size = (getattr(config, "num_key_value_heads", None) or config.num_attention_heads) * head_dim
        for name, tensor in weights:
            if ".qkv_proj." in name:
                parts = zip(("q_proj", "k_proj", "v_proj"), tensor.split([q_size, kv_size, kv_size]))
                yield from ((name.replace("qkv_proj", part), piece) for part, piece in parts)
            elif ".gate_up_proj." in name:
                parts = zip(("gate_proj", "up_proj"), tensor.chunk(2))
                yield from ((name.replace("gate_up_proj", part), piece) for part, piece in parts)
            else:
                yield name, tensor
