"""Mistral with a sliding window of 7 tokens, against transformers, on prompts many windows long.

The checkpoint is the tiny Mistral of conftest's variants with `sliding_window=7`, saved by
transformers; the reference is transformers' eager attention (the test checks the window changes its
logits). Blocks of 4 tokens, so windows start mid-block. The engine gives the blocks behind the window
back to the pool (engine/core/kv_cache_manager.py), so these runs also read blocks that held other
requests' KV a moment ago: a window edge off by one, a block read behind the window or a wrong prefix
hit shows up as a different token or logprob. A Qwen2 with a full-attention layer and a sliding one
(as Gemma 2 alternates them) has two KV cache groups: only the sliding layer's blocks go back.
tests/kernels/test_sliding_window_on_triton.py runs the same model on the Triton kernels
(interpreted), tests/engine/test_cuda_sliding_window.py on a GPU.
"""

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import assert_greedy_matches_transformers, build_tiny_hf_model, hf_log_softmax
from tests.engine.test_models_vs_hf import VOCAB, as_matrix

WINDOW = 7
PROMPT_LENGTHS = [13, 30, 61]
ATOL = 1e-4
# A pool of 8 usable blocks (32 slots) for requests of about 90 tokens: each holds at most 5 blocks
# (its window's and an 8-token step's), three at once do not fit, so some are preempted.
SMALL_CACHE = dict(num_gpu_blocks_override=9, max_num_batched_tokens=8)


def prompts():
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def save_tiny_mistral(tmp_path_factory, sliding_window):
    """(folder, transformers model in eager attention)."""
    model = build_tiny_hf_model("mistral", sliding_window=sliding_window)
    model.set_attn_implementation("eager")
    folder = tmp_path_factory.mktemp(f"tiny-mistral-window-{sliding_window}")
    model.save_pretrained(str(folder))
    return folder, model


@pytest.fixture(scope="module")
def sliding_mistral(tmp_path_factory):
    return save_tiny_mistral(tmp_path_factory, WINDOW)


@pytest.fixture(scope="module")
def full_attention_mistral(tmp_path_factory):
    """The same weights without the window."""
    return save_tiny_mistral(tmp_path_factory, None)


def make_llm(folder, **options) -> LLM:
    settings = dict(dtype="float32", device="cpu", block_size=4, num_gpu_blocks_override=128, seed=0,
                    skip_tokenizer_init=True)
    return LLM(model=str(folder), **(settings | options))


def test_transformers_applies_the_window(sliding_mistral, full_attention_mistral):
    """Guards the comparisons: the reference's logits depend on the window, and the window is the
    engine's on every layer, with the whole context allowed."""
    folder, hf_model = sliding_mistral
    token_ids = prompts()[2]
    windowed, full = hf_log_softmax(hf_model, token_ids), hf_log_softmax(full_attention_mistral[1], token_ids)
    torch.testing.assert_close(windowed[:WINDOW], full[:WINDOW])
    assert (windowed[WINDOW:] - full[WINDOW:]).abs().max() > 0.1
    engine = make_llm(folder).llm_engine
    assert {layer.sliding_window for layer in engine.runner.attention_layers} == {WINDOW}
    assert engine.kv_cache_manager.sliding_windows == (WINDOW,)
    assert engine.max_model_len == hf_model.config.max_position_embeddings == 256


@pytest.mark.parametrize("options", [
    {},
    dict(max_num_batched_tokens=8),
    SMALL_CACHE,
    pytest.param(dict(tensor_parallel_size=2, **SMALL_CACHE), marks=pytest.mark.slow),
], ids=["whole-prefill", "chunked-prefill", "small-cache", "two-ranks-small-cache"])
def test_logprobs_match_transformers(sliding_mistral, options):
    """Full-vocabulary logprobs of the prompts (prefill) and of the generated tokens (decode). In the
    small cache requests are preempted mid-prefill and their prompts recomputed in other chunks.
    Under tensor parallelism (gloo) the 4 query heads are split over 2 ranks, the one KV head
    replicated, and every rank follows rank 0's block tables as blocks go back to the pool."""
    folder, hf_model = sliding_mistral
    llm = make_llm(folder, **options)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, prompt_logprobs=VOCAB, logprobs=VOCAB)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts()], params, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()
    if options.get("num_gpu_blocks_override"):
        assert llm.llm_engine.scheduler.num_preemptions > 0
    for prompt, output in zip(prompts(), outputs):
        completion = output.outputs[0]
        reference = hf_log_softmax(hf_model, prompt + completion.token_ids[:-1])
        torch.testing.assert_close(as_matrix(output.prompt_logprobs[1:]), reference[:len(prompt) - 1], atol=ATOL,
                                   rtol=0)
        torch.testing.assert_close(as_matrix(completion.logprobs), reference[len(prompt) - 1:], atol=ATOL, rtol=0)


