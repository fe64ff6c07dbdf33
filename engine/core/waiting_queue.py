"""The waiting queue: strict priority classes, and within a class fair shares between tenants.

Why: served by arrival alone, one call of n=128 over 64 prompts queues 8,192 sequences ahead of
every later tenant. Within a priority class the next admission goes to the tenant admitted least
so far (start-time fair queuing, one unit per sequence admitted), then arrival order within that
tenant. A tenant that starts waiting joins at the class's current virtual time, so it neither
waits behind a flood nor gets credit for having been idle: it is admitted within one admission
per other waiting tenant of its class. Requests without a tenant (offline use) are one tenant, so
a single tenant is served exactly by (priority, arrival).

Adding and admitting cost O(log tenants) plus a list insert within the tenant.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
from collections.abc import Iterator

from engine.request import Request


def _arrival(request: Request) -> float:
    return request.arrival_time


class _TenantQueue:
    __slots__ = ("tenant", "requests", "tag", "version")

    def __init__(self, tenant: str | None, tag: int) -> None:
        self.tenant = tenant
        self.requests: list[Request] = []  # by arrival; a preempted request keeps its place
        self.tag = tag  # virtual start time of this tenant's next admission
        self.version = 0  # heap entries of older versions are stale


class _PriorityClass:
    """The tenants waiting at one priority, in a heap by (tag, arrival of their first request)."""

    def __init__(self) -> None:
        self.tenants: dict[str | None, _TenantQueue] = {}  # those with a waiting request
        self.idle_tags: dict[str | None, int] = {}  # tags of tenants that stopped waiting
        self.virtual_time = 0
        self.heap: list[tuple] = []
        self.size = 0
        self._tiebreak = itertools.count()

    def add(self, request: Request) -> None:
        queue = self.tenants.get(request.tenant)
        if queue is None:
            tag = max(self.idle_tags.pop(request.tenant, 0), self.virtual_time)
            queue = self.tenants[request.tenant] = _TenantQueue(request.tenant, tag)
        requests = queue.requests
        if not requests or requests[-1].arrival_time <= request.arrival_time:
            requests.append(request)
        else:
            bisect.insort_right(requests, request, key=_arrival)
        self.size += 1
        if requests[0] is request:
            self._push(queue)

    def remove(self, request: Request, *, admitted: bool) -> None:
        queue = self.tenants[request.tenant]
        requests = queue.requests
        position = bisect.bisect_left(requests, request.arrival_time, key=_arrival)
        while requests[position] is not request:  # past others that arrived at the same time
            position += 1
        del requests[position]
        was_first = position == 0
        self.size -= 1
        if admitted:
            self.virtual_time = max(self.virtual_time, queue.tag)
            queue.tag += 1
        if not queue.requests:
            queue.version += 1
            del self.tenants[request.tenant]
            self.idle_tags[request.tenant] = queue.tag
        elif admitted or was_first:
            self._push(queue)

    def in_admission_order(self) -> Iterator[Request]:
        """Waiting requests, best first. One the caller passes over (neither admitted nor removed)
        is skipped for the rest of this pass and its tenant's next request is offered instead."""
        passed: dict[str | None, int] = {}  # tenant -> how many of its first requests were passed over
        parked: list[_TenantQueue] = []  # tenants all of whose requests were passed over
        try:
            while (queue := self._first()) is not None:
                requests, position = queue.requests, passed.get(queue.tenant, 0)
                while position < len(requests):
                    request = requests[position]
                    yield request
                    if position < len(requests) and requests[position] is request:
                        position += 1  # passed over: no tag changed, so this tenant is still first
                    else:
                        break  # admitted (its tenant's tag grew) or removed: pick again
                else:
                    heapq.heappop(self.heap)
                    parked.append(queue)
                passed[queue.tenant] = position
        finally:
            for queue in parked:
                if self.tenants.get(queue.tenant) is queue:
                    self._push(queue)

    def _first(self) -> _TenantQueue | None:
        heap = self.heap
        while heap:
            queue, version = heap[0][-1], heap[0][-2]
            if queue.version == version:
                return queue
            heapq.heappop(heap)
        return None

    def _push(self, queue: _TenantQueue) -> None:
        queue.version += 1
        heapq.heappush(self.heap, (queue.tag, queue.requests[0].arrival_time, next(self._tiebreak),
                                   queue.version, queue))
        if len(self.heap) > 2 * len(self.tenants) + 64:  # drop stale entries, amortised O(1)
            self.heap = [entry for entry in self.heap if entry[-1].version == entry[-2]]
            heapq.heapify(self.heap)


class WaitingQueue:
    """Requests waiting for admission: lower priority values strictly first, fair between tenants
    within a priority (see the module docstring)."""

    def __init__(self) -> None:
        self._classes: dict[int, _PriorityClass] = {}
        self._size = 0

    def add(self, request: Request) -> None:
        self._classes.setdefault(request.priority, _PriorityClass()).add(request)
        self._size += 1

    def remove(self, request: Request) -> None:
        """Take out a request that leaves without running (an abort)."""
        self._take(request, admitted=False)

    def admit(self, request: Request) -> None:
        """Take out a request that starts running; its tenant is charged one admission."""
        self._take(request, admitted=True)

    def in_admission_order(self) -> Iterator[Request]:
        """Best first; close it (or exhaust it) before changing the queue other than by admit/remove
        of the request it last offered."""
        for priority in sorted(self._classes):
            priority_class = self._classes.get(priority)
            if priority_class is not None:
                yield from priority_class.in_admission_order()

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Request]:
        """Every waiting request by priority and tenant (not the admission order)."""
        for priority in sorted(self._classes):
            for queue in list(self._classes[priority].tenants.values()):
                yield from list(queue.requests)

    def __contains__(self, request: Request) -> bool:
        priority_class = self._classes.get(request.priority)
        queue = priority_class and priority_class.tenants.get(request.tenant)
        return bool(queue) and any(r is request for r in queue.requests)

    def _take(self, request: Request, *, admitted: bool) -> None:
        priority_class = self._classes[request.priority]
        priority_class.remove(request, admitted=admitted)
        self._size -= 1
        if not priority_class.size:  # nobody waits at this priority: nothing to be fair about
            del self._classes[request.priority]
