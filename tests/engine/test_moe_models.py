"""Mixtral, Qwen2-MoE and Qwen3-MoE beyond the transformers comparison of test_models_vs_hf.py: the
tiny checkpoints hold what they claim, the routers pick as transformers' do, both checkpoint layouts
(per-expert tensors and stacked 3-D ones) load, tensor parallelism splits the experts, and what the
engine cannot do with them is refused clearly."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.layers.fused_moe import select_experts
from tests.engine.conftest import TINY_VOCAB
from tests.engine.test_tensor_parallel import TINY, assert_same_generations, generate, prompts

MOE_VARIANTS = ["mixtral", "qwen2-moe", "qwen3-moe"]
GREEDY_LOGPROBS = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, logprobs=5, prompt_logprobs=5)


def tensor_names(folder) -> set[str]:
    names = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def test_the_checkpoints_are_what_the_variants_claim(tiny_hf_checkpoint):
    """Guards on the test data: per-expert tensors as the Hub names them, dense layers where the configs
    put them, a shared expert, and routers whose weights are not all equal."""
    mixtral_folder, mixtral = tiny_hf_checkpoint("mixtral")
    assert "model.layers.0.block_sparse_moe.experts.7.w3.weight" in tensor_names(mixtral_folder)
    assert mixtral.config.num_local_experts == 8 and mixtral.config.num_experts_per_tok == 2
    qwen2_folder, qwen2 = tiny_hf_checkpoint("qwen2-moe")
    names = tensor_names(qwen2_folder)
    assert {"model.layers.0.mlp.experts.0.gate_proj.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
            "model.layers.0.mlp.shared_expert_gate.weight", "model.layers.0.self_attn.q_proj.bias",
            "model.layers.1.mlp.gate_proj.weight"} <= names
    assert not any(name.startswith("model.layers.1.mlp.experts") for name in names)
    assert qwen2.config.norm_topk_prob is False
    qwen3_folder, qwen3 = tiny_hf_checkpoint("qwen3-moe")
    names = tensor_names(qwen3_folder)
    sparse = [any(name.startswith(f"model.layers.{i}.mlp.experts.") for name in names) for i in range(4)]
    assert sparse == [False, True, False, True] and qwen3.config.num_experts_per_tok == 4
    for model in (mixtral, qwen2, qwen3):
        routers = [p for n, p in model.named_parameters() if n.endswith("mlp.gate.weight")]
        assert routers and all(router.std() > 0.05 for router in routers)


@pytest.mark.parametrize("router_class, norm_topk_prob", [
    ("MixtralTopKRouter", None), ("Qwen2MoeTopKRouter", False), ("Qwen3MoeTopKRouter", True)])
def test_select_experts_picks_as_transformers_routers(router_class, norm_topk_prob):
    import transformers
    from transformers.models.mixtral import modeling_mixtral
    from transformers.models.qwen2_moe import modeling_qwen2_moe
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    module = {"Mixtral": modeling_mixtral, "Qwen2Moe": modeling_qwen2_moe, "Qwen3Moe": modeling_qwen3_moe}[
        router_class.removesuffix("TopKRouter")]
    config_class = getattr(transformers, router_class.replace("TopKRouter", "Config"))
    extra = {} if norm_topk_prob is None else {"norm_topk_prob": norm_topk_prob}
    config = config_class(hidden_size=32, num_experts_per_tok=3, **extra, **(
        {"num_local_experts": 10} if norm_topk_prob is None else {"num_experts": 10}))
    router = getattr(module, router_class)(config)
    torch.manual_seed(0)
    torch.nn.init.normal_(router.weight)
    hidden = torch.randn(20, 32)
    logits, expected_weights, expected_ids = router(hidden)
    weights, ids = select_experts(logits, 3, renormalize=norm_topk_prob is not False)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights, expected_weights.float(), atol=0, rtol=0)
    assert (weights.sum(-1) - 1).abs().max() > 1e-3 if norm_topk_prob is False else True


def stacked_copy(variant, tiny_hf_checkpoint, tmp_path):
    """The checkpoint as transformers 5 holds it in memory: experts stacked into 3-D gate_up / down."""
    folder, hf_model = tiny_hf_checkpoint(variant)
    state = {name: tensor.contiguous() for name, tensor in hf_model.state_dict().items()}
    assert any(name.endswith("mlp.experts.gate_up_proj") and tensor.dim() == 3 for name, tensor in state.items())
    save_file(state, str(tmp_path / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((folder / name).read_bytes())
    return folder, tmp_path


@pytest.mark.parametrize("variant", ["mixtral", "qwen2-moe"])
def test_stacked_expert_tensors_load_like_per_expert_ones(tiny_hf_checkpoint, tmp_path, variant):
    per_expert, stacked = stacked_copy(variant, tiny_hf_checkpoint, tmp_path)
    options = dict(dtype="float32", block_size=4, num_gpu_blocks_override=64, seed=0)
    expected = LLM(model=str(per_expert), **options).generate(prompts(2), GREEDY_LOGPROBS, use_tqdm=False)
    actual = LLM(model=str(stacked), **options).generate(prompts(2), GREEDY_LOGPROBS, use_tqdm=False)
    assert_same_generations(expected, actual)


def test_a_checkpoint_missing_an_expert_is_reported(tiny_hf_checkpoint, tmp_path):
    folder, hf_model = tiny_hf_checkpoint("mixtral")
    tensors = {}
    with safe_open(str(next(folder.glob("*.safetensors"))), framework="pt") as handle:
        for name in handle.keys():
            if name != "model.layers.1.block_sparse_moe.experts.5.w2.weight":
                tensors[name] = handle.get_tensor(name)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_bytes((folder / "config.json").read_bytes())
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*model\.layers\.1\.mlp\.experts\.w2_weight:5:down"):
        LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=16, skip_tokenizer_init=True)


def test_experts_for_a_dense_layer_are_reported(tiny_hf_checkpoint, tmp_path):
    """A config that makes layer 0 dense does not fit a checkpoint whose layer 0 has experts."""
    folder, _ = tiny_hf_checkpoint("qwen2-moe")
    config = json.loads((folder / "config.json").read_text())
    config["mlp_only_layers"] = [0, 1]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(next(folder.glob("*.safetensors")).read_bytes())
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.0\..* has no place.*dense"):
        LLM(model=str(tmp_path), dtype="float32", num_gpu_blocks_override=16, skip_tokenizer_init=True)


@pytest.mark.slow
@pytest.mark.parametrize("variant", MOE_VARIANTS)
def test_two_ranks_match_one(tiny_hf_checkpoint, variant):
    """Each rank holds half of every expert's intermediate rows (and of the shared expert's); the
    routed and shared partial sums meet in one all-reduce."""
    folder, _ = tiny_hf_checkpoint(variant)
    assert_same_generations(generate(folder, 1, prompts(), **TINY), generate(folder, 2, prompts(), **TINY))


def test_a_size_that_does_not_divide_the_experts_is_refused(tiny_hf_checkpoint, tmp_path):
    """4 divides the heads, KV heads (replicated) and the other MLP sizes, not the experts' 50."""
    folder, _ = tiny_hf_checkpoint("qwen3-moe")
    config = json.loads((folder / "config.json").read_text()) | {"moe_intermediate_size": 50}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"tensor_parallel_size=4 does not divide the model's expert MLP size 50"):
        LLM(model=str(tmp_path), tensor_parallel_size=4, skip_tokenizer_init=True, **TINY)


