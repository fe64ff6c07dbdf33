"""Tensor parallelism on the CPU (gloo): every split of a model gives the tokens of the whole model.

Each tensor-parallel engine spawns its worker processes (ranks 1..N-1) and is shut down at the end
of its test, since one process hosts one tensor-parallel group at a time.
"""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import BUNDLED_MODEL
from engine.errors import EngineDeadError
from tests.engine.conftest import TINY_VOCAB

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=5)
TINY = dict(dtype="float32", block_size=4, num_gpu_blocks_override=64, seed=0)


def prompts(count=3, vocab=TINY_VOCAB):
    generator = torch.Generator().manual_seed(3)
    return [{"prompt_token_ids": torch.randint(3, vocab, (n,), generator=generator).tolist()}
            for n in (5, 11, 19)[:count]]


def generate(model, tensor_parallel_size, prompt_list, **options):
    llm = LLM(model=str(model), tensor_parallel_size=tensor_parallel_size, **options)
    try:
        return llm.generate(prompt_list, GREEDY, use_tqdm=False)
    finally:
        llm.llm_engine.shutdown()


def assert_same_generations(expected, actual):
    for want, got in zip(expected, actual):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for want_step, got_step in zip(want.outputs[0].logprobs, got.outputs[0].logprobs):
            for token_id, logprob in want_step.items():
                assert got_step[token_id].logprob == pytest.approx(logprob.logprob, abs=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["llama", "llama-bias", "qwen3", "granite", "olmo2", "phi3",
                                     "gemma", "gemma2", "gemma3"])
def test_two_ranks_match_one(tiny_hf_checkpoint, variant):
    folder, _ = tiny_hf_checkpoint(variant)
    assert_same_generations(generate(folder, 1, prompts(), **TINY), generate(folder, 2, prompts(), **TINY))


@pytest.mark.slow
def test_two_ranks_with_async_scheduling_match_one_rank_without(tiny_hf_checkpoint):
    """Async scheduling under tensor parallelism: each rank feeds the token rank 0 sampled (and
    broadcast) in step N into step N+1 on its own device, launching N+1 before fetching N."""
    folder, _ = tiny_hf_checkpoint("llama")
    expected = generate(folder, 1, prompts(), **TINY, async_scheduling=False)
    assert_same_generations(expected, generate(folder, 2, prompts(), **TINY, async_scheduling=True))


@pytest.mark.slow
def test_four_ranks_replicate_two_kv_heads(tiny_hf_checkpoint):
    """4 query heads and 2 KV heads over 4 ranks: each KV head lives on two ranks."""
    folder, hf_model = tiny_hf_checkpoint("llama")
    assert hf_model.config.num_key_value_heads == 2 and hf_model.config.num_attention_heads == 4
    assert_same_generations(generate(folder, 1, prompts(2), **TINY), generate(folder, 4, prompts(2), **TINY))


@pytest.mark.slow
def test_bundled_model_splits_three_ways(bundled_tokenizer):
    """SmolLM2-135M: 9 query heads and 3 KV heads, one KV head per rank."""
    texts = ["The capital of France is", "def fibonacci(n):"]
    options = dict(dtype="float32", max_model_len=256, num_gpu_blocks_override=64, seed=0)
    expected = generate(BUNDLED_MODEL, 1, texts, **options)
    actual = generate(BUNDLED_MODEL, 3, texts, **options)
    assert [o.outputs[0].token_ids for o in actual] == [o.outputs[0].token_ids for o in expected]


def test_a_size_that_does_not_divide_the_heads_is_refused(tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint("llama")
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 does not divide the model's 4 attention heads"):
        LLM(model=str(folder), tensor_parallel_size=3, **TINY)
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        LLM(model=str(folder), tensor_parallel_size=0, **TINY)


@pytest.mark.slow
def test_a_dead_worker_takes_the_engine_down_promptly(tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint("llama")
    llm = LLM(model=str(folder), tensor_parallel_size=2, **TINY)
    try:
        llm.generate(prompts(1), GREEDY, use_tqdm=False)
        worker = llm.llm_engine.workers.processes[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(timeout=10)
        started = time.monotonic()
        with pytest.raises(RuntimeError, match="worker rank 1 died"):
            llm.generate(prompts(1), GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match="engine is down"):
            llm.generate(prompts(1), GREEDY, use_tqdm=False)
        assert time.monotonic() - started < 10
    finally:
        llm.llm_engine.shutdown()


@pytest.mark.slow
def test_a_shut_down_engine_refuses_to_step(tiny_hf_checkpoint):
    """After shutdown rank 0 would run alone on its shard, its partial sums never reduced."""
    folder, _ = tiny_hf_checkpoint("llama")
    llm = LLM(model=str(folder), tensor_parallel_size=2, **TINY)
    llm.llm_engine.shutdown()
    with pytest.raises(EngineDeadError, match="was shut down"):
        llm.generate(prompts(1), GREEDY, use_tqdm=False)


def test_a_process_that_lost_an_nccl_peer_exits_before_nccl_teardown():
    """NCCL's destructor for a group that lost a rank aborts the process at exit; the exit hook leaves
    first, with status 1 and its output flushed."""
    script = ("from engine.distributed import parallel_state\n"
              "parallel_state._lost_nccl_peer = True  # as abort_collectives leaves it\n"
              "print('still printed')\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert (result.returncode, result.stdout) == (1, "still printed\n"), result.stderr


def test_llama3_rotary_builds_on_the_meta_device():
    """Sharded models are built on `meta`; llama3-scaled rope tables must still be real numbers."""
    import torch

    from engine.layers.rotary import RotaryEmbedding
    from engine.weights.dummy import dummy_config

    config = dummy_config("llama-3.1-8b")
    with torch.device("meta"):
        meta_built = RotaryEmbedding(config, 128, 64)
    assert meta_built.cos_cache.is_meta
    torch.testing.assert_close(RotaryEmbedding(config, 128, 64).cos_cache,
                               RotaryEmbedding(config, 128, 64).cos_cache)


@pytest.mark.slow
def test_grammar_rows_under_tensor_parallelism_with_async_scheduling(bundled_tokenizer):
    """Rank 0 samples grammar rows after the other ranks have reached the token broadcast (it fills
    their masks first): the collectives still line up, and the outputs are one rank's."""
    from engine.structured_outputs import StructuredOutputsParams

    texts = ["<|im_start|>user\nA person as JSON<|im_end|>\n<|im_start|>assistant\n", "The capital of France is"]
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}}, "required": ["name"]}
    params = [SamplingParams(temperature=0.0, max_tokens=24, structured_outputs=StructuredOutputsParams(json=schema)),
              SamplingParams(temperature=0.0, max_tokens=8)]
    options = dict(dtype="float32", max_model_len=256, num_gpu_blocks_override=64, seed=0)
    texts_of = {}
    for size, async_scheduling in ((1, False), (3, True)):
        llm = LLM(model=BUNDLED_MODEL, tensor_parallel_size=size, async_scheduling=async_scheduling, **options)
        try:
            texts_of[size] = [o.outputs[0].text for o in llm.generate(texts, params, use_tqdm=False)]
        finally:
            llm.llm_engine.shutdown()
    assert texts_of[3] == texts_of[1] and texts_of[1][0].startswith('{"name":"')
