"""Wrapping a method so a benchmark adds up the time spent in it (and, if asked, how often it ran)."""

from __future__ import annotations

import time


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
