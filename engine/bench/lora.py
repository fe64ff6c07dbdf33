"""`python -m engine.bench lora`: many adapters against the base model, in one process.

The issue's two figures: offline throughput with `--num-loras` distinct random adapters (rank
`--lora-rank`, every projection) spread round-robin over the requests, against the same requests on
the base model with LoRA off; and batch-1 time per token with one adapter against the base. The base
engine runs first and is released before the LoRA engine loads, so each gets the whole device.
"""

from __future__ import annotations

import tempfile

from engine.bench.latency import run_engine_latency
from engine.bench.throughput import run_engine_throughput
from engine.bench.workload import LengthRange, make_workload
from engine.lora.random_adapter import write_random_adapter
from engine.lora.request import LoRARequest


def run_lora_bench(options: dict, num_loras: int, rank: int, num_prompts: int, input_len: LengthRange,
                   output_len: LengthRange, seed: int, release_memory) -> dict:
    from engine.llm import LLM

    results, runs = {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as folder:
        for name, extra in (("base", {}), ("lora", {"enable_lora": True, "max_loras": num_loras,
                                                    "max_lora_rank": rank})):
            llm = LLM(**options, **extra)
            engine = llm.llm_engine
            requests = make_workload(num_prompts, input_len, output_len, engine.vocab_size, seed)
            one = make_workload(1, LengthRange.parse("32"), LengthRange.parse("128"), engine.vocab_size, seed)
            adapters = None
            if extra:
                adapters = [LoRARequest(f"bench-{i}", i + 1, str(write_random_adapter(
                    f"{folder}/a{i}", engine.model_config, rank, seed=seed + i))) for i in range(num_loras)]
            lora_requests = [adapters[i % num_loras] for i in range(len(requests))] if adapters else None
            runs[name] = {
                "throughput": run_engine_throughput(llm, requests, ignore_eos=True, lora_requests=lora_requests),
                "batch_1": run_engine_latency(llm, one, warmup=2, iters=5,
                                              lora_request=adapters[0] if adapters else None)}
            engine.shutdown()
            del llm, engine
            release_memory()
    results.update(runs)
    results["throughput_ratio"] = (runs["lora"]["throughput"]["output_tokens_per_s"]
                                   / runs["base"]["throughput"]["output_tokens_per_s"])
    results["batch_1_speed_ratio"] = (runs["base"]["batch_1"]["latency_mean_s"]
                                      / runs["lora"]["batch_1"]["latency_mean_s"])
    return results
