"""python -m engine.bench.scheduler: the scheduler's own cost with a deep waiting queue, no model.

10,000 waiting sequences of 50 tenants (arrivals interleaved at random), then steps with a fake
model that samples a token whenever a request's known tokens are computed. Prints the time to
enqueue them all and schedule()'s time per step; the scheduler runs every engine step, so this
must stay small next to a forward pass. Times are this process's CPU time, so a busy machine
does not inflate them.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from engine.config import SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler import Scheduler
from engine.request import Request, child_request_id
from engine.sampling_params import SamplingParams


def build(num_requests: int, num_tenants: int, seed: int, n: int = 1) -> tuple[Scheduler, list[Request]]:
    """`num_requests` sequences: prompts of a random tenant each, with `n` sequences (siblings) per prompt."""
    config = SchedulerConfig(max_model_len=4096, max_num_seqs=256, max_num_batched_tokens=8192,
                             long_prefill_token_threshold=2048)
    scheduler = Scheduler(config, KVCacheManager(num_blocks=20_000, block_size=16, enable_caching=True))
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests // n):
        prompt = [rng.randrange(3, 30_000) for _ in range(rng.randrange(16, 128))]
        params, tenant = SamplingParams(max_tokens=rng.randrange(4, 64)), f"tenant-{rng.randrange(num_tenants)}"
        for k in range(n):
            request_id, parent_id = (f"r{i}", None) if n == 1 else (child_request_id(f"r{i}", k), f"r{i}")
            requests.append(Request(request_id, prompt, params, arrival_time=float(len(requests)), tenant=tenant,
                                    parent_id=parent_id, index=k))
    return scheduler, requests


def run(num_requests: int, num_tenants: int, steps: int, seed: int, n: int = 1) -> dict:
    scheduler, requests = build(num_requests, num_tenants, seed, n)
    started = time.process_time()
    for request in requests:
        scheduler.add_request(request)
    add_s = time.process_time() - started
    timings = []
    for step in range(steps):
        started = time.process_time()
        output = scheduler.schedule()
        timings.append(time.process_time() - started)
        sampled = {request_id: 10 + step % 50 for request_id in output.sampling_req_ids}
        scheduler.update(output, sampled)
    timings_ms = sorted(t * 1000 for t in timings)
    return {"requests": num_requests, "tenants": num_tenants, "n": n, "add_all_ms": round(add_s * 1000, 1),
            "schedule_ms_mean": round(statistics.fmean(timings_ms), 3),
            "schedule_ms_p50": round(timings_ms[len(timings_ms) // 2], 3),
            "schedule_ms_max": round(timings_ms[-1], 3), "steps": steps,
            "still_waiting": len(scheduler.waiting)}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.scheduler", description=__doc__)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--tenants", type=int, default=50)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n", type=int, default=1, help="sequences per prompt (siblings wait for the first's prompt)")
    args = parser.parse_args()
    print(run(args.requests, args.tenants, args.steps, args.seed, args.n))


if __name__ == "__main__":
    main()
