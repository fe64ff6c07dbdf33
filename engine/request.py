"""A request as the scheduler sees it: tokens, progress and status."""

from __future__ import annotations

import enum
import time

from engine.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered like vLLM's: every status after PREEMPTED is a finished one."""

    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED_STOPPED = enum.auto()
    FINISHED_LENGTH_CAPPED = enum.auto()
    FINISHED_ABORTED = enum.auto()

    @staticmethod
    def is_finished(status: "RequestStatus") -> bool:
        return status > RequestStatus.PREEMPTED

    @staticmethod
    def finish_reason(status: "RequestStatus") -> str | None:
        return _FINISH_REASONS.get(status)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH_CAPPED: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


class Request:
    """One sequence. `n > 1` becomes n Requests that share a `parent_id`.

    There is no prefill phase: `num_computed_tokens` counts the tokens whose KV is in the cache
    once the steps scheduled so far have run, and each step computes some of the rest (all tokens
    are "prompt" again after a preemption).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        *,
        priority: int = 0,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        parent_id: str | None = None,
        index: int = 0,
        tenant: str | None = None,
        lora_request=None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.cache_salt = cache_salt
        self.parent_id = parent_id
        self.index = index
        self.tenant = tenant  # who asked: the scheduler shares admissions fairly between tenants
        self.lora_request = lora_request  # engine.lora.request.LoRARequest, or None for the base model
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.num_computed_tokens = 0  # advanced when a step is scheduled (its KV is written by then)
        # Tokens that steps in flight will sample (async scheduling): scheduled on, not yet known.
        self.num_output_placeholders = 0
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.first_scheduled_time: float | None = None  # time.monotonic() of its first admission (queue time)
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # Prompt logprobs need logits at every prompt position, so these skip cache hits.
        self.skip_prefix_cache = sampling_params.prompt_logprobs is not None
        self.block_hashes: list[int] = []
        # Its structured-output matcher (engine/structured_outputs/manager.py), if it has a grammar:
        # it is admitted once the matcher is built, and every sampled token advances it.
        self.grammar = None
        self.spec_token_ids: list[int] = []  # proposals scheduled after its last token (speculative decoding)
        self.draft_token_ids: list[int] = []  # a draft model's proposals after its last token, for the next step
        self.spec_length: int | None = None  # n-gram: proposals its next step may carry (adaptive_length.py)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return len(self.all_token_ids) + self.num_output_placeholders

    @property
    def lora_int_id(self) -> int:
        """Its adapter's id, 0 for the base model."""
        return 0 if self.lora_request is None else self.lora_request.lora_int_id

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_prefill_only(self) -> bool:
        """A scoring request (max_tokens=0): done once its prompt is computed; nothing is sampled."""
        return self.sampling_params.max_tokens == 0

    @property
    def sort_key(self) -> tuple[int, float]:
        """Lower runs first (within a tenant; between tenants the scheduler takes turns)."""
        return (self.priority, self.arrival_time)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def is_finished(self) -> bool:
        return RequestStatus.is_finished(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.name}, computed={self.num_computed_tokens}/"
                f"{self.num_tokens})")


def child_request_id(parent_id: str, index: int) -> str:
    """The id of child `index` of an `n > 1` request."""
    return f"{parent_id}#{index}"
