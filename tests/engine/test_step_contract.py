"""The step contract (engine/core/scheduler_output.py) between the scheduler and the runner(s),
and async scheduling, on the real engine with the bundled model (float32, CPU).

A tensor-parallel worker receives each SchedulerOutput pickled through a pipe and keeps its own
request states; `shadow_worker` plays that part in process (the contract, its own RequestStates
and InputBuffers) so the test can read what a worker would write.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.worker.input_buffers import InputBuffers
from engine.worker.request_states import RequestStates

PROMPTS = ["The capital of France is", "Count to ten: one, two,", "Write a short poem about the sea.",
           "def fibonacci(n):", "List three colours:", "Translate 'cat' into French:"]


def make_llm(async_scheduling: bool, **options) -> LLM:
    return LLM(dtype="float32", max_model_len=512, async_scheduling=async_scheduling, **options)


class ShadowWorker:
    """What a worker rank does with each step it is sent, minus the model: unpickle, keep states,
    build the inputs (block tables included)."""

    def __init__(self, runner) -> None:
        self.states = RequestStates()
        self.inputs = InputBuffers(runner.max_num_batched_tokens, runner.config.max_num_seqs, runner.max_model_len,
                                   runner.block_size, torch.device("cpu"), len(runner.kv_cache_groups))
        self.rank0_inputs = runner.inputs
        self.num_steps = 0

    def receive(self, scheduler_output) -> None:
        step = pickle.loads(pickle.dumps(scheduler_output))
        self.states.apply(step)
        batch = sorted(((self.states[r], n) for r, n in step.num_scheduled_tokens.items()), key=lambda i: i[1] != 1)
        inputs = self.inputs.prepare(batch, [])
        rows = len(batch)
        rank0 = self.rank0_inputs.block_tables.np[:, :rows]
        for row, (state, _) in enumerate(batch):
            for group, block_ids in enumerate(state.block_ids):
                width = len(block_ids)
                assert block_ids == rank0[group, row, :width].tolist()
                assert np.array_equal(self.inputs.block_tables.np[group, row, :width], rank0[group, row, :width])
        assert inputs.positions.tolist() == self.rank0_inputs.positions.np[:inputs.positions.shape[0]].tolist()
        self.num_steps += 1


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_a_worker_fed_only_the_pickled_contract_builds_rank_0s_block_tables_without_rewriting_rows(
        monkeypatch, async_scheduling):
    llm = make_llm(async_scheduling, max_num_seqs=4, num_gpu_blocks_override=48)
    runner = llm.llm_engine.runner
    shadow = ShadowWorker(runner)
    launch = runner.launch

    def launch_and_shadow(scheduler_output):
        launched = launch(scheduler_output)
        shadow.receive(scheduler_output)
        return launched

    monkeypatch.setattr(runner, "launch", launch_and_shadow)
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)
    llm.generate(PROMPTS, params, use_tqdm=False)
    rows_stepped = shadow.num_steps * 4
    assert shadow.inputs.block_table_writes == runner.inputs.block_table_writes
    # A row is written when a request takes it or gains a block (every 16 tokens), not every step.
    assert shadow.inputs.block_table_writes < rows_stepped / 4, (shadow.inputs.block_table_writes, rows_stepped)


def generations(llm: LLM, params) -> list[list[tuple]]:
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [[(c.token_ids, c.text, c.finish_reason) for c in o.outputs] for o in outputs]


@pytest.mark.parametrize("options", [
    dict(num_gpu_blocks_override=12, max_num_seqs=6),  # preemption: 6 sequences of 3 blocks cannot fit 11 blocks
    dict(num_gpu_blocks_override=512, max_num_batched_tokens=16, long_prefill_token_threshold=8),  # chunked prefill
], ids=["preemption", "chunked-prefill"])
def test_async_scheduling_gives_the_same_outputs(options):
    greedy = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    mixed = SamplingParams(temperature=0.8, top_p=0.9, seed=11, n=2, max_tokens=24, stop=["\n\n"], logprobs=2)
    results = {}
    for async_scheduling in (False, True):
        llm = make_llm(async_scheduling, **options)
        results[async_scheduling] = (generations(llm, greedy), generations(llm, mixed))
        assert llm.llm_engine.scheduler.num_preemptions > 0 or "max_num_batched_tokens" in options
        assert not llm.llm_engine.has_unfinished_requests()
        assert llm.llm_engine.kv_cache_manager.num_free_blocks == llm.llm_engine.runner.num_blocks - 1
    assert results[True] == results[False]


def test_async_scheduling_stops_at_max_tokens_and_eos_without_extra_tokens():
    llm = make_llm(True, num_gpu_blocks_override=256)
    short = llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=3), use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) <= 3 for o in short)
    eos = llm.generate(["Say hi."], SamplingParams(temperature=0.0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    reference = make_llm(False, num_gpu_blocks_override=256).generate(
        ["Say hi."], SamplingParams(temperature=0.0, max_tokens=200), use_tqdm=False)[0].outputs[0]
    assert (eos.token_ids, eos.finish_reason) == (reference.token_ids, reference.finish_reason)


def test_penalties_run_without_a_step_ahead_and_match():
    params = SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.5, max_tokens=24)
    plain = SamplingParams(temperature=0.0, max_tokens=24)
    async_llm = make_llm(True, num_gpu_blocks_override=256)
    engine = async_llm.llm_engine
    engine.add_request("pen", PROMPTS[0], params)
    engine.add_request("plain", PROMPTS[1], plain)
    in_flight = []
    while engine.has_unfinished_requests():
        engine.step()
        in_flight.append(engine._in_flight is not None)  # noqa: SLF001 (what the test is about)
    assert not any(in_flight[:-1]), "a step was planned ahead while a penalised request ran"
    sync_llm = make_llm(False, num_gpu_blocks_override=256)
    assert generations(async_llm, params) == generations(sync_llm, params)
