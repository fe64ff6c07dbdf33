"""Scoring on the bundled model (float32, CPU): prompt logprobs, and the perplexity made of them,
equal transformers' float32 log-softmax of the same GGUF weights.

`max_tokens=0` runs only the prefill and samples nothing. Every prompt position must be scored
even when the prompt is chunked (a 32-token budget) or sits in the prefix cache: a request that
wants prompt logprobs skips cache hits, since cached positions are never computed.
"""

from __future__ import annotations

import gc
import math

import pytest
import torch

from engine import LLM, SamplingParams
from tests.engine.conftest import hf_log_softmax, load_bundled_hf_model

BUDGET = 32  # max_num_batched_tokens: the long prompt takes several steps
ATOL = 1e-3
CACHED = ("Repeated prompts are common in scoring jobs: the same instructions and examples come before "
          "every candidate answer, so an engine with a prefix cache has most of them already.")
LONG = ("The harbour town woke slowly on winter mornings. Fishermen mended nets under yellow lamps, the "
        "baker pulled the first loaves from a brick oven, and children walked to school along the sea "
        "wall with their collars turned up against the wind. By noon the fog had usually lifted, and the "
        "grey water turned a hard bright blue that visitors remembered long after they had gone home. "
        "In the evenings the taverns filled with songs about storms, lost ships and the long way home.")
PROMPTS = ["Water boils at", CACHED, LONG]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_num_batched_tokens=BUDGET, num_gpu_blocks_override=256)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    ids = [llm.get_tokenizer().encode(p, add_special_tokens=True) for p in PROMPTS]
    block_size = llm.llm_engine.config.block_size
    assert len(ids[0]) < 8 and len(ids[1]) > 2 * block_size and len(ids[2]) > 2 * BUDGET, [len(i) for i in ids]
    return ids


@pytest.fixture(scope="module")
def hf_logprobs(prompt_ids):
    model = load_bundled_hf_model()
    references = [hf_log_softmax(model, ids) for ids in prompt_ids]
    del model
    gc.collect()
    return references


def score(llm, prompt_ids, **params):
    params = SamplingParams(temperature=0.0, **params)
    return llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)


@pytest.mark.parametrize("max_tokens", [0, 4])
def test_prompt_logprobs_equal_transformers(llm, prompt_ids, hf_logprobs, max_tokens):
    for _ in range(2):  # the second run proves the repeated prompt is in the prefix cache
        warm = score(llm, [prompt_ids[1]], max_tokens=1)[0]
    assert warm.num_cached_tokens > 0

    outputs = score(llm, prompt_ids, max_tokens=max_tokens, ignore_eos=True, prompt_logprobs=5)
    for ids, output, reference in zip(prompt_ids, outputs, hf_logprobs):
        assert output.num_cached_tokens == 0
        assert len(output.prompt_logprobs) == len(ids) and output.prompt_logprobs[0] is None
        positions, token_ids, ours = [], [], []
        for position, (token_id, entry) in enumerate(zip(ids[1:], output.prompt_logprobs[1:])):
            assert token_id in entry and len(entry) in (5, 6)
            for listed, logprob in entry.items():
                positions.append(position)
                token_ids.append(listed)
                ours.append(logprob.logprob)
        torch.testing.assert_close(torch.tensor(ours), reference[positions, token_ids], atol=ATOL, rtol=0)

        completion = output.outputs[0]
        assert len(completion.token_ids) == max_tokens and completion.finish_reason == "length"
        assert (completion.text == "") == (max_tokens == 0)
    assert not llm.llm_engine.kv_cache_manager.request_ids()


def test_perplexity_equals_transformers(llm, prompt_ids, hf_logprobs):
    for ids, output, reference in zip(prompt_ids, score(llm, prompt_ids, max_tokens=0, prompt_logprobs=0),
                                      hf_logprobs):
        ours = [entry[token_id].logprob for token_id, entry in zip(ids[1:], output.prompt_logprobs[1:])]
        theirs = reference[torch.arange(len(ids) - 1), ids[1:]]
        assert math.exp(-sum(ours) / len(ours)) == pytest.approx(math.exp(-theirs.mean().item()), rel=1e-3)