def test_greedy_tokens_match_transformers_generate(sliding_mistral):
    folder, hf_model = sliding_mistral
    assert_greedy_matches_transformers(make_llm(folder), hf_model, prompts(), [24, 16, 20])


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_long_contexts_in_a_cache_smaller_than_one_of_them(sliding_mistral, async_scheduling):
    """Three requests of ~90 tokens through 32 slots of KV cache, with chunked prefill and preemption
    (recomputed from the prefix cache's surviving blocks); with async scheduling blocks are given
    back while the step before still runs."""
    folder, hf_model = sliding_mistral
    llm = make_llm(folder, async_scheduling=async_scheduling, **SMALL_CACHE)
    assert_greedy_matches_transformers(llm, hf_model, prompts(), [30, 28, 30])
    assert llm.llm_engine.scheduler.num_preemptions > 0
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == 8  # every block is back


def test_a_full_attention_model_is_refused_what_a_sliding_one_serves(sliding_mistral, full_attention_mistral):
    """The same request against the same cache: only the window's blocks need to fit."""
    llm = make_llm(sliding_mistral[0], **SMALL_CACHE)
    llm.generate([{"prompt_token_ids": prompts()[2]}], SamplingParams(max_tokens=60), use_tqdm=False)
    full = make_llm(full_attention_mistral[0], **SMALL_CACHE)
    assert full.llm_engine.kv_cache_manager.sliding_windows == (None,)
    with pytest.raises(ValueError, match="tokens of KV cache, but it holds only 32"):
        full.generate([{"prompt_token_ids": prompts()[2]}], SamplingParams(max_tokens=60), use_tqdm=False)


def test_a_prefix_hit_after_the_early_blocks_were_reused(sliding_mistral):
    """The first request's early blocks went back to the small pool during its own prefill and were
    reused; its last blocks are still cached, and the window of the second request's first computed
    token sees only those: a hit of 60 tokens, and the same tokens as transformers."""
    folder, hf_model = sliding_mistral
    llm = make_llm(folder, **SMALL_CACHE)
    prompt = prompts()[2]
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1), use_tqdm=False)
    manager = llm.llm_engine.kv_cache_manager
    assert manager.prefix_cache_hits == 0
    assert_greedy_matches_transformers(llm, hf_model, [prompt + list(range(5, 15))], [20])
    assert manager.prefix_cache_hits == 60


@pytest.mark.parametrize("draft", ["itself", "full-attention"])
def test_a_draft_model_reads_the_blocks_too(sliding_mistral, full_attention_mistral, draft):
    """A draft model reads the target's blocks through its own layers: drafting for itself, blocks still
    go back to the (small) pool; with a full-attention draft every block is kept. Transformers' tokens."""
    folder, hf_model = sliding_mistral
    sliding = draft == "itself"
    spec = {"model": str(folder if sliding else full_attention_mistral[0]), "num_speculative_tokens": 3}
    llm = make_llm(folder, speculative_config=spec, **(SMALL_CACHE if sliding else {}))
    assert llm.llm_engine.kv_cache_manager.sliding_windows == ((WINDOW if sliding else None),)
    assert_greedy_matches_transformers(llm, hf_model, prompts(), [20, 20, 20])
    assert llm.llm_engine.speculation_stats()["spec_num_accepted_tokens"] > 0


