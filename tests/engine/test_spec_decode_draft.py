"""Draft-model speculative decoding: the option and its refusals, greedy tokens identical with and
without a draft (the bundled model as its own draft, and a tiny random Llama drafting for another;
also under preemption, chunked prefill and the prefix cache), the rejection sampler keeping the
target's distribution, and sampled tokens that follow it with a different draft (chi-square)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import BUNDLED_MODEL, EngineConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.rejection_sampler import rejection_sample
from tests.engine.conftest import TINY_VOCAB, build_tiny_hf_model
from tests.engine.test_sampler import CHI2_CRITICAL, chi_square
from tests.engine.test_spec_decode import (CHAT, PROMPTS, TEXT, assert_sampled_triples_follow_the_target,
                                          greedy_tokens)

SELF_DRAFT = {"model": BUNDLED_MODEL, "num_speculative_tokens": 4}
OPTIONS = dict(dtype="float32", max_model_len=1024)


def test_a_model_implies_the_draft_model_method():
    config = SpeculativeConfig.from_dict({"model": "dummy:llama-3.2-1b", "num_speculative_tokens": 5})
    assert (config.method, config.model, config.num_speculative_tokens) == ("draft_model", "dummy:llama-3.2-1b", 5)
    assert config.uses_draft_model
    for bad, words in [({"method": "draft_model"}, "needs"), ({"method": "ngram", "model": "x"}, "needs"),
                       ({"model": ""}, "model")]:
        with pytest.raises(ValueError, match=words):
            EngineConfig(speculative_config=bad)
    with pytest.raises(ValueError, match="tensor_parallel_size=1"):
        EngineConfig(speculative_config={"model": "dummy:llama-3.2-1b"}, tensor_parallel_size=2)


def test_a_draft_with_another_vocabulary_is_refused(tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint("llama")
    with pytest.raises(ValueError, match=f"vocabulary of 49152 tokens, the target {TINY_VOCAB}"):
        LLM(model=str(folder), dtype="float32", speculative_config={"model": "dummy:smollm2-135m"})


def test_lookahead_slots_are_reserved_but_never_cached(make_request):
    manager = KVCacheManager(num_blocks=16, block_size=4)
    request = make_request("r", range(10))
    manager.allocate_slots(request, 10, num_lookahead_tokens=3)
    assert len(manager.groups[0].req_to_blocks["r"]) == 4  # 13 slots
    assert manager.groups[0].num_cached_blocks["r"] == 2  # the full blocks of known tokens
    request.num_computed_tokens = 10
    assert manager.allocate_slots(request, 1, num_lookahead_tokens=5) == []  # 16 slots: in the 4 blocks
    assert manager.allocate_slots(request, 1, num_lookahead_tokens=6) == [manager.groups[0].req_to_blocks["r"][-1]]


@pytest.fixture(scope="module")
def plain():
    return LLM(**OPTIONS)


@pytest.mark.parametrize("options", [
    {},
    {"num_gpu_blocks_override": 12, "max_num_seqs": 4},  # too few blocks for all: preemptions
    {"max_num_batched_tokens": 32, "long_prefill_token_threshold": 16},  # prompts in chunks beside speculation
], ids=["plain", "preemption", "chunked-prefill"])
def test_the_bundled_model_as_its_own_draft_gives_the_same_greedy_tokens_all_accepted(plain, options):
    expected = greedy_tokens(plain, PROMPTS)
    llm = LLM(**OPTIONS, speculative_config=SELF_DRAFT, **options)
    assert greedy_tokens(llm, PROMPTS) == expected
    stats = llm.llm_engine.stats()
    assert stats["spec_num_draft_tokens"] > 60 and stats["spec_acceptance_rate"] == 1.0, stats
    if "num_gpu_blocks_override" in options:
        assert stats["num_preemptions"] > 0


def test_prefix_cache_hits_hold_the_drafts_kv_too(plain):
    """The second run of a long prompt takes most of it from the prefix cache: were the draft's KV not
    in those blocks, its proposals would be wrong and some rejected."""
    llm = LLM(**OPTIONS, speculative_config=SELF_DRAFT)
    prompt = CHAT.format("Repeat this text exactly: " + " ".join([TEXT] * 5))
    prompts = [prompt, prompt + "Sure"]
    first = greedy_tokens(llm, prompts[:1], max_tokens=24)
    assert greedy_tokens(llm, prompts, max_tokens=24) == first + greedy_tokens(plain, prompts[1:], max_tokens=24)
    stats = llm.llm_engine.stats()
    num_prompt = len(llm.get_tokenizer().encode(prompt))
    assert stats["prefix_cache_hits"] >= 2 * (num_prompt // 16 - 1) * 16 > 200, stats
    assert stats["spec_acceptance_rate"] == 1.0, stats


def test_requests_that_opt_out_run_beside_speculating_ones(plain):
    """Logprobs and penalties opt out (they read more than the target's distribution per position);
    the draft still computes their KV, and every request's tokens stay as without a draft."""
    llm = LLM(**OPTIONS, speculative_config=SELF_DRAFT)
    params = [SamplingParams(temperature=0.0, max_tokens=24, logprobs=2), SamplingParams(temperature=0.0, max_tokens=24),
              SamplingParams(temperature=0.0, max_tokens=24, repetition_penalty=1.3),
              SamplingParams(temperature=0.0, max_tokens=24, min_tokens=8)]
    want = plain.generate(PROMPTS, params, use_tqdm=False)
    got = llm.generate(PROMPTS, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
    assert got[0].outputs[0].logprobs is not None
    assert llm.llm_engine.stats()["spec_acceptance_rate"] == 1.0


@pytest.fixture(scope="module")
def tiny_pair(tiny_hf_checkpoint, tmp_path_factory):
    """(target folder, target HF model, draft folder): two tiny random Llamas with one vocabulary, the
    draft the target with noise on every weight: close enough that its proposals are often accepted
    (an unrelated random model's top tokens are rarely the target's), not so close that all are."""
    folder, hf_model = tiny_hf_checkpoint("llama")
    draft = build_tiny_hf_model("llama")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in draft.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
    draft_folder = tmp_path_factory.mktemp("tiny-llama-draft")
    draft.save_pretrained(str(draft_folder))
    return folder, hf_model, draft_folder


@pytest.mark.parametrize("options", [
    {},
    {"num_gpu_blocks_override": 17, "max_num_seqs": 4},
    {"max_num_batched_tokens": 16, "long_prefill_token_threshold": 8},
], ids=["plain", "preemption", "chunked-prefill"])
def test_a_tiny_random_draft_gives_the_tiny_targets_greedy_tokens(tiny_pair, options):
    folder, _, draft_folder = tiny_pair
    generator = torch.Generator().manual_seed(5)
    prompts = [{"prompt_token_ids": torch.randint(3, TINY_VOCAB, (length,), generator=generator).tolist()}
               for length in (5, 21, 9, 30)]
    base = dict(dtype="float32", block_size=4, seed=0, **{"num_gpu_blocks_override": 128, **options})
    expected = greedy_tokens(LLM(model=str(folder), **base), prompts, max_tokens=24, ignore_eos=True)
    llm = LLM(model=str(folder), **base, speculative_config={"model": str(draft_folder), "num_speculative_tokens": 3})
    assert greedy_tokens(llm, prompts, max_tokens=24, ignore_eos=True) == expected
    stats = llm.llm_engine.stats()
    assert stats["spec_num_draft_tokens"] > 0 and stats["spec_acceptance_rate"] < 1.0, stats
    if "max_num_seqs" in options:
        assert stats["num_preemptions"] > 0


def test_the_kv_budget_counts_both_models_per_block(tiny_pair):
    folder, _, draft_folder = tiny_pair
    options = dict(model=str(folder), dtype="float32", block_size=4, kv_cache_memory_bytes=2**20)
    plain_runner = LLM(**options).llm_engine.runner
    runner = LLM(**options, speculative_config={"model": str(draft_folder)}).llm_engine.runner
    assert runner.num_blocks == plain_runner.num_blocks // 2  # a draft of the target's shape
    assert runner.kv_cache.shape == runner.drafter.kv_cache.shape == plain_runner.kv_cache.shape[:2] + (
        runner.num_blocks, *plain_runner.kv_cache.shape[3:])


def test_rejection_sampling_keeps_the_target_distribution():
    """Unit check: proposals drawn from q, rejection-sampled against p: the first kept token follows
    p, and after an accepted proposal the next follows the target's next distribution."""
    generator = torch.Generator().manual_seed(0)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.1, 0.2, 0.3, 0.4]])
    q = torch.tensor([[0.1, 0.6, 0.1, 0.2]])
    draws = 6000
    first, second = {}, {}
    for _ in range(draws):
        proposal = torch.multinomial(q[0], 1, generator=generator)
        race = lambda probs: (probs / torch.empty_like(probs).exponential_(generator=generator)).argmax(dim=-1)  # noqa: E731
        tokens = rejection_sample(p, proposal, q, torch.rand(1, generator=generator), race).tolist()
        first[tokens[0]] = first.get(tokens[0], 0) + 1
        if tokens[0] == proposal.item():
            second[tokens[1]] = second.get(tokens[1], 0) + 1
    for counts, row in ((first, p[0]), (second, p[1])):
        expected = dict(enumerate(row.tolist()))
        statistic, dof = chi_square(counts, expected, sum(counts.values()))
        assert statistic < CHI2_CRITICAL[dof], (statistic, counts, expected)
    assert 0.3 * draws < sum(second.values()) < 0.7 * draws  # both accepted and rejected, often


