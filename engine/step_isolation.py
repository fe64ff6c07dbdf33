"""One request whose step raises must fail alone, not with the whole batch (issue 15, finding 1).

When running a step's batch raises, the scheduler has planned the step but applied nothing yet:
`update()` alone advances progress, and a step computes the same tokens into the same KV slots
whatever else is in the batch. So the batch can be run again in parts. We run the requests that
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
from engine.core.scheduler import SchedulerOutput
from engine.errors import EngineDeadError
from engine.request import Request

logger = logging.getLogger(__name__)
MAX_ATTEMPTS = 64  # runs of parts of one failed step; ~2 log2(batch) per culprit


def execute_isolating_faults(execute: Callable, scheduler_output: SchedulerOutput,
                             max_attempts: int = MAX_ATTEMPTS) -> tuple[object, list[tuple[Request, Exception]]]:
    """Run `execute(scheduler_output)`; if it raises, find the requests that make it raise.
    Returns the merged output of every request that ran and the culprits with their errors."""
    try:
        return execute(scheduler_output), []
    except EngineDeadError:
        raise
    except Exception as error:
        logger.warning("a step of %d requests failed (%r); looking for the request(s) that caused it",
                       len(scheduler_output.scheduled), error)
    scheduled = scheduler_output.scheduled
    proven = [item for item in scheduled if item[0].num_output_tokens > 0]
    new = [item for item in scheduled if item[0].num_output_tokens == 0]
    merged, culprits, attempts = None, [], 0
    parts = [part for part in (proven, new) if part]
    if len(parts) == 1:  # all old or all new: halve right away
        parts = _halves(parts[0]) if len(parts[0]) > 1 else parts
    while parts:
        part = parts.pop(0)
        if attempts >= max_attempts:
            error = RuntimeError(f"gave up isolating a failed step after {max_attempts} attempts")
            culprits += [(request, error) for request, _ in part]
            continue
        attempts += 1
        try:
            output = execute(_subset(scheduler_output, part))
        except EngineDeadError:
            raise
        except Exception as error:
            if len(part) == 1:
                culprits.append((part[0][0], error))
            else:
                parts[:0] = _halves(part)  # depth first, in batch order
            continue
        merged = output if merged is None else _merge(merged, output)
    logger.warning("isolated %d failing request(s) in %d attempts: %s", len(culprits), attempts,
                   ", ".join(f"{request.request_id} ({error!r})" for request, error in culprits))
    if merged is None:  # nothing ran
        from engine.worker.model_runner import ModelRunnerOutput  # torch is loaded by now

        merged = ModelRunnerOutput()
    return merged, culprits


def forget_uncomputed_blocks(kv_cache_manager: KVCacheManager, request: Request) -> None:
    """A failed request's blocks were registered in the prefix cache when they were allocated,
    before their KV was written: drop those hashes, so no later prompt reuses what may be garbage."""
    blocks = kv_cache_manager.req_to_blocks.get(request.request_id, [])
    first_uncomputed = request.num_computed_tokens // kv_cache_manager.block_size
    for block in blocks[first_uncomputed:]:
        kv_cache_manager.block_pool._evict(block)  # noqa: SLF001 (the pool's one way to uncache a block)


def _halves(part: list) -> list[list]:
    middle = len(part) // 2
    return [part[:middle], part[middle:]]


def _subset(scheduler_output: SchedulerOutput, part: list) -> SchedulerOutput:
    ids = {request.request_id for request, _ in part}
    return SchedulerOutput(scheduled=list(part),
                           block_ids={k: v for k, v in scheduler_output.block_ids.items() if k in ids})


def _merge(into, other):
    into.sampled_token_ids.update(other.sampled_token_ids)
    into.logprobs.update(other.logprobs)
    into.prompt_logprobs.update(other.prompt_logprobs)
    return into
