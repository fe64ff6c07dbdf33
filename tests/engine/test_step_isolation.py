"""A request whose part of a step raises fails alone; the others finish with the very tokens they
get without it (issue 15, finding 1). Real engine, bundled model, float32 on CPU.

The fault is a sampling parameter that validation refuses (top_k = 2**63, which torch cannot put
in a tensor), injected into a request after the engine accepted it, so the sampler raises while
building the batch's top-k tensor, as it did before the door was closed.
"""

from __future__ import annotations

import pytest

from engine import LLM, SamplingParams

PROMPTS = {"a": "The capital of France is", "b": "Count to ten: one, two,",
           "c": "Write a short poem about the sea.", "d": "def fibonacci(n):"}
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, seed=1234, max_tokens=12, ignore_eos=True)
BAD_TOP_K = 2**63


@pytest.fixture(scope="module", params=[False, True], ids=["sync", "async"])
def engine(request):
    """With async scheduling the fault surfaces while launching a step planned ahead of the last."""
    return LLM(dtype="float32", num_gpu_blocks_override=256, async_scheduling=request.param).llm_engine


def run(engine, *, bad: list[str] = (), bad_after_steps: int = 0) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Every request's final token ids, and the failed ones; `bad` requests join the innocents
    and get the unrepresentable top_k after `bad_after_steps` steps (0: before the first)."""
    free_blocks = engine.kv_cache_manager.num_free_blocks
    for name, prompt in PROMPTS.items():
        engine.add_request(name, prompt, SEEDED if name == "d" else GREEDY)
    for name in bad:
        engine.add_request(name, f"Tell me about {name}.", SamplingParams(temperature=0.8, max_tokens=12))
    tokens, failed, steps = {}, {}, 0
    while engine.has_unfinished_requests():
        if steps == bad_after_steps:
            for name in bad:
                engine.output_processor.requests[name].params.top_k = BAD_TOP_K  # past validation
        for output in engine.step():
            tokens[output.request_id] = list(output.outputs[0].token_ids)
        failed.update(engine.take_failed_requests())
        steps += 1
    assert engine.kv_cache_manager.num_free_blocks == free_blocks  # the failed ones gave their blocks back
    return tokens, failed


@pytest.fixture(scope="module")
def baseline(engine):
    tokens, failed = run(engine)
    assert not failed and all(len(t) == 12 for t in tokens.values())
    return tokens


@pytest.mark.parametrize("bad, bad_after_steps", [
    (["bad"], 0),  # new to its first step: found by running the new requests apart
    (["bad"], 3),  # went wrong mid-decode: found by halving the batch
    (["bad1", "bad2"], 0),
], ids=["new", "mid-decode", "two"])
def test_only_the_failing_request_fails(engine, baseline, bad, bad_after_steps):
    tokens, failed = run(engine, bad=bad, bad_after_steps=bad_after_steps)
    assert sorted(failed) == sorted(bad)
    assert all("engine failed" in reason for reason in failed.values())
    assert {name: tokens[name] for name in PROMPTS} == baseline  # greedy and seeded alike


def test_the_engine_serves_normally_after_a_fault(engine, baseline):
    run(engine, bad=["bad"])
    assert run(engine)[0] == baseline


def test_the_offline_api_names_the_failed_request(engine):
    llm = LLM.__new__(LLM)
    llm.llm_engine = engine
    engine.add_request("x", "Hello", SamplingParams(temperature=0.8, max_tokens=4))
    engine.output_processor.requests["x"].params.top_k = BAD_TOP_K
    with pytest.raises(RuntimeError, match="1 request\\(s\\) failed: x"):
        llm._run_engine(["x"], use_tqdm=False)
