"""Runs one API call's engine requests (one per prompt) and merges their deltas into one stream.

The call's choices are numbered as OpenAI numbers them: prompt `p`'s completion `i` is choice
`p * n + i`. Leaving the iteration early (client gone) aborts every engine request still running.
`usages` gets each prompt's usage as it goes, also from an error delta and from the replica's answer
to an abort, so a call that fails or is left early is billed for the work the engine did.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from engine.service.client import EngineClient
from engine.service.protocol import EngineRequest, OutputDelta, Usage
from inference.stream_text import StreamText


@dataclass
class GenerationPlan:
    request_id: str
    model: str  # as the call named it (a base model or a LoRA adapter): responses and usage carry it
    tenant: str
    prompts: list[list[int]]  # token ids, one list per prompt
    params: dict  # SamplingParams fields
    priority: int = 0
    prompt_texts: list[str] = field(default_factory=list)  # for `echo`
    trace_context: dict = field(default_factory=dict)  # W3C trace headers of the call's span (engine/tracing.py)
    base_model: str = ""  # whose replicas run it; "" : `model` itself
    lora_name: str | None = None  # the LoRA adapter those replicas apply (inference/model_targets.py)
    # Set when this process makes the streams' text from their token ids (inference/stream_text.py).
    web_tokenizer: Tokenizer | None = None

    @property
    def n(self) -> int:
        return self.params.get("n", 1)

    def engine_requests(self) -> list[EngineRequest]:
        return [EngineRequest(request_id=f"{self.request_id}-{index}", model=self.base_model or self.model,
                              tenant=self.tenant, prompt_token_ids=prompt, params=self.params, priority=self.priority,
                              trace_context=self.trace_context, lora_name=self.lora_name)
                for index, prompt in enumerate(self.prompts)]


class EngineFailed(RuntimeError):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


async def generate(client: EngineClient, plan: GenerationPlan,
                   usages: dict[int, Usage] | None = None) -> AsyncIterator[tuple[int, OutputDelta]]:
    """(prompt index, delta) pairs as they arrive; raises EngineFailed on an engine error delta."""
    streams, usages = [], {} if usages is None else usages
    try:
        for request in plan.engine_requests():
            streams.append(await client.submit(request))
        texts = [StreamText(plan.web_tokenizer, prompt, plan.params.get("skip_special_tokens", True))
                 for prompt in plan.prompts] if plan.web_tokenizer is not None else None
        async for item in _merged(streams, usages, texts):
            yield item
    finally:  # a stream never iterated (a later submit failed, say) is aborted here
        for index, stream in enumerate(streams):
            await stream.aclose()
            if stream.abort_usage is not None:
                _record(usages, index, stream.abort_usage)


def _record(usages: dict[int, Usage], index: int, usage: Usage) -> None:
    """Usage only grows: an abort's answer never undoes tokens already reported."""
    old = usages.get(index, Usage())
    usages[index] = Usage(max(old.prompt_tokens, usage.prompt_tokens),
                          max(old.completion_tokens, usage.completion_tokens),
                          max(old.cached_tokens, usage.cached_tokens))


async def _merged(streams, usages: dict[int, Usage],
                  texts: list[StreamText] | None) -> AsyncIterator[tuple[int, OutputDelta]]:
    if len(streams) == 1:
        async for delta in _checked(streams[0], 0, usages, texts and texts[0]):
            yield 0, delta
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream) -> None:
        try:
            async for delta in _checked(stream, index, usages, texts and texts[index]):
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


async def _checked(stream, index: int, usages: dict[int, Usage], text: StreamText | None) -> AsyncIterator[OutputDelta]:
    try:
        async for delta in stream:
            _record(usages, index, delta.usage)
            if delta.error:
                raise EngineFailed(delta.error.get("code", "engine_error"), delta.error.get("message", ""))
            if text is not None:
                text.fill(delta)
            yield delta
    finally:
        await stream.aclose()


def total_usage(usages: dict[int, Usage]) -> Usage:
    return Usage(sum(u.prompt_tokens for u in usages.values()), sum(u.completion_tokens for u in usages.values()),
                 sum(u.cached_tokens for u in usages.values()))
