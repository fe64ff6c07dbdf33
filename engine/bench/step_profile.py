"""Where a step's time goes: host time per phase, time waiting for the device, and the device's own
kernels over a window of steady steps (torch.profiler).

    python -m engine.bench.step_profile --model dummy:llama-3.1-8b --dtype bfloat16 --num-prompts 1000 \
        --input-len 256 --output-len 256 [engine options, e.g. --no-async-scheduling]

Host phases are timed by wrapping the engine's own methods for this run: schedule, launch (inputs,
the forward's launches, sampling), fetch (mostly waiting for the device), update, process.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import asdict

from engine.bench.timing import timed
from engine.bench.workload import LengthRange, make_workload
from engine.cli_args import add_engine_args, engine_config_from_args


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.step_profile", description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    parser.add_argument("--output-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    parser.add_argument("--window", type=int, default=20, help="steady steps under torch.profiler")
    add_engine_args(parser)
    args = parser.parse_args()
    import torch

    from engine.llm import LLM
    from engine.sampling_params import RequestOutputKind, SamplingParams

    options = asdict(engine_config_from_args(args))
    options["skip_tokenizer_init"] = True
    engine = LLM(**options).llm_engine
    totals: dict[str, float] = defaultdict(float)
    for owner, name in ((engine.scheduler, "schedule"), (engine.scheduler, "update"), (engine.runner, "launch"),
                        (engine.runner, "fetch"), (engine.output_processor, "process")):
        setattr(owner, name, timed(totals, name, getattr(owner, name)))
    requests = make_workload(args.num_prompts, args.input_len, args.output_len, engine.vocab_size, args.seed)
    for i, request in enumerate(requests):
        engine.add_request(str(i), {"prompt_token_ids": request.prompt_token_ids},
                           SamplingParams(temperature=0.0, max_tokens=request.max_tokens, ignore_eos=True,
                                          detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY))
    steps, started, profiled = 0, time.perf_counter(), None
    while engine.has_unfinished_requests():
        if steps == len(requests) // 4 and profiled is None:  # past the prefills: steady decoding
            on_cuda = engine.runner.device.type == "cuda"
            activity = torch.profiler.ProfilerActivity.CUDA if on_cuda else torch.profiler.ProfilerActivity.CPU
            profiled = torch.profiler.profile(activities=[activity])
            profiled.__enter__()
            window_started = time.perf_counter()
        engine.step()
        steps += 1
        if profiled is not None and steps == len(requests) // 4 + args.window:
            if on_cuda:
                torch.cuda.synchronize()
            window_s = time.perf_counter() - window_started
            profiled.__exit__(None, None, None)
    elapsed = time.perf_counter() - started
    print(f"{steps} steps in {elapsed:.2f} s ({1000 * elapsed / steps:.2f} ms/step), "
          f"{engine.stats()['num_preemptions']} preemptions")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {name:9s} {seconds:7.2f} s  {1000 * seconds / steps:6.2f} ms/step")
    if profiled is not None:
        print(f"device kernels over {args.window} steady steps ({1000 * window_s / args.window:.2f} ms/step wall):")
        print(profiled.key_averages().table(sort_by="cuda_time_total" if on_cuda else "cpu_time_total", row_limit=14, max_name_column_width=60))


if __name__ == "__main__":
    main()
