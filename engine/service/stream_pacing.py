"""Streamed tokens are coalesced only while the host, not the device, sets the pace.

With async scheduling the device runs step N+1 while the host updates step N and plans N+2. If the
host's work per step (scheduling, detokenizing, building and publishing one delta per streaming
request) outlasts the device's step, the device idles between steps and every request slows down:
at 1,000 streams on an H200 a replica's step took 47.9 ms against a 41.1 ms decode step
(benchmarks/RESULTS.md). Streaming every other token halves the per-delta work, and a token then
reaches its client at most one step later; vLLM's front end likewise merges the outputs of a
consumer that falls behind. The pacer watches the share of each step the host spent waiting for
the device: near zero, the host is the bottleneck and the interval goes up (to a cap); a clear
wait means per-token streaming fits again and the interval comes back down.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StreamPacer:
    base_interval: int = 1  # the configured stream interval: never below it
    max_interval: int = 2
    window: int = 16  # steps per decision: single steps are noisy (prefill chunks, grammar masks)
    host_bound_below: float = 0.05  # waited less than this share of the steps: the host sets the pace
    room_above: float = 0.25  # waited more than this share: the finer interval may fit again
    # Windows in a row with room before going finer: coarser streaming is what made the room, so one
    # window of it proves little (on an H200 at 1,000 streams a one-window rule flipped every second).
    patience: int = 4
    interval: int = field(init=False)

    def __post_init__(self) -> None:
        self.interval = self.base_interval
        self._steps, self._waited, self._elapsed = 0, 0.0, 0.0
        self._windows_with_room = 0

    def observe(self, step_seconds: float, waited_seconds: float) -> int | None:
        """Record one step planned ahead (its wall time, and how long the host waited in it for the
        device); returns the new stream interval when it changes."""
        self._steps += 1
        self._waited += waited_seconds
        self._elapsed += step_seconds
        if self._steps < self.window:
            return None
        share = self._waited / self._elapsed if self._elapsed > 0 else 1.0
        self._steps, self._waited, self._elapsed = 0, 0.0, 0.0
        interval = self.interval
        self._windows_with_room = self._windows_with_room + 1 if share > self.room_above else 0
        if share < self.host_bound_below:
            interval = min(interval + 1, max(self.max_interval, self.base_interval))
        elif self._windows_with_room >= self.patience:
            interval = max(interval - 1, self.base_interval)
            self._windows_with_room = 0
        if interval == self.interval:
            return None
        self.interval = interval
        return interval
