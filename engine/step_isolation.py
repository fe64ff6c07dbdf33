"""One request whose step raises must fail alone, not with the whole batch (issue 15, finding 1).

When running a step's batch raises, nothing of it has been applied: the scheduler has planned it
(and counts its tokens as computed), `update()` has not taken in any token, the runner's request
states are set from the step contract idempotently, and a step computes the same tokens into the
same KV slots whatever else is in the batch. So the batch can be run again in parts. We run the requests that
have already produced tokens (they went through the sampler before) apart from the new ones,
then halve every part that still fails, keeping the outputs of the parts that succeed, until each
failing part is a single request: the culprits. The parts run in batch order, so a request that
shares a prompt block another computes in this step still runs after it. Attempts are bounded;
what is left when they run out fails as a whole.

The retries draw each request's sampling randomness once (in the part that succeeds) as long as
the fault comes before sampling, so a seeded request's tokens are the same as without the fault.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine.core.kv_cache_manager import KVCacheManager
from engine.core.scheduler_output import SchedulerOutput
from engine.errors import EngineDeadError
from engine.request import Request

logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 64  # runs of parts of one failed step; ~2 log2(batch) per culprit


def execute_isolating_faults(execute: Callable, scheduler_output: SchedulerOutput, requests: dict[str, Request],
                             max_attempts: int = MAX_ATTEMPTS) -> tuple[object, list[tuple[str, Exception]]]:
    """Run `execute(scheduler_output)`; if it raises, find the requests that make it raise.
    `requests` are the scheduler's, by id. Returns the merged output of every request that ran
    and the ids of the culprits with their errors."""
    try:
        return execute(scheduler_output), []
    except EngineDeadError:
        raise
    except Exception as error:
        logger.warning("a step of %d requests failed (%r); looking for the request(s) that caused it",
                       len(scheduler_output.num_scheduled_tokens), error)
    scheduled = [r for r in scheduler_output.num_scheduled_tokens if r in requests]
    proven = [r for r in scheduled if requests[r].num_output_tokens > 0]
    new = [r for r in scheduled if requests[r].num_output_tokens == 0]
    merged, culprits, attempts = None, [], 0
    parts = [part for part in (proven, new) if part]
    if len(parts) == 1:  # all old or all new: halve right away
        parts = _halves(parts[0]) if len(parts[0]) > 1 else parts
    while parts:
        part = parts.pop(0)
        if attempts >= max_attempts:
            error = RuntimeError(f"gave up isolating a failed step after {max_attempts} attempts")
            culprits += [(request_id, error) for request_id in part]
            continue
        attempts += 1
        try:
            output = execute(scheduler_output.subset(part))
        except EngineDeadError:
            raise
        except Exception as error:
            if len(part) == 1:
                culprits.append((part[0], error))
            else:
                parts[:0] = _halves(part)  # depth first, in batch order
            continue
        merged = output if merged is None else _merge(merged, output)
    logger.warning("isolated %d failing request(s) in %d attempts: %s", len(culprits), attempts,
                   ", ".join(f"{request_id} ({error!r})" for request_id, error in culprits))
    if merged is None:  # nothing ran
        from engine.worker.model_runner import ModelRunnerOutput  # torch is loaded by now

        merged = ModelRunnerOutput()
    return merged, culprits


def forget_uncomputed_blocks(kv_cache_manager: KVCacheManager, request: Request, num_computed: int) -> None:
    """A failed request's blocks were registered in the prefix cache when they were allocated,
    before their KV was written: drop those hashes beyond the `num_computed` tokens that earlier
    steps wrote, so no later prompt reuses what may be garbage."""
    kv_cache_manager.forget_uncomputed_blocks(request, num_computed)


def _halves(part: list) -> list[list]:
    middle = len(part) // 2
    return [part[:middle], part[middle:]]


def _merge(into, other):
    into.sampled_token_ids.update(other.sampled_token_ids)
    into.spec_token_ids.update(other.spec_token_ids)
    into.draft_token_ids.update(other.draft_token_ids)
    into.logprobs.update(other.logprobs)
    into.prompt_logprobs.update(other.prompt_logprobs)
    return into