@pytest.fixture(scope="module")
def hybrid_qwen2(tmp_path_factory):
    """Qwen2 with use_sliding_window slides from layer max_window_layers on (transformers' layer_types):
    a full-attention layer and a sliding one, as Gemma 2 alternates them."""
    hf_model = build_tiny_hf_model("qwen2", use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1)
    assert hf_model.config.layer_types == ["full_attention", "sliding_attention"]
    hf_model.set_attn_implementation("eager")
    folder = tmp_path_factory.mktemp("tiny-qwen2-hybrid")
    hf_model.save_pretrained(str(folder))
    return folder, hf_model


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_hybrid_model_gives_back_only_its_sliding_layers_blocks(hybrid_qwen2, async_scheduling):
    """Two KV cache groups on one pool: the global layer's blocks are all kept, the sliding layer's go
    back behind the window. 40 usable blocks (a block holds one layer's KV here) for three requests
    of 43-91 tokens (11-23 global blocks each, at most 5 sliding ones): chunked prefill, preemption
    and prefix hits that must agree in both groups; transformers' tokens."""
    folder, hf_model = hybrid_qwen2
    llm = make_llm(folder, num_gpu_blocks_override=41, max_num_batched_tokens=8, async_scheduling=async_scheduling)
    engine = llm.llm_engine
    assert [layer.sliding_window for layer in engine.runner.attention_layers] == [None, WINDOW]
    assert [layer.kv_group for layer in engine.runner.attention_layers] == [0, 1]
    assert engine.kv_cache_manager.sliding_windows == (None, WINDOW)
    assert_greedy_matches_transformers(llm, hf_model, prompts(), [30, 28, 30])
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_cache_manager.num_free_blocks == 40  # every block is back
    prompt = prompts()[2]
    assert_greedy_matches_transformers(llm, hf_model, [prompt + list(range(5, 15))], [20])
    assert engine.kv_cache_manager.prefix_cache_hits >= 60  # the last run's prompt, found in both groups


def test_a_hybrid_model_serves_a_context_whose_global_blocks_fit(hybrid_qwen2):
    """91 tokens need 23 blocks in the global group and at most 5 in the sliding one: 30 one-layer
    blocks serve them. The same memory as one group (a block holds both layers: 15 of them, as
    before the hybrid manager) holds only 56 tokens and refuses the request up front."""
    folder, hf_model = hybrid_qwen2
    config = hf_model.config
    layer_block_bytes = 2 * 4 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads) * 4
    memory = dict(kv_cache_memory_bytes=31 * layer_block_bytes, max_num_batched_tokens=8)
    llm = make_llm(folder, num_gpu_blocks_override=None, **memory)
    assert llm.llm_engine.runner.num_blocks == 31
    assert_greedy_matches_transformers(llm, hf_model, [prompts()[2]], [30])
    with pytest.raises(ValueError, match="tokens of KV cache, but it holds only 120"):
        llm.generate([{"prompt_token_ids": prompts()[2]}], SamplingParams(max_tokens=60), use_tqdm=False)
    one_group = make_llm(folder, num_gpu_blocks_override=None, disable_hybrid_kv_cache_manager=True, **memory)
    assert one_group.llm_engine.kv_cache_manager.sliding_windows == (None,)
    assert one_group.llm_engine.runner.num_blocks == 15
    with pytest.raises(ValueError, match="tokens of KV cache, but it holds only 56"):
        one_group.generate([{"prompt_token_ids": prompts()[2]}], SamplingParams(max_tokens=30), use_tqdm=False)


def test_a_draft_model_reads_a_hybrid_targets_global_group(hybrid_qwen2):
    """A draft model shares the target's blocks through group 0, the global group (full attention
    comes first), so it may read every position even though the target's sliding group gives its
    blocks back: drafting for itself in a cache too small for both groups' full KV."""
    folder, hf_model = hybrid_qwen2
    llm = make_llm(folder, num_gpu_blocks_override=41, max_num_batched_tokens=8,
                   speculative_config={"model": str(folder), "num_speculative_tokens": 3})
    assert llm.llm_engine.kv_cache_manager.sliding_windows == (None, WINDOW)
    assert_greedy_matches_transformers(llm, hf_model, prompts(), [20, 20, 20])
    assert llm.llm_engine.speculation_stats()["spec_num_accepted_tokens"] > 0
    assert llm.llm_engine.kv_cache_manager.num_free_blocks == 40
