"""The model runner's own view of each request, kept by id from one step contract to the next.

The scheduler sends a request's prompt and parameters once (NewRequestData) and then only its new
blocks and progress (CachedRequestData); every rank of a tensor-parallel group keeps the same
states. Sampled tokens are written here by the runner itself (each rank learns them from rank 0),
so under async scheduling a state may lack the newest token for a step: the runner then feeds that
token from the device.
"""

from __future__ import annotations

from engine.core.scheduler_output import SchedulerOutput
from engine.sampling_params import SamplingParams


class CachedRequestState:
    """What the runner and the sampler read of one request (the names match engine.request.Request)."""

    __slots__ = ("request_id", "prompt_token_ids", "all_token_ids", "output_token_ids", "sampling_params", "index",
                 "block_ids", "num_computed_tokens", "num_output_tokens", "spec_token_ids", "lora_request")

    def __init__(self, request_id: str, prompt_token_ids: list[int], output_token_ids: list[int],
                 sampling_params: SamplingParams, index: int, block_ids: tuple[list[int], ...],
                 num_computed_tokens: int, lora_request=None) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids = list(output_token_ids)
        self.all_token_ids = self.prompt_token_ids + self.output_token_ids
        self.sampling_params = sampling_params
        self.index = index
        self.block_ids = tuple(map(list, block_ids))  # one list per KV cache group
        self.num_computed_tokens = num_computed_tokens  # where this step starts
        self.num_output_tokens = len(output_token_ids)  # sampled before this step's token (placeholders too)
        self.spec_token_ids: list[int] = []  # this step's proposals (speculative decoding), fed after the last token
        self.lora_request = lora_request  # its LoRA adapter, None for the base model

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def is_prefill_only(self) -> bool:
        return self.sampling_params.max_tokens == 0

    def set_sampled(self, position: int, token_id: int) -> None:
        """Record the token at `position`; idempotent, so a step may be run again."""
        del self.all_token_ids[position:]
        del self.output_token_ids[position - len(self.prompt_token_ids):]
        self.all_token_ids.append(token_id)
        self.output_token_ids.append(token_id)


class RequestStates(dict):
    """request id -> CachedRequestState, brought up to date by each step's SchedulerOutput."""

    def apply(self, output: SchedulerOutput) -> list[str]:
        """Forget finished and preempted requests, add new ones, advance the rest; returns the ids
        of finished ones (their sampler state goes too)."""
        for request_id in (*output.finished_req_ids, *output.preempted_req_ids):
            self.pop(request_id, None)
        for data in output.new_requests:
            self[data.req_id] = CachedRequestState(data.req_id, data.prompt_token_ids, data.output_token_ids,
                                                   data.sampling_params, data.index, data.block_ids,
                                                   data.num_computed_tokens, data.lora_request)
        for data in output.cached_requests:
            state = self[data.req_id]
            for blocks, new in zip(state.block_ids, data.new_block_ids):
                blocks[data.first_new_block:] = new
            state.num_computed_tokens = data.num_computed_tokens
        drafts = output.scheduled_spec_decode_tokens
        for request_id, num_new in output.num_scheduled_tokens.items():
            state = self[request_id]
            state.spec_token_ids = drafts.get(request_id, [])
            num_new -= len(state.spec_token_ids)
            state.num_output_tokens = max(0, state.num_computed_tokens + num_new - state.num_prompt_tokens)
        return list(output.finished_req_ids)
