"""Runs one API call's engine requests (one per prompt) and merges their deltas into one stream.

The call's choices are numbered as OpenAI numbers them: prompt `p`'s completion `i` is choice
`p * n + i`. Leaving the iteration early (client gone) aborts every engine request still running.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from engine.service.client import EngineClient
from engine.service.protocol import EngineRequest, OutputDelta, Usage


@dataclass
class GenerationPlan:
    request_id: str
    model: str
    tenant: str
    prompts: list[list[int]]  # token ids, one list per prompt
    params: dict  # SamplingParams fields
    priority: int = 0
    prompt_texts: list[str] = field(default_factory=list)  # for `echo`

    @property
    def n(self) -> int:
        return self.params.get("n", 1)

    def engine_requests(self) -> list[EngineRequest]:
        return [EngineRequest(request_id=f"{self.request_id}-{index}", model=self.model, tenant=self.tenant,
                              prompt_token_ids=prompt, params=self.params, priority=self.priority)
                for index, prompt in enumerate(self.prompts)]


class EngineFailed(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def generate(client: EngineClient, plan: GenerationPlan) -> AsyncIterator[tuple[int, OutputDelta]]:
    """(prompt index, delta) pairs as they arrive; raises EngineFailed on an engine error delta."""
    streams = []
    try:
        for request in plan.engine_requests():
            streams.append(await client.submit(request))
        async for item in _merged(streams):
            yield item
    finally:  # a stream never iterated (a later submit failed, say) is aborted here
        for stream in streams:
            await stream.aclose()


async def _merged(streams) -> AsyncIterator[tuple[int, OutputDelta]]:
    if len(streams) == 1:
        async for delta in _checked(streams[0]):
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for delta in _checked(stream):
                await queue.put((index, delta))
        except EngineFailed as error:
            await queue.put((index, error))
        finally:
            await queue.put((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, EngineFailed):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _checked(stream) -> AsyncIterator[OutputDelta]:
    try:
        async for delta in stream:
            if delta.error:
                raise EngineFailed(delta.error.get("code", "engine_error"), delta.error.get("message", ""))
            yield delta
    finally:
        await stream.aclose()


def total_usage(usages: dict[int, Usage]) -> Usage:
    return Usage(sum(u.prompt_tokens for u in usages.values()), sum(u.completion_tokens for u in usages.values()),
                 sum(u.cached_tokens for u in usages.values()))
