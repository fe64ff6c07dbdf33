"""python -m engine.bench.host_step: the engine's and a replica's host time per steady decode step.

The host work of a step (schedule, inputs, update, outputs) must stay well under the device's step
for async scheduling to hide it; on a replica the step's deltas are also built and encoded for
Redis. This measures that work alone, on any machine: the bundled model's engine with its forward
pass, logits and sampler replaced by constants (the one part not measured), N sequences decoding.

    python -m engine.bench.host_step --num-seqs 1000 [--replica [--stream-interval 2]]

Without --replica: what the offline benchmark asks for (final outputs only, no detokenization).
With it: per-token DELTA outputs with detokenization, the replica's `_publish` and the writer's
encoding of each client's deltas (`encode_deltas`), as `engine serve` does every step.
`--web-detokenizes` leaves the text to the web processes, as the replica runs plain streams
(inference/stream_text.py). `--stream-interval 2` streams every other token, requests taking turns,
as the replica's pacer does while its host work outlasts the device's step
(engine/service/stream_pacing.py).
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections import defaultdict

import torch

from engine.config import EngineConfig
from engine.layers.sampler import DeviceSample
from engine.llm_engine import LLMEngine
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.service.protocol import encode_deltas
from engine.service.server import EngineServer, InFlight

NUM_WEB_CLIENTS = 8  # reply streams the deltas are spread over, as with 8 web workers


def build_engine(num_seqs: int) -> LLMEngine:
    engine = LLMEngine(EngineConfig(dtype="float32", device="cpu", max_num_seqs=max(num_seqs, 8),
                                    max_num_batched_tokens=16384, kv_cache_memory_bytes=6 << 30,
                                    async_scheduling=False))
    runner, generator = engine.runner, torch.Generator().manual_seed(0)
    hidden_size = runner.model_config.hidden_size
    runner.model.forward = lambda input_ids, positions: torch.zeros(input_ids.shape[0], hidden_size)
    runner.compute_logits = lambda hidden: hidden[:, :1]
    runner.sampler.sample = lambda logits, requests, bitmask=None: DeviceSample(
        torch.randint(1000, 40000, (len(requests),), generator=generator), None, [None] * len(requests))
    return engine


def run(num_seqs: int, replica: bool, steps: int, seed: int = 0, stream_interval: int = 1,
        web_detokenizes: bool = False) -> dict:
    engine = build_engine(num_seqs)
    server = EngineServer(engine, "redis://unused", "bench") if replica else None
    engine.output_processor.stream_interval = stream_interval
    engine.output_processor.stagger = stream_interval > 1
    kind = RequestOutputKind.DELTA if replica else RequestOutputKind.FINAL_ONLY
    rng = random.Random(seed)
    for i in range(num_seqs):
        request_id = f"cmpl-{i:08x}"
        prompt = [rng.randrange(1000, 40000) for _ in range(16)]
        engine.add_request(request_id, {"prompt_token_ids": prompt}, SamplingParams(
            max_tokens=steps + 10, ignore_eos=True, detokenize=replica and not web_detokenizes, output_kind=kind))
        if server is not None:
            server.in_flight[request_id] = InFlight(f"web-{i % NUM_WEB_CLIENTS}")
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
        engine.step()  # the prefills: timing starts at steady decoding
    gc.collect()
    timings = defaultdict(float)
    for _ in range(steps):
        started = time.perf_counter()
        outputs = engine.step()
        stepped = time.perf_counter()
        timings["engine step"] += stepped - started
        if server is not None:
            server._publish(outputs)
            published = time.perf_counter()
            by_client = defaultdict(list)
            while not server.outgoing.empty():
                for reply_to, delta in server.outgoing.get_nowait()[1]:
                    by_client[reply_to].append(delta)
            for deltas in by_client.values():
                encode_deltas(deltas)
            timings["publish"] += published - stepped
            timings["encode (writer thread)"] += time.perf_counter() - published
    result = {name: round(1000 * seconds / steps, 2) for name, seconds in timings.items()}
    return {"num_seqs": num_seqs, "replica": replica, "stream_interval": stream_interval,
            "web_detokenizes": web_detokenizes, "steps": steps,
            "ms_per_step": result,
            "total_ms_per_step": round(sum(result.values()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.host_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-seqs", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--replica", action="store_true")
    parser.add_argument("--stream-interval", type=int, default=1)
    parser.add_argument("--web-detokenizes", action="store_true")
    args = parser.parse_args()
    print(run(args.num_seqs, args.replica, args.steps, stream_interval=args.stream_interval,
              web_detokenizes=args.web_detokenizes))


if __name__ == "__main__":
    main()
