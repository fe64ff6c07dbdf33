"""Shared fixtures for the engine tests.

Expensive objects (the bundled tokenizer, tiny Hugging Face checkpoints) are built once per
session. Scheduler-level tests drive the real `Scheduler` and `KVCacheManager` with a "fake model":
the test plays the model runner's part and feeds sampled token ids back into `Scheduler.update`.
"""

from __future__ import annotations

import itertools
import os

import pytest

from engine.config import BUNDLED_MODEL, SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler import Scheduler
from engine.request import Request
from engine.sampling_params import SamplingParams

TINY_VOCAB = 256


# -- tokenizer ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bundled_tokenizer():
    """SmolLM2's tokenizer from its GGUF; on a GPU machine where the 94 MB model package cannot travel,
    the same tokenizer saved as a folder (`BUNDLED_TOKENIZER_DIR`, see benchmarks/h200_serving.sh)."""
    from engine.tokenization import load_tokenizer
    from engine.weights import resolve_model

    saved = os.environ.get("BUNDLED_TOKENIZER_DIR")
    if saved:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(saved)
    return load_tokenizer(resolve_model(BUNDLED_MODEL))


# -- requests and the scheduler ------------------------------------------------------------------


@pytest.fixture
def make_request():
    """`make_request(request_id, prompt_token_ids, priority=0, arrival_time=None, cache_salt=None,
    parent_id=None, index=0, tenant=None, **sampling_params)`; arrival times default to a strictly increasing
    counter so tests never depend on the clock's resolution."""
    clock = itertools.count()

    def make(request_id, prompt_token_ids, *, priority=0, arrival_time=None, cache_salt=None,
             parent_id=None, index=0, tenant=None, **params) -> Request:
        params.setdefault("max_tokens", 16)
        return Request(request_id, list(prompt_token_ids), SamplingParams(**params), priority=priority,
                       arrival_time=float(next(clock)) if arrival_time is None else arrival_time,
                       cache_salt=cache_salt, parent_id=parent_id, index=index, tenant=tenant)

    return make


@pytest.fixture
def make_scheduler():
    """`make_scheduler(num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=16,
    max_model_len=1024, long_prefill_token_threshold=None, enable_caching=True)`."""

    def make(*, num_blocks=64, block_size=4, max_num_batched_tokens=64, max_num_seqs=16, max_model_len=1024,
             long_prefill_token_threshold=None, enable_caching=True) -> Scheduler:
        threshold = long_prefill_token_threshold or max_num_batched_tokens
        config = SchedulerConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                                 max_num_batched_tokens=max_num_batched_tokens,
                                 long_prefill_token_threshold=threshold)
        return Scheduler(config, KVCacheManager(num_blocks, block_size, enable_caching))

    return make


def _default_next_token(request: Request) -> int:
    # Deterministic, varied, and never an EOS (the scheduler's requests have no stop ids).
    return 10 + (request.num_tokens * 7) % 90


@pytest.fixture
def fake_step():
    """`fake_step(scheduler, next_token=...) -> (scheduler_output, finished_requests)`: one
    synchronous step (schedule, then update before the next schedule).

    Plays the model runner: it samples a token for exactly the requests in
    `output.sampling_req_ids`, as ModelRunner does. `next_token(request)` sees the request as
    schedule() left it (`num_computed_tokens` already advanced past this step's tokens). When no
    step was in flight, the scheduler's choice of who samples is checked against the rule it must
    follow: a request samples when this step computes its last known token.
    """

    def step(scheduler: Scheduler, next_token=_default_next_token):
        synchronous = scheduler.steps_in_flight() == 0
        output = scheduler.schedule()
        assert output.sampling_req_ids <= output.num_scheduled_tokens.keys()
        sampled = {}
        for request_id, num_new in output.num_scheduled_tokens.items():  # batch order
            assert num_new >= 1
            request = scheduler.requests[request_id]
            if synchronous:
                computes_last_token = request.num_computed_tokens == request.num_tokens
                assert (request_id in output.sampling_req_ids) == (
                    computes_last_token and not request.is_prefill_only), (request, output)
            if request_id in output.sampling_req_ids:
                sampled[request_id] = next_token(request)
        finished = scheduler.update(output, sampled)
        return output, finished

    return step


@pytest.fixture
def run_to_completion(fake_step):
    """Step until the scheduler is idle; returns the list of SchedulerOutputs (fails if stuck)."""

    def run(scheduler: Scheduler, max_steps: int = 2000, next_token=_default_next_token):
        outputs = []
        for _ in range(max_steps):
            if not scheduler.has_unfinished_requests():
                return outputs
            output, _ = fake_step(scheduler, next_token)
            assert not output.is_empty(), "scheduler has unfinished requests but scheduled nothing"
            outputs.append(output)
        raise AssertionError(f"scheduler did not finish within {max_steps} steps")

    return run


# -- transformers references ---------------------------------------------------------------------


def load_bundled_hf_model():
    """The bundled model through transformers' own GGUF loader, float32: the reference our loader
    must match. A plain function, not a fixture, so callers can free its 0.5 GB when done."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.weights.source import bundled_model_path

    path = bundled_model_path()
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def hf_log_softmax(hf_model, token_ids):
    """[len(token_ids), vocab] float32 log-probabilities; row p is the distribution of token p + 1."""
    import torch

    with torch.no_grad():
        logits = hf_model(torch.tensor([token_ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def assert_greedy_matches_transformers(llm, hf_model, prompts: list[list[int]], max_tokens: list[int]) -> None:
    """The engine's greedy tokens for each prompt (with its own max_tokens, so requests finish at
    different steps) equal transformers' `generate` on the device hf_model is on."""
    import torch

    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in max_tokens]
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    device = next(hf_model.parameters()).device
    for prompt, n, output in zip(prompts, max_tokens, outputs, strict=True):
        ids = torch.tensor([prompt], device=device)
        with torch.no_grad():
            expected = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                                         eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert output.outputs[0].token_ids == expected


# -- tiny Hugging Face checkpoints ---------------------------------------------------------------

_ROPE_LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# Phi-3's LongRoPE, with factors for the tiny head_dim 16 and an original length of 8, so every test
# prompt is longer (transformers then uses the long factors throughout, as the engine does when its
# table is longer than 8); "phi3-short-rope" stops at 64 positions, so both use the short factors.
_ROPE_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 8,
                  "short_factor": [1.0 + 0.3 * i for i in range(8)], "long_factor": [2.0 + 3.0 * i for i in range(8)]}
_GRANITE = dict(embedding_multiplier=3.0, attention_multiplier=0.1, residual_multiplier=0.6, logits_scaling=1.7)
# Gemma: head_dim 32, not hidden / heads = 16. Gemma 2/3: an 8-token window (shorter than every test
# prompt) on the sliding layers, an attention scale of query_pre_attn_scalar 24 (not head_dim), and
# soft-caps low enough that tanh bends the tiny model's scores (up to ~12) and logits (up to ~7).
# Gemma 3's global layers rotate with a base and linear scaling of their own.
_GEMMA2 = dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=24, attn_logit_softcapping=5.0,
               final_logit_softcapping=4.0)
_GEMMA3_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0}}

# Mixture of experts: Mixtral's 8 experts of intermediate_size, top 2, renormalised; Qwen2-MoE's 8 small
# experts, top 2 not renormalised, a shared expert, and a dense second layer (mlp_only_layers); Qwen3-MoE's
# 16 experts, top 4 renormalised, sparse only on every second layer (decoder_sparse_step).
_MIXTRAL = dict(tie_word_embeddings=False, num_local_experts=8, num_experts_per_tok=2)
_QWEN2_MOE = dict(tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                  shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1])
_QWEN3_MOE = dict(tie_word_embeddings=False, head_dim=32, num_experts=16, num_experts_per_tok=4,
                  moe_intermediate_size=48, norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4)

# name -> (config class name, extra config kwargs, save_pretrained kwargs)
TINY_VARIANTS = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=False), {}),
    "llama-bias": ("LlamaConfig", dict(tie_word_embeddings=False, attention_bias=True, mlp_bias=True), {}),
    "llama3-rope-tied-sharded": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters=_ROPE_LLAMA3),
                                 dict(max_shard_size="60KB")),
    "mistral": ("MistralConfig", dict(tie_word_embeddings=False, num_key_value_heads=1, head_dim=32), {}),
    "qwen2": ("Qwen2Config", dict(tie_word_embeddings=True), {}),
    "qwen3": ("Qwen3Config", dict(tie_word_embeddings=False, head_dim=32), {}),
    "granite": ("GraniteConfig", dict(tie_word_embeddings=True, **_GRANITE), {}),
    # One KV head: under two ranks the k norm's slice is replicated, the q norm's split.
    "olmo2": ("Olmo2Config", dict(tie_word_embeddings=False, num_key_value_heads=1), {}),
    "phi3": ("Phi3Config", dict(tie_word_embeddings=False, pad_token_id=0, original_max_position_embeddings=8,
                                rope_parameters=_ROPE_LONGROPE), {}),
    "phi3-short-rope": ("Phi3Config", dict(tie_word_embeddings=False, pad_token_id=0, max_position_embeddings=64,
                                           original_max_position_embeddings=64,
                                           rope_parameters={**_ROPE_LONGROPE, "original_max_position_embeddings": 64}),
                        {}),
    "gemma": ("GemmaConfig", dict(head_dim=32, hidden_act="gelu_pytorch_tanh"), {}),
    "gemma2": ("Gemma2Config", _GEMMA2, {}),
    # Two local layers, then a global one; Gemma 3 has no attention soft-cap (transformers ignores it).
    "gemma3": ("Gemma3TextConfig", dict(_GEMMA2, attn_logit_softcapping=None, num_hidden_layers=3,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                        rope_parameters=_GEMMA3_ROPE), {}),
    "mixtral": ("MixtralConfig", _MIXTRAL, {}),
    "qwen2-moe": ("Qwen2MoeConfig", _QWEN2_MOE, {}),
    "qwen3-moe": ("Qwen3MoeConfig", _QWEN3_MOE, {}),
}


def build_tiny_hf_model(variant: str, seed: int = 0, **overrides):
    """A tiny random transformers model (float32, eval mode) of one of TINY_VARIANTS; `overrides` are
    config fields that replace the variant's."""
    import torch
    import transformers

    config_name, extra, _ = TINY_VARIANTS[variant]
    kwargs = dict(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    kwargs.update(extra)
    kwargs.update(overrides)
    config = getattr(transformers, config_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norms and biases start at constants; randomise them so they matter
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                param.normal_(0.0, 0.2)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_hf_checkpoint(tmp_path_factory, bundled_tokenizer):
    """`tiny_hf_checkpoint(variant) -> (folder, hf_model)`: a complete Hugging Face folder
    (config.json, *.safetensors, the bundled model's tokenizer files), built once per variant."""
    cache = {}

    def get(variant: str):
        if variant not in cache:
            folder = tmp_path_factory.mktemp(f"tiny-{variant}")
            model = build_tiny_hf_model(variant)
            model.save_pretrained(str(folder), **TINY_VARIANTS[variant][2])
            bundled_tokenizer.save_pretrained(str(folder))
            cache[variant] = (folder, model)
        return cache[variant]

    return get
