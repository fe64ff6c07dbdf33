"""Continuous batching with a token budget (vLLM v1's scheduler).

Each step every running request gets the tokens it still needs (1 for a decode, a chunk for a
prefill) out of `max_num_batched_tokens`; waiting requests are admitted with what is left.
Prefill and decode mix freely in one step. When blocks run out, a running request is preempted:
its blocks are freed and it is recomputed later.

Priorities are strict; within one, tenants take turns. One tenant's flood of sequences must not
hold another tenant's small call behind it (issue 15), so waiting requests are admitted fairly
between tenants (engine/core/waiting_queue.py), running ones get the token budget round-robin over
tenants, and preemption takes the latest sequence of the tenant with the most running at the worst
priority. Requests without a tenant are one tenant: then it is plain (priority, arrival) order.
"""

from __future__ import annotations

from contextlib import closing
from dataclasses import dataclass, field
from operator import attrgetter

from engine.config import SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.waiting_queue import WaitingQueue
from engine.request import Request, RequestStatus, child_request_id

_by_priority_and_arrival = attrgetter("priority", "arrival_time")  # Request.sort_key, faster


@dataclass
class SchedulerOutput:
    # Requests in batch order with the number of tokens each computes this step.
    scheduled: list[tuple[Request, int]] = field(default_factory=list)
    block_ids: dict[str, list[int]] = field(default_factory=dict)
    preempted: list[Request] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(num for _, num in self.scheduled)

    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.peak_kv_blocks = 0  # most blocks held by running requests at the end of any step
        self.peak_kv_token_utilization = 1.0  # live tokens / allocated slots at that peak

    # -- queue management ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.add(request)

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        """Abort or stop requests wherever they are; their blocks return to the pool now."""
        finished = []
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        self._order_running()
        scheduled_ids: set[str] = set()

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_tokens_to_schedule(request, budget)
            while self.kv_cache_manager.allocate_slots(request, num_new) is None:
                victim = self.running.pop()  # see _order_running
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is request:
                    break
            else:
                output.scheduled.append((request, num_new))
                scheduled_ids.add(request.request_id)
                budget -= num_new
                index += 1
                continue
            break

        if not output.preempted:
            budget = self._admit_waiting(output, budget)

        for request, _ in output.scheduled:
            output.block_ids[request.request_id] = self.kv_cache_manager.get_block_ids(request.request_id)
        return output

    def _admit_waiting(self, output: SchedulerOutput, budget: int) -> int:
        with closing(self.waiting.in_admission_order()) as candidates:
            for request in candidates:
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                sibling = self._sibling_with_prompt(request)
                if sibling is False:  # an earlier sibling is still computing the shared prompt
                    continue
                computed_blocks, num_computed = self.kv_cache_manager.get_computed_blocks(request, sibling)
                remaining = request.num_tokens - request.num_computed_tokens - num_computed
                num_others = len(self.waiting) - 1 + len(self.running)
                num_new = min(remaining, budget, self._prefill_chunk_limit(num_others))
                if self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks) is None:
                    break  # the pool is full; keep the fair order rather than skipping ahead
                self.waiting.admit(request)
                request.num_computed_tokens += num_computed
                if request.num_preemptions == 0:
                    request.num_cached_tokens = num_computed
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                output.scheduled.append((request, num_new))
                budget -= num_new
        return budget

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int]) -> list[Request]:
        """Advance progress after the model ran; append sampled tokens; return finished requests."""
        finished = []
        for request, num_new in output.scheduled:
            if request.is_finished():  # aborted while the step ran
                continue
            request.num_computed_tokens += num_new
            token_id = sampled_token_ids.get(request.request_id)
            if token_id is not None:
                request.append_output_token(token_id)
                status = self._check_stop(request, token_id)
            elif request.is_prefill_only and request.num_computed_tokens == request.num_tokens:
                status = RequestStatus.FINISHED_LENGTH_CAPPED  # max_tokens=0: the prompt is scored
            else:
                continue  # a partial prefill chunk: nothing to sample yet
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
                finished.append(request)
        self._record_kv_usage()
        return finished

    # -- helpers ------------------------------------------------------------------------------------

    def _num_tokens_to_schedule(self, request: Request, budget: int) -> int:
        remaining = request.num_tokens - request.num_computed_tokens
        if remaining > 1:
            others = len(self.waiting) + len(self.running) - 1
            remaining = min(remaining, self._prefill_chunk_limit(others))
        return min(remaining, budget)

    def _prefill_chunk_limit(self, num_others: int) -> int:
        """A long prefill takes smaller chunks while others wait or run, so they never starve behind it."""
        if num_others > 0:
            return self.config.long_prefill_token_threshold
        return self.config.max_num_batched_tokens

    def _sibling_with_prompt(self, request: Request):
        """For child k > 0 of an `n > 1` request: the first child, whose prompt blocks it shares
        once computed; False while that prompt is still being computed; None if not applicable."""
        if request.parent_id is None or request.index == 0 or request.num_preemptions:
            return None
        first = self.requests.get(child_request_id(request.parent_id, 0))
        if first is None or first.num_preemptions:
            return None
        if first.status != RequestStatus.RUNNING or first.num_computed_tokens < first.num_prompt_tokens:
            return False
        return first

    def _check_stop(self, request: Request, token_id: int) -> RequestStatus | None:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if (not params.ignore_eos and token_id in params.all_stop_token_ids) or token_id in params.stop_token_ids:
                request.stop_reason = token_id if token_id in params.stop_token_ids else None
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH_CAPPED
        return None

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]

    def _order_running(self) -> None:
        """By priority, then round-robin over tenants (each tenant's k-th oldest sequence before
        anyone's (k+1)-th), then arrival. The token budget goes down this list and preemption
        takes from its end: the latest sequence of the tenant with the most running at the worst
        priority. With one tenant this is (priority, arrival) order."""
        running = self.running
        running.sort(key=_by_priority_and_arrival)
        if len({request.tenant for request in running}) <= 1:
            return
        turns: dict[tuple, int] = {}
        keys = []
        for request in running:
            group = (request.priority, request.tenant)
            turn = turns.get(group, 0)
            turns[group] = turn + 1
            keys.append((request.priority, turn, request.arrival_time))
        running[:] = [running[i] for i in sorted(range(len(running)), key=keys.__getitem__)]

    def _record_kv_usage(self) -> None:
        manager = self.kv_cache_manager
        num_blocks = sum(len(manager.req_to_blocks.get(r.request_id, ())) for r in self.running)
        if num_blocks > self.peak_kv_blocks:
            live = sum(r.num_computed_tokens for r in self.running)
            self.peak_kv_blocks = num_blocks
            self.peak_kv_token_utilization = live / (num_blocks * manager.block_size)

