"""The step contract: what the scheduler tells the model runner(s) about one step (vLLM v1's shape).

Plain, picklable data, the same for the local runner and every tensor-parallel rank. The runner
keeps its own state per request id (engine/worker/request_states.py); a step sends a request's
prompt, parameters and blocks once, when it is new to the runner (first admission, or again after
a preemption), and afterwards only what changed: its new blocks and its progress.

Every field is absolute, never a delta to apply once: a step can be run again in parts after a
fault (engine/step_isolation.py), and running it twice must leave the runner where running it once
does.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.lora.request import LoRARequest
from engine.sampling_params import SamplingParams


@dataclass(slots=True)
class NewRequestData:
    """Everything a runner needs for a request it does not hold."""

    req_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]  # tokens sampled before a preemption: they are recomputed too
    sampling_params: SamplingParams
    index: int  # which of the `n` sequences: a seeded one draws from seed + index
    block_ids: tuple[list[int], ...]  # one list per KV cache group (engine/core/kv_cache_groups.py)
    num_computed_tokens: int  # served by the prefix cache: this step computes from here
    lora_request: LoRARequest | None = None  # its adapter (the runner puts it in a slot), None: the base


@dataclass(slots=True)
class CachedRequestData:
    """A request the runner already holds: its blocks from `first_new_block` on in each KV cache group
    (every group lists as many), and its progress."""

    req_id: str
    first_new_block: int
    new_block_ids: tuple[list[int], ...]
    num_computed_tokens: int


@dataclass
class SchedulerOutput:
    step_id: int = 0
    new_requests: list[NewRequestData] = field(default_factory=list)
    cached_requests: list[CachedRequestData] = field(default_factory=list)
    # Batch order: request id -> tokens it computes this step.
    num_scheduled_tokens: dict[str, int] = field(default_factory=dict)
    # Requests whose last scheduled token is their last known one: the runner samples their next token.
    sampling_req_ids: set[str] = field(default_factory=set)
    # Those of them whose token must follow a grammar: rank 0 samples them once the engine has filled
    # their token bitmask (from the matchers, after the step before is updated).
    structured_output_req_ids: set[str] = field(default_factory=set)
    # Speculative decoding: request id -> the tokens proposed after its last known one. Its scheduled
    # tokens are that last token and these; the runner samples after each and keeps the longest prefix
    # of proposals the samples confirm, plus the sample after it.
    scheduled_spec_decode_tokens: dict[str, list[int]] = field(default_factory=dict)
    # Draft-model speculation: request id -> how many tokens the draft proposes after the token this
    # step samples for it (ModelRunnerOutput.draft_token_ids); the slots they need are allocated.
    num_draft_tokens_to_propose: dict[str, int] = field(default_factory=dict)
    # The runner forgets these before the step: finished or aborted (sampler state too), or preempted
    # (they come back as new requests; a seeded one keeps its generator).
    finished_req_ids: set[str] = field(default_factory=set)
    preempted_req_ids: list[str] = field(default_factory=list)

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens

    def subset(self, req_ids) -> "SchedulerOutput":
        """The same step restricted to `req_ids` (in batch order). Forgetting is kept, except of ids
        this step brings back as new requests (a finished id reused, a preempted request resumed):
        a part run after the whole must not forget what the whole added."""
        keep = set(req_ids)
        renewed = {data.req_id for data in self.new_requests}
        return SchedulerOutput(
            step_id=self.step_id,
            new_requests=[data for data in self.new_requests if data.req_id in keep],
            cached_requests=[data for data in self.cached_requests if data.req_id in keep],
            num_scheduled_tokens={k: v for k, v in self.num_scheduled_tokens.items() if k in keep},
            sampling_req_ids=self.sampling_req_ids & keep,
            structured_output_req_ids=self.structured_output_req_ids & keep,
            scheduled_spec_decode_tokens={k: v for k, v in self.scheduled_spec_decode_tokens.items() if k in keep},
            num_draft_tokens_to_propose={k: v for k, v in self.num_draft_tokens_to_propose.items() if k in keep},
            finished_req_ids=self.finished_req_ids - renewed,
            preempted_req_ids=[r for r in self.preempted_req_ids if r not in renewed])
