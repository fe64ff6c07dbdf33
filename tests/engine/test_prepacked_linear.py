"""The CPU's float32 linear layers, packed once for oneDNN (engine/layers/prepacked_linear.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.layers.linear import Linear
from engine.layers.prepacked_linear import PrepackedLinear, weight_bytes


@pytest.mark.parametrize("rows", [0, 1, 5, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_a_packed_layer_computes_what_f_linear_does(rows, bias):
    torch.manual_seed(0)
    layer = nn.Linear(96, 200, bias=bias)
    x = torch.randn(rows, 160)[:, :96]  # strided rows, as a slice of a wider activation
    with torch.inference_mode():
        torch.testing.assert_close(PrepackedLinear(layer.weight, layer.bias)(x), F.linear(x, layer.weight, layer.bias),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["llama", "qwen2"])  # its own lm_head; tied to the embedding
def test_a_cpu_float32_engine_runs_every_projection_packed(tiny_hf_checkpoint, variant):
    from engine.llm import LLM

    folder, hf_model = tiny_hf_checkpoint(variant)
    llm = LLM(model=str(folder), dtype="float32", block_size=4, num_gpu_blocks_override=16, seed=0)
    model = llm.llm_engine.runner.model
    assert not any(type(module) in (nn.Linear, Linear) for module in model.modules())
    assert isinstance(model.model.layers[0].mlp.gate_up_proj, PrepackedLinear)
    embedding = hf_model.model.embed_tokens.weight
    tied = hf_model.lm_head.weight is embedding
    # The same weights as transformers' model, and the tied output projection's packed copy besides.
    assert weight_bytes(model) == sum(p.numel() * 4 for p in hf_model.parameters()) + tied * embedding.numel() * 4
    hidden = torch.randn(5, embedding.shape[1])
    with torch.inference_mode():
        torch.testing.assert_close(model.compute_logits(hidden), F.linear(hidden, hf_model.lm_head.weight),
                                   rtol=1e-5, atol=1e-5)
    llm.llm_engine.shutdown()
