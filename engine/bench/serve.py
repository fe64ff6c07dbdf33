"""`python -m engine.bench serve`: streamed completions through the real HTTP API, timed per token
(vLLM's `bench serve`).

Several client processes (spawned, one asyncio loop and one HTTP connection pool each) share the
requests, so the client is never what limits the server. Each request is timed as it arrives on the
wire: SSE lines are split as bytes and only `data:` payloads are parsed. Every chunk with a choice
counts as a token arrival, as in vLLM's bench: the server sends one chunk per engine delta, whose
text may be empty while a multi-byte character is incomplete. The parent gathers every request's
record and computes the percentiles.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import multiprocessing
import queue
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx2 as httpx

from engine.bench.workload import BenchRequest

READY = "ready"  # a client process's first message: imports done, connection pool built


@dataclass(frozen=True)
class Target:
    base_url: str
    api_key: str
    model: str
    timeout_s: float = 600.0  # connect / between two reads


@dataclass
class RequestRecord:
    """What one streamed request did; times are `time.perf_counter()` (one clock for all processes)."""

    index: int
    prompt_tokens: int
    max_tokens: int
    started: float = 0.0
    ended: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # arrivals of chunks that carry tokens
    completion_tokens: int = 0  # from the final usage chunk
    status: int | None = None  # HTTP status
    finished: bool = False  # a finish_reason arrived
    done: bool = False  # `data: [DONE]` arrived after it
    error: str | None = None  # an error event, or the body of a non-200 answer
    cut: str | None = None  # why the stream broke off before [DONE]

    def on_data(self, payload: bytes, now: float) -> None:
        if payload == b"[DONE]":
            self.done = self.finished
            return
        event = json.loads(payload)
        if "error" in event:
            self.error = json.dumps(event["error"])
            return
        choices = event.get("choices")
        if choices:
            self.chunk_times.append(now)
            self.finished = self.finished or bool(choices[0].get("finish_reason"))
        if event.get("usage"):
            self.completion_tokens = event["usage"]["completion_tokens"]

    @property
    def outcome(self) -> str:
        """completed, failed (HTTP error or error event) or cut (the stream broke off)."""
        if self.error is not None:
            return "failed"
        return "completed" if self.done and self.cut is None else "cut"

    def ttft(self) -> float:
        return self.chunk_times[0] - self.started

    def tpot(self) -> float | None:
        """Time per output token after the first, as vLLM defines it."""
        if self.completion_tokens < 2:
            return None
        return (self.chunk_times[-1] - self.chunk_times[0]) / (self.completion_tokens - 1)

    def itl(self) -> list[float]:
        return [later - earlier for earlier, later in zip(self.chunk_times, self.chunk_times[1:])]

    def as_json(self) -> dict:
        completed = self.outcome == "completed"
        return {"index": self.index, "outcome": self.outcome, "status": self.status, "error": self.error,
                "cut": self.cut, "prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens,
                "completion_tokens": self.completion_tokens, "started": self.started,  # perf_counter: the ramp
                "latency_s": self.ended - self.started,
                "ttft_s": self.ttft() if completed and self.chunk_times else None,
                "itl_s": [round(gap, 6) for gap in self.itl()]}


class SseLines:
    """`data:` payloads out of a byte stream, split at newlines (one payload per line, as OpenAI sends)."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        return [line[5:].strip() for line in lines if line.startswith(b"data:")]


@dataclass(frozen=True)
class ClientShare:
    """One client process's part of the run: its requests, their arrival times, its concurrency cap."""

    target: Target
    jobs: list[tuple[int, float, BenchRequest]]  # (index, seconds after the start, request)
    max_in_flight: int | None


def run_load(target: Target, requests: list[BenchRequest], *, request_rate: float, max_concurrency: int | None,
             num_clients: int, seed: int) -> tuple[list[RequestRecord], float]:
    """Every request's record, and the seconds from the start signal to the last request's end."""
    arrivals = arrival_times(len(requests), request_rate, seed)
    num_clients = max(1, min(num_clients, len(requests), max_concurrency or len(requests)))
    shares = [ClientShare(target, [(i, arrivals[i], requests[i]) for i in range(k, len(requests), num_clients)],
                          None if max_concurrency is None else _share_of(max_concurrency, num_clients, k))
              for k in range(num_clients)]
    context = multiprocessing.get_context("spawn")
    go, messages = context.Event(), context.Queue()
    clients = [context.Process(target=_client_process, args=(share, go, messages), daemon=True) for share in shares]
    for client in clients:
        client.start()
    try:
        for _ in clients:
            _receive(messages, clients)  # READY: none sends anything else before `go`
        started = time.perf_counter()
        go.set()
        records = [record for _ in clients for record in _receive(messages, clients)]
    finally:
        for client in clients:
            client.kill()  # a no-op for those that have finished
            client.join()
    return sorted(records, key=lambda r: r.index), max(r.ended for r in records) - started


def arrival_times(count: int, request_rate: float, seed: int) -> list[float]:
    """All at once for an infinite rate, else a Poisson process (exponential gaps) at that rate."""
    if math.isinf(request_rate):
        return [0.0] * count
    rng, now, times = random.Random(seed), 0.0, []
    for _ in range(count):
        times.append(now)
        now += rng.expovariate(request_rate)
    return times


def _share_of(total: int, parts: int, part: int) -> int:
    return total // parts + (part < total % parts)


