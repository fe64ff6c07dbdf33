"""Offline throughput: all requests submitted at once, continuous batching does the rest."""

from __future__ import annotations

import json
import statistics
import time

from engine.bench.grammar_cost import grammar_cost
from engine.bench.workload import BenchRequest, useful_length
from engine.sampling_params import SamplingParams
from engine.structured_outputs import StructuredOutputsParams

# An array of at least 64 objects cannot be complete within a benchmark's few hundred tokens, so a
# constrained request runs to its max_tokens as a free one does (a random model closes an open-ended
# array early, leaving its batch slot empty and tokens per second lower for no cost of the grammar);
# the grammar is non-trivial (nested objects, enums, numbers, free strings).
BENCH_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "kind": {"enum": ["alpha", "beta", "gamma"]}, "score": {"type": "number"},
    "tags": {"type": "array", "items": {"type": "string"}}}, "required": ["name", "kind", "score", "tags"]}, "minItems": 64}


def run_engine_throughput(llm, requests: list[BenchRequest], ignore_eos: bool, use_tqdm: bool = False,
                          structured_fraction: float = 0.0, structured_schema: str | None = None,
                          lora_requests: list | None = None) -> dict:
    """`structured_fraction` of the requests (every k-th) sample under a JSON schema; they stop when it
    is complete, so output tokens per second, not the total, is what compares."""
    engine = llm.llm_engine
    constraint = StructuredOutputsParams(json=json.loads(structured_schema) if structured_schema else BENCH_SCHEMA)
    every = round(1 / structured_fraction) if structured_fraction > 0 else 0
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=ignore_eos, detokenize=False,
                             structured_outputs=constraint if every and i % every == 0 else None)
              for i, r in enumerate(requests)]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    warm_up(llm, requests[0])
    with grammar_cost(engine) as grammar:
        started = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=use_tqdm, lora_request=lora_requests)
        elapsed = time.perf_counter() - started
    stop_ids = set() if ignore_eos else engine.eos_token_ids
    useful = sum(useful_length(o.outputs[0].token_ids, r.max_tokens, stop_ids) for o, r in zip(outputs, requests))
    stats = engine.stats()
    return {"elapsed_s": elapsed, "output_tokens": useful, "output_tokens_per_s": useful / elapsed,
            "requests_per_s": len(requests) / elapsed,
            "prompt_tokens": sum(len(r.prompt_token_ids) for r in requests),
            "peak_kv_token_utilization": stats["peak_kv_token_utilization"],
            "peak_num_running": stats["peak_num_running"], "num_kv_blocks": stats["num_blocks"],
            "num_preemptions": stats["num_preemptions"], **request_latencies(outputs),
            **({"grammar": grammar} if every else {})}


def warm_up(llm, request: BenchRequest) -> None:
    """One prefill and a decode step outside the timed run: the Triton kernels compile on first use
    (seconds each, on a cold cache: the first of two engines run in a row would pay them), and the
    prompt is reversed so that the timed run finds nothing of it in the prefix cache."""
    prompt = {"prompt_token_ids": request.prompt_token_ids[::-1]}
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False),
                 use_tqdm=False)


def request_latencies(outputs) -> dict:
    """TTFT and TPOT (time per output token after the first) of each request, from its final output's
    metrics: the offline figures that the serving benchmark's are compared with."""
    ttfts, tpots = [], []
    for output in outputs:
        metrics, num_tokens = output.metrics, max(len(o.token_ids) for o in output.outputs)
        if metrics.get("first_token_time") is None:
            continue
        ttfts.append(metrics["first_token_time"] - metrics["arrival_time"])
        if num_tokens > 1:
            tpots.append((metrics["finished_time"] - metrics["first_token_time"]) / (num_tokens - 1))
    if not ttfts:
        return {}
    result = {"ttft_mean_s": statistics.fmean(ttfts), "ttft_p50_s": statistics.median(ttfts)}
    if tpots:
        result |= {"tpot_mean_ms": statistics.fmean(tpots) * 1e3, "tpot_p50_ms": statistics.median(tpots) * 1e3}
    return result
