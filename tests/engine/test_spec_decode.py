"""N-gram speculative decoding: the proposer, the option, greedy tokens identical with and without
speculation (also under preemption and chunked prefill), and sampled tokens that follow the target's
distribution exactly (a chi-square test on a tiny model)."""

from __future__ import annotations

import itertools

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig
from engine.spec_decode.adaptive_length import next_speculation_length
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import propose_ngram
from tests.engine.conftest import TINY_VOCAB
from tests.engine.test_sampler import CHI2_CRITICAL, chi_square

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
TEXT = "The quick brown fox jumps over the lazy dog. A stitch in time saves nine. All that glitters is not gold."
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
PROMPTS = [CHAT.format(f"Repeat this text exactly: {TEXT}"), CHAT.format(f"Repeat twice: {TEXT[:44]}"),
           "def add(a, b):\n    return a + b\n\ndef add3(a, b, c):\n    return", "The capital of France is"]


def test_the_latest_earlier_occurrence_of_the_longest_suffix_is_proposed():
    assert propose_ngram([1, 2, 3, 9, 1, 2, 3, 8, 1, 2, 3], 2, 1, 3) == [8, 1]
    assert propose_ngram([1, 2, 3, 4, 1, 2, 3], 3, 2, 4) == [4, 1, 2]
    assert propose_ngram([5, 6, 7], 3, 1, 3) == []  # nothing recurs
    assert propose_ngram([4, 1, 2, 4], 3, 2, 3) == []  # the suffix [2, 4] never occurred before
    assert propose_ngram([4, 1, 2, 4], 3, 1, 3) == [1, 2, 4]


def test_the_option_is_validated_with_vllms_names():
    config = SpeculativeConfig.from_dict({"method": "ngram", "num_speculative_tokens": 5, "prompt_lookup_max": 3})
    assert (config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max) == (5, 2, 3)
    for bad, words in [({"method": "eagle"}, "method"), ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
                       ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min"),
                       ({"method": "ngram", "model": "dummy:llama-3.2-1b"}, "model"), ({"k": 1}, "unknown")]:
        with pytest.raises(ValueError, match=words):
            EngineConfig(speculative_config=bad)


def greedy_tokens(llm, prompts, max_tokens=48, **params) -> list[list[int]]:
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, **params), use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


@pytest.fixture(scope="module")
def plain():
    return LLM(dtype="float32", max_model_len=1024)


@pytest.mark.parametrize("options", [
    {},
    {"num_gpu_blocks_override": 9, "max_num_seqs": 4},  # too few blocks for all: preemptions
    {"max_num_batched_tokens": 32, "long_prefill_token_threshold": 16},  # prompts in chunks beside speculation
], ids=["plain", "preemption", "chunked-prefill"])
def test_greedy_tokens_are_the_same_with_and_without_speculation(plain, options):
    expected = greedy_tokens(plain, PROMPTS)
    llm = LLM(dtype="float32", max_model_len=1024, speculative_config=NGRAM, **options)
    assert greedy_tokens(llm, PROMPTS) == expected
    stats = llm.llm_engine.stats()
    assert stats["spec_num_accepted_tokens"] > 20 and stats["spec_acceptance_rate"] > 0.3, stats
    if "num_gpu_blocks_override" in options:
        assert stats["num_preemptions"] > 0


def test_the_speculation_length_follows_the_last_verification():
    assert next_speculation_length(proposed=4, accepted=0, maximum=4) == 1  # a probe while nothing matches
    assert next_speculation_length(proposed=4, accepted=2, maximum=4) == 3
    assert next_speculation_length(proposed=1, accepted=1, maximum=4) == 2  # all confirmed: doubles
    assert next_speculation_length(proposed=2, accepted=2, maximum=4) == 4
    assert next_speculation_length(proposed=4, accepted=4, maximum=4) == 4


def test_each_requests_proposals_shrink_after_rejections_and_grow_back(plain):
    """Greedy tokens unchanged, and every speculating step of a request carried no more proposals than
    its previous verification allowed; some steps carried fewer than the maximum, others all of it."""
    llm = LLM(dtype="float32", max_model_len=1024, speculative_config=NGRAM)
    scheduler = llm.llm_engine.scheduler
    steps: dict[str, list[tuple[int, int]]] = {}
    take = scheduler._take_speculated

    def recorded(request, record, tokens):
        steps.setdefault(request.request_id, []).append((record.num_drafts, len(tokens) - 1))
        return take(request, record, tokens)

    scheduler._take_speculated = recorded
    assert greedy_tokens(llm, PROMPTS) == greedy_tokens(plain, PROMPTS)
    maximum = NGRAM["num_speculative_tokens"]
    for history in steps.values():
        for (proposed, accepted), (next_proposed, _) in zip(history, history[1:]):
            assert next_proposed <= next_speculation_length(proposed, accepted, maximum), history
    proposals = [proposed for history in steps.values() for proposed, _ in history]
    assert min(proposals) < maximum and max(proposals) == maximum, steps