def _receive(messages, clients):
    """The next message of a client process; raise at once if one died instead of waiting on it."""
    while True:
        with contextlib.suppress(queue.Empty):
            return messages.get(timeout=0.5)
        dead = [c for c in clients if c.exitcode not in (None, 0)]
        if dead:
            raise RuntimeError(f"a benchmark client process exited with {dead[0].exitcode}")


def _client_process(share: ClientShare, go, messages) -> None:
    messages.put(asyncio.run(_run_share(share, go, messages)))


async def _run_share(share: ClientShare, go, messages) -> list[RequestRecord]:
    pool_size = share.max_in_flight or len(share.jobs)
    limits = httpx.Limits(max_connections=pool_size, max_keepalive_connections=pool_size)
    headers = {"Authorization": f"Bearer {share.target.api_key}"}
    async with httpx.AsyncClient(base_url=share.target.base_url, headers=headers, limits=limits,
                                 timeout=httpx.Timeout(share.target.timeout_s)) as client:
        messages.put(READY)
        go.wait()
        started = time.perf_counter()
        in_flight = asyncio.Semaphore(share.max_in_flight) if share.max_in_flight else contextlib.nullcontext()

        async def one(index: int, arrival: float, request: BenchRequest) -> RequestRecord:
            await asyncio.sleep(started + arrival - time.perf_counter())
            async with in_flight:
                return await stream_completion(client, share.target.model, index, request)

        return await asyncio.gather(*(one(*job) for job in share.jobs))


async def stream_completion(client: httpx.AsyncClient, model: str, index: int, request: BenchRequest) -> RequestRecord:
    body = {"model": model, "prompt": request.prompt_token_ids, "max_tokens": request.max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.0, "stream_options": {"include_usage": True}}
    record = RequestRecord(index, len(request.prompt_token_ids), request.max_tokens, started=time.perf_counter())
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            record.status = response.status_code
            if response.status_code != 200:
                record.error = (await response.aread()).decode(errors="replace")[:1000]
            else:
                lines = SseLines()
                async for chunk in response.aiter_bytes():
                    now = time.perf_counter()
                    for payload in lines.feed(chunk):
                        record.on_data(payload, now)
                if not record.done and record.error is None:
                    record.cut = "the stream ended before [DONE]"
    except (httpx.HTTPError, OSError, ValueError) as error:
        record.cut = f"{type(error).__name__}: {error}"
    record.ended = time.perf_counter()
    return record


def summarize(records: list[RequestRecord], duration_s: float) -> dict:
    """vLLM's serving metrics over the completed requests (times in ms), and what went wrong."""
    completed = [r for r in records if r.outcome == "completed" and r.chunk_times]
    outcomes = Counter(r.outcome for r in records)
    input_tokens = sum(r.prompt_tokens for r in completed)
    output_tokens = sum(r.completion_tokens for r in completed)
    summary = {"duration_s": duration_s, "completed": outcomes["completed"], "failed": outcomes["failed"],
               "cut": outcomes["cut"],
               "expected_tokens_ok": sum(r.completion_tokens == r.max_tokens for r in completed),
               "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
               "request_throughput": len(completed) / duration_s, "output_throughput": output_tokens / duration_s,
               "total_token_throughput": (input_tokens + output_tokens) / duration_s,
               "first_problems": [f"request {r.index}: {r.error or r.cut}" for r in records
                                  if r.outcome != "completed"][:5]}
    samples = {"ttft": [r.ttft() for r in completed], "tpot": [t for r in completed if (t := r.tpot()) is not None],
               "itl": [gap for r in completed for gap in r.itl()], "e2el": [r.ended - r.started for r in completed]}
    for name, values in samples.items():
        values.sort()
        summary[f"mean_{name}_ms"] = 1000 * statistics.fmean(values) if values else None
        for q in (50, 99):
            summary[f"p{q}_{name}_ms"] = 1000 * percentile(values, q) if values else None
    return summary


def percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks, as numpy's default."""
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


_REPORT_ROWS = [("Successful requests", "completed"), ("Failed requests", "failed"), ("Cut streams", "cut"),
                ("Streams of exactly max_tokens", "expected_tokens_ok"), ("Benchmark duration (s)", "duration_s"),
                ("Total input tokens", "total_input_tokens"), ("Total generated tokens", "total_output_tokens"),
                ("Request throughput (req/s)", "request_throughput"),
                ("Output token throughput (tok/s)", "output_throughput"),
                ("Total token throughput (tok/s)", "total_token_throughput")]
_LATENCIES = [("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st token)"),
              ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")]


def format_report(summary: dict) -> str:
    """The table vLLM's bench prints, plus the first problems if any."""
    lines = [" Serving Benchmark Result ".center(50, "=")]
    lines += [_row(label, summary[key]) for label, key in _REPORT_ROWS]
    for name, title in _LATENCIES:
        lines.append(f" {title} ".center(50, "-"))
        lines += [_row(f"{label} {name.upper()} (ms)", summary[f"{stat}_{name}_ms"])
                  for stat, label in (("mean", "Mean"), ("p50", "Median"), ("p99", "P99"))]
    lines.append("=" * 50)
    lines += summary["first_problems"]
    return "\n".join(lines)


def _row(label: str, value) -> str:
    text = "n/a" if value is None else f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label + ':':<40}{text:>10}"
