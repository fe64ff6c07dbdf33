"""Latency of one batch end to end (vLLM's benchmark_latency): fixed lengths, ignore EOS."""

from __future__ import annotations

import statistics
import time

import torch

from engine.bench.workload import BenchRequest
from engine.sampling_params import SamplingParams


def run_engine_latency(llm, requests: list[BenchRequest], warmup: int, iters: int, lora_request=None) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=requests[0].max_tokens, ignore_eos=True, detokenize=False)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    return _time_iterations(lambda: llm.generate(prompts, params, use_tqdm=False, lora_request=lora_request),
                            requests, warmup, iters)


def run_hf_latency(model, requests: list[BenchRequest], warmup: int, iters: int, device: torch.device) -> dict:
    input_ids = torch.tensor([r.prompt_token_ids for r in requests], device=device)

    @torch.inference_mode()
    def once():
        model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                       max_new_tokens=requests[0].max_tokens, min_new_tokens=requests[0].max_tokens,
                       eos_token_id=None, pad_token_id=0)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return _time_iterations(once, requests, warmup, iters)


def _time_iterations(run_once, requests: list[BenchRequest], warmup: int, iters: int) -> dict:
    for _ in range(warmup):
        run_once()
    latencies = []
    for _ in range(iters):
        started = time.perf_counter()
        run_once()
        latencies.append(time.perf_counter() - started)
    mean = statistics.mean(latencies)
    output_len = requests[0].max_tokens
    return {"latency_mean_s": mean, "latency_p50_s": statistics.median(latencies),
            "ms_per_output_token": 1000 * mean / output_len,
            "output_tokens_per_s": len(requests) * output_len / mean}
