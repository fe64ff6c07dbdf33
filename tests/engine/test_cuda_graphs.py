"""Decode CUDA graphs: the same logits as eager steps, and no device sync before sampling."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.worker.cuda_graphs import capture_sizes

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def test_capture_sizes_are_vllm_buckets():
    assert capture_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 20]
    assert capture_sizes(1024) == [1, 2, 4, *range(8, 257, 8), *range(272, 513, 16), *range(544, 1025, 32)]
    assert capture_sizes(4096)[-1] == 1024


def _llm_recording_logits(enforce_eager: bool):
    """A bf16 Llama-3.2-1B-shaped model that keeps every step's logits, in step order."""
    llm = LLM(model="dummy:llama-3.2-1b", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=2048,
              max_num_seqs=16, num_gpu_blocks_override=512, enforce_eager=enforce_eager)
    model, recorded = llm.llm_engine.runner.model, []
    compute_logits = model.compute_logits

    def recording(hidden):
        recorded.append(compute_logits(hidden))
        return recorded[-1]

    model.compute_logits = recording
    return llm, recorded


@pytest.mark.gpu
@cuda_only
def test_bf16_graph_logits_match_eager():
    """Decode batches of 3 (replaying the graph of 4, padded), then 2. Random weights give close
    runners-up, so a token may flip between the runs: steps are compared up to the first flip."""
    prompts = [{"prompt_token_ids": [1000 + (37 * i * j) % 5000 for j in range(length)]}
               for i, length in enumerate((3, 50, 300))]
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in (8, 5, 8)]
    runs = []
    for enforce_eager in (False, True):
        llm, recorded = _llm_recording_logits(enforce_eager)
        assert (llm.llm_engine.runner.cuda_graphs is None) == enforce_eager
        tokens = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        runs.append((tokens, recorded))
        del llm
    (graph_tokens, graph_logits), (eager_tokens, eager_logits) = runs
    assert len(graph_logits) == len(eager_logits) == 8  # step i samples token i of every running request
    first_flip = min(next((i for i, (a, b) in enumerate(zip(g, e)) if a != b), len(g))
                     for g, e in zip(graph_tokens, eager_tokens))
    for graph, eager in zip(graph_logits[:first_flip + 1], eager_logits[:first_flip + 1]):
        graph, eager = graph.float(), eager.float()
        assert torch.isfinite(graph).all()
        assert ((graph - eager).norm() / eager.norm()).item() < 1e-2


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("enforce_eager", [False, True], ids=["cuda-graphs", "eager"])
def test_a_step_waits_for_the_device_only_to_read_sampled_tokens(enforce_eager):
    """torch raises on any synchronising call while sync debug mode is "error"; `fetch()` alone runs
    with it off, since reading the sampled tokens must wait. So launching a step (inputs, the
    forward, greedy and random sampling, feeding the last step's tokens) never waits: that is what
    lets async scheduling plan the next step while the device runs this one."""
    llm = LLM(model="dummy:smollm2-135m", dtype="bfloat16", skip_tokenizer_init=True, max_model_len=1024,
              max_num_seqs=8, num_gpu_blocks_override=256, enforce_eager=enforce_eager, async_scheduling=True)
    runner = llm.llm_engine.runner
    fetch = runner.fetch

    def fetch_allowing_sync(launched):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return fetch(launched)
        finally:
            torch.cuda.set_sync_debug_mode("error")

    runner.fetch = fetch_allowing_sync
    prompts = [{"prompt_token_ids": list(range(100, 100 + n))} for n in (7, 40, 90)]
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=3, max_tokens=6, ignore_eos=True),
              SamplingParams(temperature=1.0, min_p=0.05, max_tokens=6, ignore_eos=True)]
    torch.cuda.set_sync_debug_mode("error")
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(len(o.outputs[0].token_ids) == 6 for o in outputs)
