"""Timing for benchmarks: a method wrapped to add up the time spent in it (and, if asked, how often it
ran); milliseconds per call of a function, run eagerly or replayed from a CUDA graph."""

from __future__ import annotations

import time

import torch


def timed(totals: dict, name: str, method, count: str | None = None):
    """`method`, adding its seconds to totals[name] (and 1 to totals[count], when given) per call."""
    def run(*args, **kwargs):
        started = time.perf_counter()
        try:
            return method(*args, **kwargs)
        finally:
            totals[name] += time.perf_counter() - started
            if count is not None:
                totals[count] += 1

    return run


def eager_ms(fn, iters: int) -> float:
    """Milliseconds per call of `iters` calls launched one by one (after one warm-up call)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(iters):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - started) * 1000 / iters


def graph_ms(fn, iters: int) -> float:
    """Milliseconds per call, from one replay of a graph that holds `iters` calls."""
    if not torch.cuda.is_available():
        return eager_ms(fn, iters)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(iters):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters
