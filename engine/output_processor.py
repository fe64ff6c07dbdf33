"""Turns sampled tokens into what users see: text deltas, stop strings, logprobs, RequestOutputs.

One `SequenceState` per generated sequence (detokenizer, text, logprobs); one `RequestState` per
user request, which gathers its `n` sequences into a single RequestOutput; the `OutputProcessor`
holds them all and turns each step's tokens into outputs (vLLM v1's output processor).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from engine.outputs import CompletionOutput, Logprob, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampling_params import RequestOutputKind, SamplingParams
from engine.tokenization import IncrementalDetokenizer, token_text


class SequenceState:
    def __init__(self, request: Request, tokenizer) -> None:
        self.request = request
        params = request.sampling_params
        self.params = params
        self.tokenizer = tokenizer
        self.detokenizer = IncrementalDetokenizer(
            tokenizer, request.prompt_token_ids, params.skip_special_tokens,
            params.spaces_between_special_tokens) if params.detokenize else None
        self.max_stop_len = max((len(s) for s in params.stop), default=0)
        self.text = ""
        self.token_ids: list[int] = []
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob: float | None = 0.0 if params.logprobs is not None else None
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.sent_text = self.sent_tokens = 0  # for DELTA outputs

    def append(self, token_id: int, logprobs: list[tuple[int, float, int]] | None, finished: bool) -> bool:
        """Add one sampled token; returns True if a stop string ended the sequence here."""
        self.token_ids.append(token_id)
        if logprobs is not None and self.logprobs is not None:
            self.logprobs.append(to_logprob_dict(logprobs, self.tokenizer if self.params.detokenize else None))
            self.cumulative_logprob += logprobs[0][1]
        if self.detokenizer is None:
            return False
        previous_len = len(self.text)
        self.text += self.detokenizer.step([token_id], final=finished)
        if self.max_stop_len and self.request.num_output_tokens >= self.params.min_tokens:
            return self._truncate_at_stop_string(previous_len)
        return False

    def finish(self, status: RequestStatus) -> None:
        self.finish_reason = RequestStatus.finish_reason(status)
        if self.stop_reason is None:
            self.stop_reason = self.request.stop_reason

    def _truncate_at_stop_string(self, previous_len: int) -> bool:
        search_from = max(0, previous_len - self.max_stop_len + 1)
        hits = [(self.text.find(stop, search_from), stop) for stop in self.params.stop]
        hits = [(index, stop) for index, stop in hits if index >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[:index + (len(stop) if self.params.include_stop_str_in_output else 0)]
        self.stop_reason = stop
        return True

    def completion(self, index: int, kind: RequestOutputKind) -> CompletionOutput | None:
        finished = self.finish_reason is not None
        # While streaming, hold back text that could still turn out to be the start of a stop string.
        visible = len(self.text) if finished else max(0, len(self.text) - max(self.max_stop_len - 1, 0))
        if kind == RequestOutputKind.DELTA:
            if not finished and visible == self.sent_text and len(self.token_ids) == self.sent_tokens:
                return None
            text, tokens = self.text[self.sent_text:visible], self.token_ids[self.sent_tokens:]
            logprobs = self.logprobs[self.sent_tokens:] if self.logprobs is not None else None
            self.sent_text, self.sent_tokens = visible, len(self.token_ids)
        else:
            text, tokens, logprobs = self.text[:visible], list(self.token_ids), self.logprobs
        return CompletionOutput(index=index, text=text, token_ids=tokens, cumulative_logprob=self.cumulative_logprob,
                                logprobs=logprobs, finish_reason=self.finish_reason, stop_reason=self.stop_reason)


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 params: SamplingParams, sequences: list[SequenceState]) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.sequences = sequences
        self.num_unfinished = len(sequences)  # counted down by finish_sequence(): read every step
        # time.monotonic() of arrival, first sampled token and end: RequestOutput.metrics (vLLM's
        # RequestMetrics), read once at the end, e.g. by the offline benchmark for TTFT and TPOT.
        self.arrival_time = sequences[0].request.arrival_time if sequences else time.monotonic()
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.prompt_logprobs = [None] if params.prompt_logprobs is not None else None
        self.stream_offset = 0  # its turn under a staggered stream interval (OutputProcessor.add)

    def finish_sequence(self, sequence: SequenceState, status: RequestStatus) -> None:
        sequence.finish(status)
        self.num_unfinished -= 1

    @property
    def finished(self) -> bool:
        return self.num_unfinished == 0

    def add_prompt_logprobs(self, first_position: int, entries, tokenizer) -> None:
        """Positions already recorded are skipped: a sibling's, or a recompute after preemption,
        whose chunks may end elsewhere than the first time (so a chunk may be partly new)."""
        known = len(self.prompt_logprobs) - first_position if self.prompt_logprobs is not None else -1
        if known >= 0:
            self.prompt_logprobs.extend(to_logprob_dict(e, tokenizer) for e in entries[known:])

    def stream_due(self, interval: int, stagger: bool = False) -> bool:
        """Whether a streamed output is due with `stream_interval` = interval: the first token at once
        (time to first token), then every `interval` tokens, and the end. `stagger` shifts each
        request's turn by its arrival order, so requests that advance in lockstep (a burst) do not
        all stream in the same step while the next has nothing to send."""
        if self.num_unfinished == 0:
            return True
        num_tokens = max(len(seq.token_ids) for seq in self.sequences)
        offset = self.stream_offset if stagger else 0
        return num_tokens == 1 or (num_tokens + offset) % interval == 0

    def make_output(self) -> RequestOutput | None:
        kind = self.params.output_kind
        finished = self.finished
        if kind == RequestOutputKind.FINAL_ONLY and not finished:
            return None
        outputs = []
        for index, sequence in enumerate(self.sequences):
            output = sequence.completion(index, kind)
            if output is not None:
                outputs.append(output)
        if not outputs and not finished:
            return None
        metrics = {"arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
                   "finished_time": self.finished_time,
                   "scheduled_time": min((s.request.first_scheduled_time for s in self.sequences
                                          if s.request.first_scheduled_time is not None), default=None),
                   } if finished else {}
        return RequestOutput(
            request_id=self.request_id, prompt=self.prompt, prompt_token_ids=self.prompt_token_ids,
            outputs=outputs, finished=finished, prompt_logprobs=self.prompt_logprobs,
            num_cached_tokens=self.sequences[0].request.num_cached_tokens, metrics=metrics)


@dataclass
class ProcessedOutputs:
    outputs: list[RequestOutput] = field(default_factory=list)
    stopped_req_ids: list[str] = field(default_factory=list)  # ended by a stop string: the scheduler finishes them


class OutputProcessor:
    """Every unfinished user request, by its id and by the id of each of its sequences."""

    def __init__(self, tokenizer, stream_interval: int) -> None:
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        # Set by a server that coalesces streamed tokens under load (engine/service/stream_pacing.py):
        # requests then take turns rather than streaming together (RequestState.stream_due).
        self.stagger = False
        self._num_added = 0
        self.requests: dict[str, RequestState] = {}
        self.sequences: dict[str, tuple[RequestState, SequenceState]] = {}

    def add(self, state: RequestState) -> None:
        state.stream_offset = self._num_added
        self._num_added += 1
        self.requests[state.request_id] = state
        for sequence in state.sequences:
            self.sequences[sequence.request.request_id] = (state, sequence)

    def drop(self, request_id: str) -> RequestState | None:
        """Forget a request (aborted): no more outputs."""
        state = self.requests.pop(request_id, None)
        if state is not None:
            for sequence in state.sequences:
                self.sequences.pop(sequence.request.request_id, None)
        return state

    @staticmethod
    def _append_speculated(sequence: SequenceState, finished: bool) -> bool:
        """A speculating step's tokens, as the scheduler appended them (it cut them at a stop token or
        max_tokens): the request's outputs beyond what this sequence has."""
        return _append_tokens(sequence, sequence.request.output_token_ids[len(sequence.token_ids):], finished)

    def process(self, scheduled_ids, runner_output, finished_ids: set[str]) -> ProcessedOutputs:
        """One step's tokens (and prompt logprobs) for the sequences in `scheduled_ids`, of which
        `finished_ids` the scheduler has finished."""
        result, touched, now = ProcessedOutputs(), {}, time.monotonic()
        for sequence_id in scheduled_ids:
            state, sequence = self.sequences.get(sequence_id, (None, None))
            if state is None:
                continue
            if sequence_id in runner_output.prompt_logprobs:
                state.add_prompt_logprobs(*runner_output.prompt_logprobs[sequence_id],
                                         self.tokenizer if state.params.detokenize else None)
            token_id = runner_output.sampled_token_ids.get(sequence_id)
            is_finished = sequence_id in finished_ids
            if token_id is None and not is_finished:
                continue  # a prefill chunk
            touched[state.request_id] = state
            if state.first_token_time is None and token_id is not None:
                state.first_token_time = now
            if sequence_id in runner_output.spec_token_ids:  # several tokens: those the scheduler kept
                stopped = self._append_speculated(sequence, is_finished)
            else:
                stopped = token_id is not None and sequence.append(
                    token_id, runner_output.logprobs.get(sequence_id), is_finished)
            if stopped and not is_finished:
                result.stopped_req_ids.append(sequence_id)
            if is_finished or stopped:  # a stop string wins over a length cap reached on the same token
                state.finish_sequence(sequence, RequestStatus.FINISHED_STOPPED if stopped else sequence.request.status)
                self.sequences.pop(sequence_id, None)
        interval = self.stream_interval
        for state in touched.values():
            if interval > 1 and not state.stream_due(interval, self.stagger):
                continue  # its tokens wait for the next output (DELTA outputs carry all since the last)
            if state.num_unfinished == 0:
                state.finished_time = now
            output = state.make_output()
            if output is not None:
                result.outputs.append(output)
            if state.finished:
                self.requests.pop(state.request_id, None)
        return result


def _append_tokens(sequence: SequenceState, tokens: list[int], finished: bool) -> bool:
    for j, token_id in enumerate(tokens):
        if sequence.append(token_id, None, finished and j == len(tokens) - 1):
            return True  # a stop string: the tokens after it are not the user's
    return False


def to_logprob_dict(entries: list[tuple[int, float, int]], tokenizer) -> dict[int, Logprob]:
    result = {}
    for token_id, logprob, rank in entries:
        if token_id not in result:
            decoded = token_text(tokenizer, token_id) if tokenizer is not None else None
            result[token_id] = Logprob(logprob=logprob, rank=rank, decoded_token=decoded)
    return result
