"""EngineClient: how Django and Celery talk to engine replicas (asyncio, no torch).

`stream = await client.submit(request)` queues the request and returns an async iterator of
OutputDeltas; leaving the iteration early aborts the request, so its KV blocks are freed.
Every wait has a deadline, and a request never hangs: if the replica holding it disappears
(no heartbeat) the stream ends with an error delta.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from engine.service.protocol import EngineRequest, Heartbeat, ModelCard, OutputDelta, decode_delta, decode_heartbeat, \
    decode_model_card, encode, error_delta
from engine.service.transport import STREAM_MAXLEN, Backoff, Keys

logger = logging.getLogger(__name__)


class EngineUnavailable(RuntimeError):
    """No live replica serves the requested model (or Redis cannot be reached)."""


class EngineClient:
    def __init__(self, redis_url: str, *, key_prefix: str = "llm", timeout_s: float = 600.0,
                 stall_check_s: float = 2.0, max_connections: int = 4096) -> None:
        # Every open stream holds a connection in XREAD BLOCK: a pool that waits for a free one
        # (rather than failing at a small default cap) keeps a burst of calls from erroring.
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=max_connections, timeout=30)
        self.redis = aioredis.Redis(connection_pool=pool)
        self.keys = Keys(key_prefix)
        self.timeout_s = timeout_s
        self.stall_check_s = stall_check_s

    async def close(self) -> None:
        await self.redis.aclose()

    async def models(self) -> dict[str, list[Heartbeat]]:
        """Live replicas by model name, from their heartbeats."""
        result: dict[str, list[Heartbeat]] = {}
        for beat in await self._heartbeats(self.keys.heartbeat_pattern()):
            result.setdefault(beat.model, []).append(beat)
        return result

    async def replicas(self, model: str) -> list[Heartbeat]:
        return [b for b in await self._heartbeats(self.keys.heartbeat_pattern(model)) if b.model == model]

    async def known_models(self) -> set[str]:
        """Models any replica ever published a card for (served now or not)."""
        prefix = self.keys.model_card("")
        return {key.decode()[len(prefix):] async for key in self.redis.scan_iter(match=prefix + "*", count=200)}

    async def model_card(self, model: str) -> ModelCard | None:
        """The tokenizer and chat template the model's replicas published, if any replica ever ran."""
        data = await self.redis.get(self.keys.model_card(model))
        return decode_model_card(data) if data is not None else None

    async def submit(self, request: EngineRequest, *, timeout_s: float | None = None) -> AsyncIterator[OutputDelta]:
        """Queue `request`; raises EngineUnavailable when no replica serves its model."""
        try:
            if not await self.replicas(request.model):
                raise EngineUnavailable(f"no engine replica serves model {request.model!r}")
        except RedisConnectionError as error:
            raise EngineUnavailable(f"Redis unreachable: {error}") from error
        if request.deadline is None:
            request.deadline = time.time() + (timeout_s or self.timeout_s)
        entry_id = await self._enqueue(request)
        return self._stream(request, entry_id)

    async def abort(self, request_id: str) -> None:
        await self.redis.xadd(self.keys.aborts, {"request_id": request_id}, maxlen=10_000, approximate=True)

    # -- internals ----------------------------------------------------------------------------------

    async def _enqueue(self, request: EngineRequest) -> bytes:
        return await self.redis.xadd(self.keys.requests(request.model), {"data": encode(request)},
                                     maxlen=STREAM_MAXLEN, approximate=True)

    async def _heartbeats(self, pattern: str) -> list[Heartbeat]:
        keys = [key async for key in self.redis.scan_iter(match=pattern, count=200)]
        values = await self.redis.mget(keys) if keys else []
        return [decode_heartbeat(v) for v in values if v is not None]

    async def _stream(self, request: EngineRequest, entry_id: bytes) -> AsyncIterator[OutputDelta]:
        key = self.keys.output(request.request_id)
        last_id, replica_id, finished, stalls = "0-0", None, False, 0
        next_seq, streamed = 0, False  # the seq the replica sends next; whether any token was yielded
        backoff = Backoff()
        try:
            while True:
                remaining = request.deadline - time.time()
                if remaining <= 0:
                    yield error_delta(request.request_id, -1, "deadline_exceeded", "the request's deadline passed")
                    return
                try:
                    reply = await self.redis.xread({key: last_id}, count=256,
                                                   block=max(1, int(min(remaining, self.stall_check_s) * 1000)))
                    if not reply:
                        stalls += 1
                        problem, entry_id = await self._check_stalled(request, entry_id, replica_id, stalls,
                                                                      lost_output=last_id != "0-0"
                                                                      and not await self.redis.exists(key))
                        if problem and problem[0] == "replica_lost" and not streamed:
                            # Nothing reached the caller: run it again on another replica.
                            logger.warning("replica %s lost request %s before it streamed; queueing it again",
                                           replica_id, request.request_id)
                            entry_id, replica_id, stalls = await self._enqueue(request), None, 0
                            continue
                        if problem:
                            finished = problem[0] == "replica_lost"  # a lost replica holds nothing to abort
                            yield error_delta(request.request_id, -1, *problem)
                            return
                        continue
                    backoff.reset()
                except RedisConnectionError as error:
                    delay = backoff.delay()
                    logger.warning("client: Redis unreachable (%s); retrying in %.1fs", error, delay)
                    await asyncio.sleep(delay)
                    continue
                stalls = 0
                for message_id, fields in reply[0][1]:
                    last_id = message_id
                    delta = decode_delta(fields[b"data"])
                    if delta.replica_id != replica_id:  # a replica took the request: its seqs start at 0
                        next_seq = 0
                    replica_id = delta.replica_id or replica_id
                    if delta.seq != next_seq:
                        yield error_delta(request.request_id, -1, "output_lost",
                                          "part of the output was lost in Redis (restarted?)")
                        return
                    next_seq += 1
                    streamed = streamed or bool(delta.outputs)
                    if delta.seq == 0 and not delta.outputs and not delta.finished:
                        continue  # the replica's note that it took the request
                    yield delta
                    if delta.finished:
                        finished = True
                        await self.redis.delete(key)
                        return
        finally:
            if not finished:
                await asyncio.shield(self._abort_quietly(request.request_id))

    async def _check_stalled(self, request: EngineRequest, entry_id: bytes, replica_id: str | None,
                             stalls: int, lost_output: bool = False) -> tuple[tuple[str, str] | None, bytes]:
        """Why a quiet stream will never speak again, if it won't (checked twice, to ride out a
        Redis restart); a request that Redis lost before any replica took it is queued again."""
        if lost_output:  # the output stream we were reading vanished (Redis restarted?)
            return ("output_lost", "the request's output was lost in Redis (restarted?)"), entry_id
        if replica_id is not None:
            alive = await self.redis.exists(self.keys.heartbeat(request.model, replica_id))
            if not alive and stalls >= 2:
                return ("replica_lost", f"engine replica {replica_id} stopped while serving the request"), entry_id
            return None, entry_id
        if not await self.replicas(request.model):
            if stalls >= 2:
                return ("engine_unavailable", f"no engine replica serves model {request.model!r}"), entry_id
            return None, entry_id
        stream = self.keys.requests(request.model)
        if not await self.redis.xrange(stream, entry_id, entry_id):
            logger.warning("request %s vanished from Redis before a replica took it; queueing it again",
                           request.request_id)
            entry_id = await self._enqueue(request)
        return None, entry_id

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await self.abort(request_id)
        except Exception as error:  # the client is going away anyway
            logger.warning("could not abort %s: %s", request_id, error)