def test_stop_tokens_stop_strings_and_max_tokens_cut_a_speculated_step(plain):
    prompt = PROMPTS[0]
    llm = LLM(dtype="float32", max_model_len=1024, speculative_config=NGRAM)
    for params in [dict(max_tokens=9), dict(max_tokens=40, stop=["stitch"]), dict(max_tokens=40, stop_token_ids=[260])]:
        [want] = plain.generate([prompt], SamplingParams(temperature=0.0, **params), use_tqdm=False)
        [got] = llm.generate([prompt], SamplingParams(temperature=0.0, **params), use_tqdm=False)
        assert (got.outputs[0].text, got.outputs[0].token_ids, got.outputs[0].finish_reason) == (
            want.outputs[0].text, want.outputs[0].token_ids, want.outputs[0].finish_reason), params


def test_greedy_tokens_on_a_tiny_random_model(tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint("llama")
    generator = torch.Generator().manual_seed(5)
    motif = torch.randint(3, TINY_VOCAB, (6,), generator=generator).tolist()
    prompts = [{"prompt_token_ids": motif * 4}, {"prompt_token_ids": motif[:3] * 5 + [7, 8]}]
    options = dict(dtype="float32", block_size=4, num_gpu_blocks_override=64, seed=0)
    expected = greedy_tokens(LLM(model=str(folder), **options), prompts, ignore_eos=True)
    llm = LLM(model=str(folder), speculative_config=NGRAM, **options)
    assert greedy_tokens(llm, prompts, ignore_eos=True) == expected
    assert llm.llm_engine.stats()["spec_num_draft_tokens"] > 0


# Found by search: for both likely first tokens of the tiny "llama", the token after its earlier
# occurrence in this prompt (the n-gram proposal for the second) is one of the two likely second
# tokens, so n-gram proposals are accepted about half the time, and rejected the other half.
TRIPLES_PROMPT = [220, 173, 228, 132, 24, 173, 209, 25]


def top2_after(hf_model, prefix) -> dict[int, float]:
    """The target's two likeliest next tokens after TRIPLES_PROMPT + prefix, with their top-k 2 probabilities."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([TRIPLES_PROMPT + list(prefix)])).logits[0, -1]
    values, ids = logits.topk(2)
    return dict(zip(ids.tolist(), torch.softmax(values, dim=-1).tolist()))


def assert_sampled_triples_follow_the_target(llm, hf_model, draws: int = 3000) -> dict:
    """The first three tokens under top-k 2 (8 sequences), `draws` seeded draws with speculation,
    against their exact probabilities from transformers (chi-square); returns the engine's stats."""
    expected = {}
    for first, p1 in top2_after(hf_model, ()).items():
        for second, p2 in top2_after(hf_model, (first,)).items():
            for third, p3 in top2_after(hf_model, (first, second)).items():
                expected[(first, second, third)] = p1 * p2 * p3
    params = [SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True, seed=i) for i in range(draws)]
    outputs = llm.generate([{"prompt_token_ids": TRIPLES_PROMPT}] * draws, params, use_tqdm=False)
    counts = {}
    for output in outputs:
        key = tuple(output.outputs[0].token_ids)
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) <= set(expected)
    statistic, dof = chi_square(counts, expected, draws)
    assert statistic < CHI2_CRITICAL[dof], (statistic, dof, counts, expected)
    return llm.llm_engine.stats()


def test_sampled_tokens_follow_the_target_distribution(tiny_hf_checkpoint):
    folder, hf_model = tiny_hf_checkpoint("llama")
    proposals = {209: 25, 173: 209}
    assert set(top2_after(hf_model, ())) == set(proposals), "the tiny model changed: search for a prompt again"
    assert all(proposals[first] in top2_after(hf_model, (first,)) for first in proposals)
    # Proposals for the third token come from the prompt's repeats: make them as likely as can be.
    llm = LLM(model=str(folder), dtype="float32", block_size=4, num_gpu_blocks_override=2048, max_num_seqs=256,
              seed=0, speculative_config={"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 1,
                                          "prompt_lookup_max": 1})
    stats = assert_sampled_triples_follow_the_target(llm, hf_model)
    assert 0 < stats["spec_num_accepted_tokens"] < stats["spec_num_draft_tokens"], stats


def test_every_triple_is_reachable_so_the_test_above_can_fail():
    """Guard on the statistic: 3,000 draws from a wrong distribution (one triple twice as likely)."""
    expected = {k: 1 / 8 for k in itertools.product((0, 1), repeat=3)}
    wrong = {**expected, (0, 0, 0): 2 / 8}
    counts = {k: round(3000 * p / sum(wrong.values())) for k, p in wrong.items()}
    statistic, dof = chi_square(counts, expected, sum(counts.values()))
    assert statistic > CHI2_CRITICAL[dof]
