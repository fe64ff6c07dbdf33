"""Gemma 1, 2 and 3 (text, and a multimodal Gemma 3 checkpoint's decoder): what the tiny checkpoints
exercise, the bfloat16 roundings transformers has that a float32 comparison cannot see, the dummy
presets of real shapes, and dummy models whose vocabulary is larger than the tokenizer they borrow.

The comparisons with transformers (logprobs within 1e-4 over prompts longer than the sliding window,
greedy tokens, chunked prefill) are test_models_vs_hf.py's variants "gemma", "gemma2" and "gemma3";
tensor parallelism is in test_tensor_parallel.py.
"""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.layers.norm import RMSNorm
from engine.models.gemma import GemmaModel, Gemma2DecoderLayer
from engine.models.registry import get_model_class
from engine.weights.dummy import PRESETS, dummy_config
from tests.engine.conftest import hf_log_softmax
from tests.engine.test_models_vs_hf import PROMPT_LENGTHS, prompts

GEMMAS = ["gemma", "gemma2", "gemma3"]


def test_the_checkpoints_are_what_the_variants_claim(tiny_hf_checkpoint):
    models = {v: tiny_hf_checkpoint(v)[1] for v in GEMMAS}
    for model in models.values():
        config = model.config
        assert config.head_dim * config.num_attention_heads != config.hidden_size
        assert model.lm_head.weight is model.model.embed_tokens.weight
    for variant in ("gemma2", "gemma3"):
        config = models[variant].config
        assert set(config.layer_types) == {"sliding_attention", "full_attention"}
        assert config.sliding_window < min(PROMPT_LENGTHS)
        assert config.query_pre_attn_scalar != config.head_dim
    gemma3 = models["gemma3"]
    rope = gemma3.config.rope_parameters
    assert rope["full_attention"]["rope_type"] == "linear" and rope["sliding_attention"]["rope_type"] == "default"
    assert rope["full_attention"]["rope_theta"] != rope["sliding_attention"]["rope_theta"]
    assert gemma3.model.layers[0].self_attn.q_norm is not None


@pytest.mark.parametrize("variant, cap", [("gemma2", "final"), ("gemma2", "attention"), ("gemma3", "final")])
def test_the_soft_caps_bend_the_tiny_models_logits(tiny_hf_checkpoint, variant, cap):
    """Else matching transformers would not show that the engine caps at all."""
    model = tiny_hf_checkpoint(variant)[1]
    holders = ([model.config] if cap == "final" else [layer.self_attn for layer in model.model.layers])
    name = "final_logit_softcapping" if cap == "final" else "attn_logit_softcapping"
    capped = hf_log_softmax(model, prompts()[2])
    values = [getattr(holder, name) for holder in holders]
    assert all(value is not None for value in values)
    try:
        for holder in holders:
            setattr(holder, name, None)
        uncapped = hf_log_softmax(model, prompts()[2])
    finally:
        for holder, value in zip(holders, values):
            setattr(holder, name, value)
    assert (capped - uncapped).abs().max() > 0.1


def test_norm_rounds_as_transformers_in_bfloat16():
    """(1 + w) is applied in float32 and rounded after, unlike Llama's norm: bit for bit in bfloat16."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2RMSNorm

    generator = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(16, 3584, generator=generator).to(torch.bfloat16) for _ in range(2))
    theirs = Gemma2RMSNorm(3584, eps=1e-6).to(torch.bfloat16)
    ours = RMSNorm(3584, 1e-6, one_plus_weight=True).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.normal_(0.0, 0.5, generator=generator)
        ours.weight.copy_(theirs.weight)
        assert torch.equal(ours(x), theirs(x))
        normed, summed = ours(x, residual)
        assert torch.equal(summed, x + residual) and torch.equal(normed, theirs(x + residual))
        llama_style = RMSNorm(3584, 1e-6).to(torch.bfloat16)
        llama_style.weight.copy_(1.0 + theirs.weight.float())
        assert not torch.equal(llama_style(x), theirs(x))  # the rounding this test is about


def test_embedding_scale_is_rounded_to_the_model_dtype_as_transformers_does():
    """sqrt(3584) = 59.87 becomes 59.75 in bfloat16, in transformers and here."""
    from transformers.models.gemma2.modeling_gemma2 import Gemma2TextScaledWordEmbedding

    from transformers import Gemma2Config

    config = Gemma2Config(vocab_size=64, hidden_size=3584, intermediate_size=8, num_hidden_layers=1,
                          num_attention_heads=1, num_key_value_heads=1, head_dim=8)
    ours = GemmaModel(config, Gemma2DecoderLayer, qk_norm=False, caps_attention_logits=True).to(torch.bfloat16)
    theirs = Gemma2TextScaledWordEmbedding(64, 3584, 0, embed_scale=3584 ** 0.5).to(torch.bfloat16)
    with torch.no_grad():
        theirs.weight.copy_(ours.embed_tokens.weight)
        ids = torch.arange(64)
        assert torch.equal(ours.embed(ids), theirs(ids))
        assert torch.equal(ours.embed(ids), ours.embed_tokens(ids) * 59.75)


@pytest.mark.parametrize("preset, billions, window, num_global, rope", [
    ("gemma-2-9b", 9.24, 4096, 21, {"rope_type": "default", "rope_theta": 10000.0}),
    ("gemma-3-12b", 11.77, 1024, 8, {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                     "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6}}),
])
def test_dummy_presets_have_the_real_shapes(preset, billions, window, num_global, rope):
    config = dummy_config(preset)
    with torch.device("meta"):
        model = get_model_class(config)(config)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(billions * 1e9, rel=2e-3)
    assert config.layer_types.count("full_attention") == num_global and config.sliding_window == window
    assert config.rope_parameters == rope and config.head_dim == 256
    windows = [layer.self_attn.attn.sliding_window for layer in model.model.layers]
    assert windows == [window if t == "sliding_attention" else None for t in config.layer_types]


@pytest.fixture
def wide_vocabulary_preset(monkeypatch):
    """A small Gemma 2 dummy preset whose 60,000-id vocabulary outgrows the borrowed SmolLM2 tokenizer
    (49,152 ids), as the real Gemma presets' 256k do."""
    shape = dict(vocab_size=60000, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, max_position_embeddings=256, sliding_window=None)
    monkeypatch.setitem(PRESETS, "tiny-gemma-2-wide-vocab", ("Gemma2ForCausalLM", shape))
    return "dummy:tiny-gemma-2-wide-vocab"