def test_sampled_tokens_follow_the_target_distribution_with_another_draft(tiny_pair):
    """Rejection sampling in the engine: the draft is another random model, so its sampled proposals
    are both accepted and rejected (and replaced from the residual distribution)."""
    folder, hf_model, draft_folder = tiny_pair
    llm = LLM(model=str(folder), dtype="float32", block_size=4, num_gpu_blocks_override=2048, max_num_seqs=256,
              seed=0, speculative_config={"model": str(draft_folder), "num_speculative_tokens": 2})
    stats = assert_sampled_triples_follow_the_target(llm, hf_model)
    assert 0.1 < stats["spec_acceptance_rate"] < 0.9, stats


def test_a_seeded_request_draws_the_same_tokens_alone_or_in_a_batch(tiny_pair):
    folder, _, draft_folder = tiny_pair
    llm = LLM(model=str(folder), dtype="float32", block_size=4, num_gpu_blocks_override=256, seed=0,
              speculative_config={"model": str(draft_folder), "num_speculative_tokens": 3})
    prompt = {"prompt_token_ids": [220, 173, 228, 132, 24, 173, 209, 25]}
    seeded = SamplingParams(temperature=0.9, top_p=0.9, min_p=0.02, max_tokens=20, ignore_eos=True, seed=7)
    [alone] = llm.generate([prompt], seeded, use_tqdm=False)
    others = [SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)] * 3
    batch = llm.generate([prompt] * 4, [*others[:2], seeded, others[2]], use_tqdm=False)
    assert batch[2].outputs[0].token_ids == alone.outputs[0].token_ids
    assert llm.llm_engine.stats()["spec_num_draft_tokens"] > 0
