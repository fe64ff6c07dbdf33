"""At most WEB_ADMISSION_CONCURRENCY calls of one web process are admitted at once, in arrival order.

Why: admitting a call (authentication, validation, the rate-limit and quota scripts, the call's
record) is a dozen awaits and some milliseconds of CPU, and one event loop runs them all. When a
burst lands on a process (1000 streams at once over 8 workers: ~125 each), every call is
interleaved with every other at each await, so none of them reaches the engine until nearly all
have been admitted: on the H200 run the first request entered Redis ~1 s after the burst began,
while the engine sat idle. Taking turns gives the same work a different order: the first calls
reach the engine once a few have been admitted, and the engine starts on them while the rest are
still being admitted. A REST call's turn spans authentication to its admission (inference.apis),
and its engine request is queued right after, with only the next few turns to interleave with;
streaming or collecting the output never holds a turn.

A turn is given in arrival order (asyncio.Semaphore wakes its waiters first in, first out). The
gate belongs to one event loop (asyncio primitives do), so each loop has its own (`admission_gate`).
"""
from __future__ import annotations

import asyncio
import weakref

from django.conf import settings

_gates: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AdmissionGate] = weakref.WeakKeyDictionary()


class AdmissionGate:
    """Its public counters say what it did: `admitting` now, `waiting` now, the `peak` of
    `admitting`, and `turns` given so far."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the admission limit must be at least 1, got {limit}")
        self.limit = limit
        self.admitting = self.waiting = self.peak = self.turns = 0
        self._semaphore = asyncio.Semaphore(limit)

    def turn(self) -> AdmissionTurn:
        """`async with gate.turn() as turn:` waits for a turn; `turn.end()` ends it early (admitted)."""
        return AdmissionTurn(self)

    async def _enter(self) -> None:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.turns += 1
        self.admitting += 1
        self.peak = max(self.peak, self.admitting)

    def _leave(self) -> None:
        self.admitting -= 1
        self._semaphore.release()


class AdmissionTurn:
    def __init__(self, gate: AdmissionGate) -> None:
        self.gate, self.held = gate, False

    async def __aenter__(self) -> AdmissionTurn:
        await self.gate._enter()
        self.held = True
        return self

    async def __aexit__(self, *exc_info) -> None:
        self.end()

    def end(self) -> None:
        """Give the turn to the next call; a second end() does nothing."""
        if self.held:
            self.held = False
            self.gate._leave()


def admission_gate() -> AdmissionGate:
    """The running event loop's gate (WEB_ADMISSION_CONCURRENCY turns)."""
    loop = asyncio.get_running_loop()
    gate = _gates.get(loop)
    if gate is None:
        gate = _gates[loop] = AdmissionGate(settings.WEB_ADMISSION_CONCURRENCY)
    return gate