def test_a_dummy_model_samples_only_ids_its_borrowed_tokenizer_can_spell(wide_vocabulary_preset, bundled_tokenizer):
    """Random weights make every id about equally likely: unmasked, 18% of samples would lie beyond
    the tokenizer and decode to nothing."""
    llm = LLM(model=wide_vocabulary_preset, dtype="float32", num_gpu_blocks_override=64, seed=0)
    limit = len(bundled_tokenizer)
    assert llm.llm_engine.vocab_size == limit < llm.llm_engine.model_config.vocab_size
    params = SamplingParams(temperature=1.0, max_tokens=48, ignore_eos=True, seed=1, logprobs=3)
    outputs = llm.generate(["The capital of France is", "def fibonacci(n):", "Once upon a time"], params,
                           use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert len(completion.token_ids) == 48 and max(completion.token_ids) < limit
        assert completion.text == bundled_tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        assert all(max(entry) < limit and all(lp.logprob > -float("inf") for lp in entry.values())
                   for entry in completion.logprobs)
    with pytest.raises(ValueError, match=rf"prompt token ids must be integers in \[0, {limit}\)"):
        llm.generate([{"prompt_token_ids": [5, limit]}], params, use_tqdm=False)


def test_without_a_tokenizer_a_dummy_model_samples_its_whole_vocabulary(wide_vocabulary_preset, bundled_tokenizer):
    """Token-id benchmarks (skip_tokenizer_init) keep the model's own vocabulary."""
    llm = LLM(model=wide_vocabulary_preset, dtype="float32", num_gpu_blocks_override=64, seed=0,
              skip_tokenizer_init=True)
    assert llm.llm_engine.vocab_size == 60000
    params = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True, seed=1)
    output = llm.generate([{"prompt_token_ids": [59999, 3, 4]}], params, use_tqdm=False)[0]
    assert max(output.outputs[0].token_ids) >= len(bundled_tokenizer)


@pytest.fixture(scope="module")
def tiny_multimodal_gemma3(tmp_path_factory):
    """A tiny Gemma3ForConditionalGeneration (SigLIP tower, projector, the "gemma3" text variant's
    decoder), saved by transformers in the Hub's layout: (folder, transformers model)."""
    import transformers

    from tests.engine.conftest import TINY_VARIANTS, TINY_VOCAB

    _, extra, _ = TINY_VARIANTS["gemma3"]
    text = transformers.Gemma3TextConfig(**(dict(
        vocab_size=TINY_VOCAB + 8, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2,
        initializer_range=0.1) | extra))
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4,
                                       boi_token_index=TINY_VOCAB + 5, eoi_token_index=TINY_VOCAB + 6,
                                       image_token_index=TINY_VOCAB + 7)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    model.set_attn_implementation("eager")
    folder = tmp_path_factory.mktemp("tiny-gemma3-multimodal")
    model.save_pretrained(str(folder))
    return folder, model


def test_a_multimodal_gemma_3_checkpoint_serves_its_language_model(tiny_multimodal_gemma3):
    """Gemma 3 at 4B and up ships as Gemma3ForConditionalGeneration: its decoder is served for text
    (the vision tower's tensors are never read), with transformers' logprobs and greedy tokens on
    text-only prompts longer than the sliding window."""
    folder, hf_model = tiny_multimodal_gemma3
    llm = LLM(model=str(folder), dtype="float32", block_size=4, num_gpu_blocks_override=256, seed=0,
              skip_tokenizer_init=True)
    engine = llm.llm_engine
    assert engine.model_config.architectures == ["Gemma3ForCausalLM"]
    assert engine.kv_cache_manager.sliding_windows == (None, 8, 8)  # one global layer, two local
    for prompt in prompts():
        output = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(
            temperature=0, max_tokens=8, ignore_eos=True, logprobs=20), use_tqdm=False)[0].outputs[0]
        with torch.no_grad():
            ids = torch.tensor([prompt])
            expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.token_ids == expected
        reference = hf_log_softmax(hf_model, prompt + output.token_ids[:-1])[len(prompt) - 1:]
        for row, (token, entries) in enumerate(zip(output.token_ids, output.logprobs)):
            assert abs(entries[token].logprob - reference[row, token].item()) < 1e-4
