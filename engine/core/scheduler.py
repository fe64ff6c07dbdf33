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

The output is the step contract (scheduler_output.py). Progress advances when a step is planned,
so with async scheduling the next step can be planned while this one runs: a request that samples
holds a placeholder for its unknown token, which the next step computes from the device.
"""

from __future__ import annotations

import logging
import time
from contextlib import closing
from dataclasses import dataclass
from operator import attrgetter

from engine.config import SchedulerConfig
from engine.core.kv_cache_manager import KVCacheManager
from engine.core.lora_admission import LoRAAdmission
from engine.core.scheduler_output import CachedRequestData, NewRequestData, SchedulerOutput
from engine.core.waiting_queue import WaitingQueue
from engine.request import Request, RequestStatus, child_request_id
from engine.spec_decode.adaptive_length import next_speculation_length
from engine.spec_decode.config import SpeculativeConfig
from engine.spec_decode.ngram import propose_ngram

logger = logging.getLogger(__name__)

_by_priority_and_arrival = attrgetter("priority", "arrival_time")  # Request.sort_key, faster


@dataclass
class ScheduledRequest:
    """The scheduler's own record of a request in a step that has not been updated yet."""

    request: Request
    num_new: int
    samples: bool
    end: int  # num_computed_tokens once the step has run
    num_drafts: int = 0  # speculative proposals among num_new


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager,
                 speculative_config: SpeculativeConfig | None = None, max_loras: int | None = None) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.speculative_config = speculative_config
        self.num_draft_tokens = self.num_accepted_tokens = self.num_spec_steps = 0  # acceptance counters
        self.waiting = WaitingQueue()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0
        self.peak_kv_blocks = 0  # most blocks held by running requests at the end of any step
        self.peak_kv_token_utilization = 1.0  # live tokens / allocated slots at that peak
        self.peak_num_running = 0  # most requests running at the end of any step
        self._next_step_id = 0
        self._in_flight: dict[int, list[ScheduledRequest]] = {}  # step id -> its requests, until update()
        # Blocks the runner holds for each running request (as many in every KV cache group).
        self._num_blocks_sent: dict[str, int] = {}
        self._no_blocks = tuple(() for _ in kv_cache_manager.groups)  # shared: nobody appends to it
        self._finished_ids: set[str] = set()  # since the last step: the runner forgets them
        self._preempted_ids: list[str] = []
        # Unfinished requests whose sampling reads their whole history on the host (penalties): the
        # engine plans no step ahead of their last token (no async scheduling while there are any).
        self.num_requests_reading_history = 0
        # With LoRA: at most max_loras distinct adapters among the running requests (the device slots).
        self.lora_admission = LoRAAdmission(max_loras) if max_loras else None

    # -- queue management ---------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        self.requests[request.request_id] = request
        self.waiting.add(request)
        self.num_requests_reading_history += request.sampling_params.needs_penalties

    def finish_requests(self, request_ids, status: RequestStatus) -> list[Request]:
        """Abort or stop requests wherever they are; their blocks return to the pool now."""
        finished = []
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self.requests.get(request_id)
            if request is None or request.is_finished():
                continue
            self._take_out(request)
            self._finish(request, status)
            finished.append(request)
        return finished

    def num_waiting_for_grammar(self) -> int:
        """Waiting requests that cannot be admitted yet: their grammar is still being built."""
        return sum(r.grammar is not None and not r.grammar.is_ready() for r in self.waiting)

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -----------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Plan one step and advance the progress of every request in it (vLLM v1): the next
        schedule() may run before this step's tokens are known (async scheduling), and must not
        plan the same tokens again."""
        scheduled: list[tuple[Request, int]] = []
        preempted: list[Request] = []
        budget = self.config.max_num_batched_tokens
        self._order_running()

        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._num_tokens_to_schedule(request, budget)
            if num_new <= 0:  # waiting for a step in flight (its last token, or its end)
                index += 1
                continue
            request.spec_token_ids = self._propose(request, budget) if num_new == 1 else []
            num_new += len(request.spec_token_ids)
            lookahead = self._num_lookahead_tokens(request.num_computed_tokens + num_new)
            while self.kv_cache_manager.allocate_slots(request, num_new, None, lookahead) is None:
                victim = self.running.pop()  # see _order_running
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append((request, num_new))
                budget -= num_new
                index += 1
                continue
            break
        num_running_scheduled = len(scheduled)
        if not preempted:
            self._admit_waiting(scheduled, budget)
        return self._make_output(scheduled, num_running_scheduled, preempted)

    def _make_output(self, scheduled: list[tuple[Request, int]], num_running_scheduled: int,
                     preempted: list[Request]) -> SchedulerOutput:
        self._preempted_ids += [r.request_id for r in preempted]
        output = SchedulerOutput(step_id=self._next_step_id)
        self._next_step_id += 1
        if scheduled:  # an empty step never reaches the runner: what it should forget waits for the next
            output.finished_req_ids, output.preempted_req_ids = self._finished_ids, self._preempted_ids
            self._finished_ids, self._preempted_ids = set(), []
        records = []
        manager = self.kv_cache_manager
        for position, (request, num_new) in enumerate(scheduled):
            request_id = request.request_id
            if position < num_running_scheduled:
                sent = self._num_blocks_sent[request_id]
                held = manager.num_blocks(request_id)
                # Most steps add no block to a running request: skip the slices of its block lists.
                new_block_ids = manager.get_block_ids(request_id, sent) if held > sent else self._no_blocks
                output.cached_requests.append(CachedRequestData(request_id, sent, new_block_ids,
                                                                request.num_computed_tokens))
            else:
                new_block_ids = manager.get_block_ids(request_id)
                held = len(new_block_ids[0])
                output.new_requests.append(NewRequestData(
                    request_id, request.prompt_token_ids, list(request.output_token_ids), request.sampling_params,
                    request.index, new_block_ids, request.num_computed_tokens, request.lora_request))
            self._num_blocks_sent[request_id] = held
            output.num_scheduled_tokens[request_id] = num_new
            request.num_computed_tokens += num_new
            drafts = request.spec_token_ids if position < num_running_scheduled else []
            if drafts:
                output.scheduled_spec_decode_tokens[request_id] = drafts
            samples = (request.num_computed_tokens - len(drafts) == request.num_tokens_with_placeholders
                       and not request.is_prefill_only)
            if samples:
                num_to_propose = self._num_draft_tokens_to_propose(request)
                if num_to_propose:
                    output.num_draft_tokens_to_propose[request_id] = num_to_propose
                request.num_output_placeholders += 1
                output.sampling_req_ids.add(request_id)
                if request.grammar is not None:
                    output.structured_output_req_ids.add(request_id)
            records.append(ScheduledRequest(request, num_new, samples, request.num_computed_tokens, len(drafts)))
        if records:
            self._in_flight[output.step_id] = records
        return output

    def _admit_waiting(self, scheduled: list[tuple[Request, int]], budget: int) -> None:
        lora = self.lora_admission
        if lora is not None:
            lora.begin_pass(self.running, self.waiting, self._next_step_id)
        with closing(self.waiting.in_admission_order()) as candidates:
            for request in candidates:
                if budget <= 0 or len(self.running) >= self.config.max_num_seqs:
                    break
                if request.num_output_placeholders:  # preempted while a step in flight samples for it
                    continue
                if request.grammar is not None and not request.grammar.is_ready():
                    continue  # its grammar is still compiling (in the background): the queue moves on
                if lora is not None and not lora.allows(request, self._next_step_id):
                    continue  # every adapter slot is taken by other adapters (see lora_admission.py)
                sibling = self._sibling_with_prompt(request)
                if sibling is False:  # an earlier sibling is still computing the shared prompt
                    continue
                computed_blocks, num_computed = self.kv_cache_manager.get_computed_blocks(request, sibling)
                remaining = request.num_tokens - request.num_computed_tokens - num_computed
                num_others = len(self.waiting) - 1 + len(self.running)
                num_new = min(remaining, budget, self._prefill_chunk_limit(num_others))
                lookahead = self._num_lookahead_tokens(request.num_computed_tokens + num_computed + num_new)
                if self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks, lookahead) is None:
                    break  # the pool is full; keep the fair order rather than skipping ahead
                self.waiting.admit(request)
                if lora is not None:
                    lora.admitted(request)
                request.num_computed_tokens += num_computed
                if request.num_preemptions == 0:
                    request.num_cached_tokens = num_computed
                request.status = RequestStatus.RUNNING
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = time.monotonic()
                self.running.append(request)
                scheduled.append((request, num_new))
                budget -= num_new

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, int],
               spec_token_ids: dict[str, list[int]] | None = None,
               draft_token_ids: dict[str, list[int]] | None = None) -> list[Request]:
        """Take in a step's sampled tokens (one per request that samples, several when it speculated)
        and a draft model's proposals for the next step; return finished requests. A request may have
        finished since (aborted, or stopped by an earlier step's token): its token is dropped."""
        finished = []
        for record in self._in_flight.pop(output.step_id, ()):
            request = record.request
            if draft_token_ids is not None:
                request.draft_token_ids = draft_token_ids.get(request.request_id, [])
            if record.samples:
                request.num_output_placeholders -= 1
            if request.is_finished():
                continue
            token_id = sampled_token_ids.get(request.request_id)
            if token_id is not None and record.num_drafts:
                status = self._take_speculated(request, record, spec_token_ids[request.request_id])
            elif token_id is not None:
                request.append_output_token(token_id)
                status = self._check_stop(request, token_id)
                if request.grammar is not None and status is None:
                    status = self._advance_grammar(request, token_id)
            elif request.is_prefill_only and record.end == request.num_tokens:
                status = RequestStatus.FINISHED_LENGTH_CAPPED  # max_tokens=0: the prompt is scored
            else:
                continue  # a partial prefill chunk, or a step that failed for this request
            if status is not None:
                self._take_out(request)
                self._finish(request, status)
                finished.append(request)
        self._record_kv_usage()
        return finished

    def _propose(self, request: Request, budget: int) -> list[int]:
        """Speculative proposals for a decoding request, within its limits and the step's budget:
        the n-gram lookup's, or what the draft model proposed after the last step."""
        spec, params = self.speculative_config, request.sampling_params
        drafts, request.draft_token_ids = request.draft_token_ids, []
        if spec is None or not self._may_speculate(request, request.num_output_tokens):
            return []
        room = min(spec.num_speculative_tokens, budget - 1,
                   self.config.max_model_len - request.num_tokens - 1)
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - request.num_output_tokens - 1)
        if room <= 0:
            return []
        if spec.uses_draft_model:
            return drafts[:room]
        if request.spec_length is not None:
            room = min(room, request.spec_length)
        return propose_ngram(request.all_token_ids, room, spec.prompt_lookup_min, spec.prompt_lookup_max)

    @staticmethod
    def _may_speculate(request: Request, num_output_tokens: int) -> bool:
        """Requests whose sampling reads more than the target's distribution per position (penalties,
        grammars, min_tokens still due, logprobs) decode without speculation."""
        params = request.sampling_params
        return not (request.grammar is not None or params.needs_penalties or params.logprobs is not None
                    or num_output_tokens < params.min_tokens or request.num_output_placeholders)

    def _num_lookahead_tokens(self, end: int) -> int:
        """Slots past a step's tokens (ending at position `end`) where a draft model may write the KV
        of its proposals after the step: every step reserves them, so proposing never allocates."""
        spec = self.speculative_config
        if spec is None or not spec.uses_draft_model:
            return 0
        return max(0, min(spec.num_speculative_tokens, self.config.max_model_len - end))

    def _num_draft_tokens_to_propose(self, request: Request) -> int:
        """How many tokens the draft model proposes after the token this step samples for `request`
        (its progress already counts the step): at most what the next step could verify."""
        spec, params = self.speculative_config, request.sampling_params
        if (spec is None or not spec.uses_draft_model or request.is_prefill_only
                or not self._may_speculate(request, request.num_output_tokens + 1)):
            return 0
        room = min(spec.num_speculative_tokens, self.config.max_model_len - request.num_computed_tokens - 1)
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - request.num_output_tokens - 2)
        return max(room, 0)

    def _take_speculated(self, request: Request, record: ScheduledRequest, tokens: list[int]) -> RequestStatus | None:
        """Append a speculative step's tokens (the confirmed proposals and the sample after them) up to
        a stop, and move its progress back to the last token whose KV is right: the rejected
        proposals' slots are written again by the next steps."""
        self.num_spec_steps += 1
        self.num_draft_tokens += record.num_drafts
        self.num_accepted_tokens += len(tokens) - 1
        if not self.speculative_config.uses_draft_model:
            request.spec_length = next_speculation_length(record.num_drafts, len(tokens) - 1,
                                                          self.speculative_config.num_speculative_tokens)
        request.num_computed_tokens -= record.num_drafts + 1 - len(tokens)
        for token_id in tokens:
            request.append_output_token(token_id)
            status = self._check_stop(request, token_id)
            if status is not None:
                return status
        return None

    def steps_in_flight(self) -> int:
        return len(self._in_flight)

    # -- helpers ------------------------------------------------------------------------------------

    def _num_tokens_to_schedule(self, request: Request, budget: int) -> int:
        if request.num_output_placeholders and self._reaches_a_limit(request):
            return 0  # the token in flight is its last: it finishes when that step is updated
        remaining = request.num_tokens_with_placeholders - request.num_computed_tokens
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

    def _reaches_a_limit(self, request: Request) -> bool:
        max_tokens = request.sampling_params.max_tokens
        num_outputs = request.num_output_tokens + request.num_output_placeholders
        return ((max_tokens is not None and num_outputs >= max_tokens)
                or request.num_tokens_with_placeholders >= self.config.max_model_len)

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

    @staticmethod
    def _advance_grammar(request: Request, token_id: int) -> RequestStatus | None:
        """Feed the token to the request's grammar; it stops once the grammar is complete (no token
        may follow), also under ignore_eos. A refused token cannot come from a masked step; should one
        come, the request stops rather than continuing unconstrained."""
        grammar = request.grammar
        if not grammar.accept(token_id):
            logger.warning("request %s: token %d breaks its grammar (%s); stopping it", request.request_id,
                           token_id, grammar.matcher.get_error())
        return RequestStatus.FINISHED_STOPPED if grammar.is_finished() else None

    def _take_out(self, request: Request) -> None:
        if request.status == RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)

    def _preempt(self, request: Request) -> None:
        request.spec_token_ids = request.draft_token_ids = []
        self.kv_cache_manager.free(request)
        self._num_blocks_sent.pop(request.request_id, None)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.add(request)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        request.status = status
        self.kv_cache_manager.free(request)
        del self.requests[request.request_id]
        self.num_requests_reading_history -= request.sampling_params.needs_penalties
        self._num_blocks_sent.pop(request.request_id, None)
        self._finished_ids.add(request.request_id)  # the runner forgets it (and its sampler state)

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
        self.peak_num_running = max(self.peak_num_running, len(self.running))
        manager = self.kv_cache_manager
        num_blocks = manager.num_listed_blocks(self.running)
        if num_blocks > self.peak_kv_blocks:
            live = sum(r.num_computed_tokens for r in self.running) * len(manager.groups)
            self.peak_kv_blocks = num_blocks
            self.peak_kv_token_utilization = live / (num_blocks * manager.block_size)

