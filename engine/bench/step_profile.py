"""Where a step's time goes: host time per phase, time waiting for the device, and the device's own
kernels over a window of steady steps (torch.profiler).

    python -m engine.bench.step_profile --model dummy:llama-3.1-8b --dtype bfloat16 --num-prompts 1000 \
        --input-len 256 --output-len 256 [engine options, e.g. --no-async-scheduling]

The profiled window starts at step `--profile-from` (default: a quarter of the prompts, past the
prefills of a uniform workload) and lasts `--window` steps (0: to the end, the whole run with
`--profile-from 0`). After the kernel table comes the window's device time by kind (linear layers,
attention, the rest) and the linear layers' achieved TFLOP/s (engine/bench/kernel_kinds.py).

Host phases are timed by wrapping the engine's own methods for this run: schedule, launch (inputs,
the forward's launches, sampling), fetch (mostly waiting for the device), update, process.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import asdict

from engine.bench.kernel_kinds import from_profiler, summary_lines
from engine.bench.timing import timed
from engine.bench.workload import LengthRange, make_workload
from engine.cli_args import add_engine_args, engine_config_from_args


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.step_profile", description=__doc__)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    parser.add_argument("--output-len", type=LengthRange.parse, default=LengthRange.parse("256"))
    parser.add_argument("--window", type=int, default=20, help="steps under torch.profiler (0: to the end)")
    parser.add_argument("--profile-from", type=int, default=None,
                        help="the first profiled step (default: a quarter of --num-prompts)")
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
    first = len(requests) // 4 if args.profile_from is None else args.profile_from
    last = first + args.window if args.window > 0 else None
    on_cuda = engine.runner.device.type == "cuda"
    window = {"tokens": 0, "samples": 0, "steps": 0}
    schedule = engine.scheduler.schedule

    def schedule_and_count():
        output = schedule()
        if profiled is not None and window_open:
            window["tokens"] += output.total_num_scheduled_tokens
            window["samples"] += len(output.sampling_req_ids)
        return output

    engine.scheduler.schedule = schedule_and_count
    steps, started, profiled, window_open = 0, time.perf_counter(), None, False
    while engine.has_unfinished_requests():
        if steps == first and profiled is None:
            activity = torch.profiler.ProfilerActivity.CUDA if on_cuda else torch.profiler.ProfilerActivity.CPU
            profiled = torch.profiler.profile(activities=[activity])
            profiled.__enter__()
            window_open, window_started = True, time.perf_counter()
        engine.step()
        steps += 1
        if window_open and (steps == last or not engine.has_unfinished_requests()):
            if on_cuda:
                torch.cuda.synchronize()
            window_s = time.perf_counter() - window_started
            window["steps"] = steps - first
            profiled.__exit__(None, None, None)
            window_open = False
    elapsed = time.perf_counter() - started
    print(f"{steps} steps in {elapsed:.2f} s ({1000 * elapsed / steps:.2f} ms/step), "
          f"{engine.stats()['num_preemptions']} preemptions")
    for name, seconds in sorted(totals.items(), key=lambda item: -item[1]):
        print(f"  {name:9s} {seconds:7.2f} s  {1000 * seconds / steps:6.2f} ms/step")
    if profiled is not None:
        num_window_steps = window["steps"]
        print(f"device kernels over {num_window_steps} steps from step {first} "
              f"({1000 * window_s / max(num_window_steps, 1):.2f} ms/step wall; {window['tokens']} tokens, "
              f"{window['samples']} sampled):")
        print(profiled.key_averages().table(sort_by="cuda_time_total" if on_cuda else "cpu_time_total", row_limit=14,
                                            max_name_column_width=60))
        flops = linear_flops(engine, window["tokens"], window["samples"])
        print("\n".join(summary_lines(from_profiler(profiled, on_cuda), num_window_steps, flops)))


def linear_flops(engine, num_tokens: int, num_sampled: int) -> float:
    """The FLOPs of the window's linear layers: every scheduled token through every decoder projection
    (nn.Linear and the CPU's prepacked ones; MoE experts are not counted), and the LM head for the
    rows that sample (the only ones whose logits are computed)."""
    from torch import nn

    from engine.layers.prepacked_linear import PrepackedLinear

    decoder = sum(module.in_features * module.out_features for name, module in engine.runner.model.named_modules()
                  if isinstance(module, (nn.Linear, PrepackedLinear)) and "lm_head" not in name)
    config = engine.model_config
    return 2.0 * (decoder * num_tokens + config.vocab_size * config.hidden_size * num_sampled)


if __name__ == "__main__":
    main()
