"""Dummy weights, ours and the transformers baseline's: built without torch's default init (a 47B model
would be written twice), so every weight must be written by the fill itself; seeded; on the device and
in the dtype asked for. Unwritten memory is made visible by having the skipped init write NaN."""

import math

import pytest
import torch
from torch import nn

from engine import LLM, SamplingParams
from engine.bench.hf_baseline import load_hf_model
from engine.weights import dummy, skip_default_init
from engine.weights.source import ModelSource
from tests.engine.conftest import TINY_VOCAB

TINY_MIXTRAL = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=32, num_attention_heads=4,
                    num_key_value_heads=2, num_local_experts=4, vocab_size=TINY_VOCAB)


@pytest.fixture
def tiny_mixtral(monkeypatch):
    """dummy:tiny-mixtral, with what the skipped default init leaves behind poisoned with NaN; `skipped`
    counts the modules whose init was skipped."""
    architecture, shape = dummy.PRESETS["mixtral-8x7b"]
    monkeypatch.setitem(dummy.PRESETS, "tiny-mixtral", (architecture, shape | TINY_MIXTRAL))
    skipped = []

    def poison(module):
        skipped.append(module)
        module.weight.data.fill_(math.nan)

    monkeypatch.setattr(skip_default_init, "_leave_uninitialized", poison)
    return ModelSource("dummy", preset="tiny-mixtral"), skipped


def test_default_init_is_skipped_inside_the_context_only():
    with skip_default_init.skip_default_init():
        assert nn.Linear.reset_parameters is skip_default_init._leave_uninitialized
        assert nn.Embedding.reset_parameters is skip_default_init._leave_uninitialized
    torch.manual_seed(0)
    assert nn.Linear(64, 64).weight.abs().max() > 0  # torch's own init again
    assert nn.Linear.reset_parameters is not skip_default_init._leave_uninitialized


def engine_weights(seed: int) -> dict[str, torch.Tensor]:
    llm = LLM(model="dummy:tiny-mixtral", dtype="bfloat16", seed=seed, num_gpu_blocks_override=16,
              max_model_len=64, skip_tokenizer_init=True, device="cpu")
    outputs = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 3
    return {name: p.detach().clone() for name, p in llm.llm_engine.runner.model.named_parameters()}


def test_our_dummy_model_writes_every_weight_in_its_dtype_and_by_seed(tiny_mixtral):
    _, skipped = tiny_mixtral
    first, again, other = engine_weights(seed=0), engine_weights(seed=0), engine_weights(seed=1)
    assert skipped  # built without torch's default init
    assert {p.dtype for p in first.values()} == {torch.bfloat16}
    assert not [name for name, p in first.items() if not torch.isfinite(p).all()]
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not torch.equal(first["model.layers.0.mlp.experts.w13_weight"],
                           other["model.layers.0.mlp.experts.w13_weight"])


def test_the_transformers_dummy_model_writes_every_weight_in_its_dtype_and_by_seed(tiny_mixtral):
    source, skipped = tiny_mixtral
    cpu = torch.device("cpu")
    first, again, other = (load_hf_model(source, torch.bfloat16, cpu, seed) for seed in (0, 0, 1))
    assert skipped  # built without torch's default init
    params = dict(first.named_parameters())
    assert {p.dtype for p in params.values()} == {torch.bfloat16}
    assert not [name for name, p in params.items() if not torch.isfinite(p).all()]
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    experts = params["model.layers.0.mlp.experts.gate_up_proj"]
    assert not torch.equal(experts, dict(other.named_parameters())["model.layers.0.mlp.experts.gate_up_proj"])
    assert experts.float().std().item() == pytest.approx(first.config.initializer_range, rel=0.1)
    with torch.inference_mode():
        logits = first(torch.tensor([[1, 2, 3]])).logits
    assert torch.isfinite(logits).all()