def test_experts_with_another_activation_are_refused(tiny_hf_checkpoint, tmp_path):
    folder, _ = tiny_hf_checkpoint("mixtral")
    config = json.loads((folder / "config.json").read_text()) | {"hidden_act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'gelu' activations are not supported"):
        LLM(model=str(tmp_path), skip_tokenizer_init=True, **TINY)


@pytest.mark.parametrize("preset, experts, top_k, billions", [("mixtral-8x7b", 8, 2, 46.7),
                                                              ("qwen3-30b-a3b", 128, 8, 30.5)])
def test_moe_presets_have_the_real_shapes(preset, experts, top_k, billions):
    """Built on the meta device: the parameter count of the real model, no memory."""
    from engine.models.registry import get_model_class
    from engine.weights.dummy import dummy_config

    config = dummy_config(preset)
    with torch.device("meta"):
        model = get_model_class(config)(config)
    moe = model.model.layers[0].mlp.experts
    assert (moe.num_experts, moe.top_k) == (experts, top_k)
    assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, abs=0.05)


def test_dummy_moe_model_generates_on_cpu():
    """A dummy preset's architecture end to end on the CPU, shrunk to two layers of small experts."""
    from engine.weights import dummy

    architecture, shape = dummy.PRESETS["qwen3-30b-a3b"]
    small = shape | dict(num_hidden_layers=2, hidden_size=64, moe_intermediate_size=16, intermediate_size=32,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=TINY_VOCAB)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dummy.PRESETS, "tiny-qwen3-moe", (architecture, small))
        llm = LLM(model="dummy:tiny-qwen3-moe", dtype="float32", num_gpu_blocks_override=16, max_model_len=64,
                  skip_tokenizer_init=True)
        outputs = llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=4, ignore_eos=True),
                               use_tqdm=False)
    assert len(outputs[0].outputs[0].token_ids) == 4


def test_a_moe_gguf_file_is_refused(tmp_path):
    """A Mixtral GGUF says `llama` with an expert count; read as a dense Llama it would load nothing."""
    import gguf

    path = tmp_path / "mixtral.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_expert_count(8)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"mixture-of-experts GGUF files \(llama\.expert_count=8\)"):
        LLM(model=str(path), **TINY)
