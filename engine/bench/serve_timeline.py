"""python -m engine.bench.serve_timeline: where an HTTP run's time went, against the offline run.

Reads what one `engine.bench serve --launch --json` wrote and, when given, what
`engine.bench.cpu_usage` and `engine.bench.queue_watch` sampled meanwhile (all on the one
`time.perf_counter()` clock). For each HTTP run: how the requests arrived (client starts, their
entry into the Redis request stream, their acceptance by the replica), when their first tokens came,
and the CPU of every role over that run; with the offline run's TTFT and TPOT beside HTTP's:

    python -m engine.bench.serve_timeline serve.json [--cpu cpu.json] [--queue queue.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from engine.bench.cpu_usage import format_summary, summarize
from engine.bench.serve import percentile

RUNS = ("http", "http_capped")
QUANTILES = (0, 10, 50, 90, 100)


def run_window(run: dict) -> tuple[float, float]:
    """From the first request's start (the start signal, within milliseconds) to the last one's end."""
    records = run["requests"]
    return min(r["started"] for r in records), max(r["started"] + r["latency_s"] for r in records)


def arrivals(run: dict, queue: dict | None) -> dict:
    """Seconds after the start of: the client starting requests, first tokens, and (from the queue
    readings) the requests' XADD by the web side and acceptance by the replica's engine loop."""
    go, end = run_window(run)
    records = run["requests"]
    firsts = sorted(r["started"] + r["ttft_s"] - go for r in records if r["ttft_s"] is not None)
    result = {"seconds": end - go, "client_start_spread_s": max(r["started"] for r in records) - go,
              "first_token_s": {f"p{q}": percentile(firsts, q) for q in QUANTILES} if firsts else None}
    if queue:
        result |= _queue_ramp(queue["readings"], go, end, len(records))
    return result


def _queue_ramp(readings: list[dict], go: float, end: float, count: int) -> dict:
    readings = [r for r in readings if "streams" in r and r["streams"]]
    before = [r for r in readings if r["t"] <= go]
    during = [r for r in readings if go < r["t"] <= end]
    if not during:
        return {}
    def totals(reading: dict, name: str) -> int:
        return sum(stream[name] for stream in reading["streams"].values())

    def accepted(reading: dict) -> int:  # a replica acks and deletes an entry once its engine has the request
        return totals(reading, "added") - totals(reading, "length")

    # a request stream that no reading saw before the start held nothing yet (a new stack's first run)
    added0, accepted0 = (totals(before[-1], "added"), accepted(before[-1])) if before else (0, 0)
    result = {}
    for label, value in (("xadded", lambda r: totals(r, "added") - added0),
                         ("accepted", lambda r: accepted(r) - accepted0)):
        result[f"{label}_s"] = {f"{share}%": next((r["t"] - go for r in during if value(r) >= count * share / 100),
                                                  None) for share in (1, 25, 50, 90, 100)}
    beats = {}  # a heartbeat comes every second: each once, at the first reading that saw it
    for reading in during:
        for replica, beat in reading["replicas"].items():
            beats.setdefault((replica, beat["sent_at"]), (round(reading["t"] - go, 2), beat))
    if beats:
        most = max(beats.values(), key=lambda b: b[1]["num_running"])
        result["replica_max_running"] = {"running": most[1]["num_running"], "at_s": most[0]}
        result["heartbeats_t_running_waiting_queued"] = [(t, b["num_running"], b["num_waiting"], b["queue_depth"])
                                                         for t, b in beats.values()]
    return result


def report(serve: dict, cpu: dict | None, queue: dict | None) -> str:
    lines = []
    offline = serve.get("offline")
    if offline:
        lines.append(f"offline: {offline['output_tokens_per_s']:.1f} tok/s in {offline['elapsed_s']:.2f} s, "
                     f"TTFT p50 {offline.get('ttft_p50_s', float('nan')):.3f} s, "
                     f"TPOT p50 {offline.get('tpot_p50_ms', float('nan')):.2f} ms")
    for name in RUNS:
        run = serve.get(name)
        if not run:
            continue
        ratio = f" = {run['output_throughput'] / offline['output_tokens_per_s']:.3f} of offline" if offline else ""
        lines.append(f"{name}: {run['output_throughput']:.1f} tok/s in {run['duration_s']:.2f} s{ratio}, "
                     f"TTFT p50 {run['p50_ttft_ms'] / 1000:.3f} s, TPOT p50 {run['p50_tpot_ms']:.2f} ms, "
                     f"ITL p50 {run['p50_itl_ms']:.2f} ms")
        lines.append(f"  arrivals: {json.dumps(arrivals(run, queue))}")
        if cpu:
            lines.append(format_summary(summarize(cpu, run_window(run))))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.bench.serve_timeline", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("serve", help="the JSON of `engine.bench serve --launch --json`")
    parser.add_argument("--cpu", help="the JSON of `engine.bench.cpu_usage` over the same run")
    parser.add_argument("--queue", help="the JSON of `engine.bench.queue_watch` over the same run")
    args = parser.parse_args(argv)
    load = lambda path: json.loads(Path(path).read_text()) if path and Path(path).exists() else None  # noqa: E731
    print(report(load(args.serve), load(args.cpu), load(args.queue)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
