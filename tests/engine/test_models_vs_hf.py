"""Tiny random Llama, Mistral, Qwen2, Qwen3, Granite, OLMo 2 and Phi-3 checkpoints: the engine against
transformers.

Each variant (see TINY_VARIANTS in conftest.py) is a real Hugging Face folder written by
`save_pretrained`: config.json, one or several safetensors files, tokenizer files. The engine's
full-vocabulary logprobs must equal transformers' log-softmax within 1e-4: `prompt_logprobs` over
the prompt (the prefill path, also when chunked) and `logprobs` of generated tokens (the paged
decode path). Greedy tokens must equal `generate(do_sample=False)`. Block size 4, so prompts span
many blocks.
"""

import pytest
import torch
from safetensors import safe_open

from engine import LLM, SamplingParams
from tests.engine.conftest import hf_log_softmax

VARIANTS = ["llama", "llama-bias", "llama3-rope-tied-sharded", "mistral", "qwen2", "qwen3", "granite", "olmo2",
            "phi3", "phi3-short-rope", "mixtral", "qwen2-moe", "qwen3-moe", "gemma", "gemma2", "gemma3"]
VOCAB = 256
PROMPT_LENGTHS = [13, 30, 45]
ATOL = 1e-4


def prompts():
    generator = torch.Generator().manual_seed(7)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def engines(tiny_hf_checkpoint):
    """`engines(variant, **options) -> (LLM, hf_model)`, one LLM per (variant, options)."""
    built = {}

    def get(variant, **options):
        key = (variant, tuple(sorted(options.items())))
        if key not in built:
            folder, hf_model = tiny_hf_checkpoint(variant)
            settings = dict(dtype="float32", block_size=4, num_gpu_blocks_override=128, seed=0) | options
            built[key] = (LLM(model=str(folder), **settings), hf_model)
        return built[key]

    return get


def as_matrix(entries):
    """One {token_id: Logprob} dict per position, covering the whole vocabulary -> [positions, vocab]."""
    matrix = torch.full((len(entries), VOCAB), float("nan"))
    for row, entry in enumerate(entries):
        assert len(entry) == VOCAB, f"position {row} lists {len(entry)} tokens, not the whole vocabulary"
        for token_id, logprob in entry.items():
            matrix[row, token_id] = logprob.logprob
    return matrix


def test_the_checkpoints_are_what_the_variants_claim(tiny_hf_checkpoint):
    """Guards on the test data: the features each variant exists to exercise are really there."""
    files = {v: sorted(p.name for p in tiny_hf_checkpoint(v)[0].glob("*.safetensors")) for v in VARIANTS}
    assert len(files["llama3-rope-tied-sharded"]) > 1 and len(files["llama"]) == 1
    models = {v: tiny_hf_checkpoint(v)[1] for v in VARIANTS}
    biased = dict(models["llama-bias"].named_parameters())
    assert {"model.layers.0.self_attn.o_proj.bias", "model.layers.0.mlp.down_proj.bias",
            "model.layers.0.mlp.gate_proj.bias"} <= set(biased)
    tied = models["llama3-rope-tied-sharded"]
    assert tied.config.rope_parameters["rope_type"] == "llama3"
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert models["llama"].lm_head.weight is not models["llama"].model.embed_tokens.weight
    assert models["qwen2"].model.layers[0].self_attn.q_proj.bias is not None
    assert models["qwen3"].model.layers[0].self_attn.q_norm is not None
    assert models["qwen3"].config.head_dim * 4 != models["qwen3"].config.hidden_size
    assert models["mistral"].config.num_key_value_heads == 1
    granite = models["granite"].config
    assert all(getattr(granite, name) != default for name, default in (
        ("embedding_multiplier", 1.0), ("residual_multiplier", 1.0), ("logits_scaling", 1.0),
        ("attention_multiplier", (granite.hidden_size // granite.num_attention_heads) ** -0.5)))
    olmo_attention = models["olmo2"].model.layers[0].self_attn
    assert olmo_attention.q_norm.weight.shape == (models["olmo2"].config.hidden_size,)  # all heads, not one
    with safe_open(str(next(tiny_hf_checkpoint("phi3")[0].glob("*.safetensors"))), framework="pt") as handle:
        fused = {"model.layers.0.self_attn.qkv_proj.weight", "model.layers.0.mlp.gate_up_proj.weight"}
        assert fused <= set(handle.keys())
    long_rope, short_rope = (models[v].config for v in ("phi3", "phi3-short-rope"))
    assert long_rope.rope_parameters["original_max_position_embeddings"] < min(PROMPT_LENGTHS)
    assert long_rope.max_position_embeddings > long_rope.rope_parameters["original_max_position_embeddings"]
    assert max(PROMPT_LENGTHS) + 16 <= short_rope.rope_parameters["original_max_position_embeddings"]
    assert short_rope.max_position_embeddings == short_rope.rope_parameters["original_max_position_embeddings"]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole-prefill", "chunked-prefill"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_logprobs_match_transformers(engines, variant, chunked):
    options = dict(max_num_batched_tokens=8) if chunked else {}
    llm, hf_model = engines(variant, **options)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=VOCAB, logprobs=VOCAB)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    for prompt, output in zip(prompts(), outputs):
        completion = output.outputs[0]
        reference = hf_log_softmax(hf_model, prompt + completion.token_ids[:-1])
        assert reference.std(dim=-1).min() > 0.1, "logits too flat for a meaningful comparison"

        assert output.prompt_logprobs[0] is None and len(output.prompt_logprobs) == len(prompt)
        ours_prompt = as_matrix(output.prompt_logprobs[1:])
        torch.testing.assert_close(ours_prompt, reference[:len(prompt) - 1], atol=ATOL, rtol=0)

        ours_generated = as_matrix(completion.logprobs)
        torch.testing.assert_close(ours_generated, reference[len(prompt) - 1:], atol=ATOL, rtol=0)


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_tokens_match_transformers_generate(engines, variant):
    llm, hf_model = engines(variant)
    params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    for prompt, output in zip(prompts(), outputs):
        with torch.no_grad():
            generated = hf_model.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                          eos_token_id=None, pad_token_id=0)
        expected = generated[0, len(prompt):].tolist()
        assert len(expected) == 16
        assert output.outputs[0].token_ids == expected
