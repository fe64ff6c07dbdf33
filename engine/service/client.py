"""EngineClient: how Django and Celery talk to engine replicas (asyncio, no torch).

`stream = await client.submit(request)` queues the request and returns an async iterator of
OutputDeltas; leaving the iteration early aborts the request, so its KV blocks are freed.

One client serves a whole process: it names itself in every request (`reply_to`), replicas write
each step's deltas for it into its one reply stream, and one reader task hands them to the
streams waiting for them. So a thousand open streams cost one blocked Redis connection, not a
thousand. Background tasks also keep the client's liveness key alive (replicas abort the
requests of a client that died) and the list of live replicas fresh (a submit needs no scan).
Every wait has a deadline, and a request never hangs: if the replica holding it disappears (no
heartbeat) the stream ends with an error delta, or the request is queued again if nothing of it
had been streamed yet.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError, RedisError, ResponseError

from engine.service.protocol import EngineRequest, Heartbeat, ModelCard, OutputDelta, ProtocolError, Usage, \
    decode_deltas, decode_heartbeat, decode_model_card, encode, error_delta
from engine.service.transport import (
    ABORTS_MAXLEN, ABORTS_TTL_S, CLIENT_REFRESH_S, CLIENT_TTL_S, GROUP, REQUEST_STREAM_TTL_S, STREAM_MAXLEN, Backoff,
    Keys,
)

logger = logging.getLogger(__name__)
REPLICAS_REFRESH_S = 1.0  # how stale the cached replica list may get
REPLY_BLOCK_MS = 1000
CLOSE_WAIT_S = 2.0
ABORT_USAGE_WAIT_S = 2.0  # how long an aborted stream waits for its replica to say what the request cost


class EngineUnavailable(RuntimeError):
    """No live replica serves the requested model (or Redis cannot be reached)."""


class EngineClient:
    def __init__(self, redis_url: str, *, key_prefix: str = "llm", timeout_s: float = 600.0,
                 stall_check_s: float = 2.0, max_connections: int = 256) -> None:
        # Waiting for a free connection beats failing at a cap when a burst of calls submits at once.
        pool = aioredis.BlockingConnectionPool.from_url(redis_url, max_connections=max_connections, timeout=30)
        self.redis = aioredis.Redis(connection_pool=pool)
        self._reader_redis = aioredis.Redis.from_url(redis_url)  # its own connection: it blocks in XREAD
        self.keys = Keys(key_prefix)
        self.timeout_s = timeout_s
        self.stall_check_s = stall_check_s
        self.client_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._waiting: dict[str, asyncio.Queue[OutputDelta]] = {}  # request id -> its deltas, in order
        self._replies_read_to = (0, 0)  # id of the last reply entry handed out (see _reply_unread)
        self._replicas: dict[str, list[Heartbeat]] = {}
        self._replicas_at = float("-inf")
        self._tasks: list[asyncio.Task] = []
        self._closing = False

    async def close(self) -> None:
        # The background loops stop on this flag rather than by cancellation: redis-py can swallow a
        # cancel that lands in a blocking read and go on reading.
        self._closing = True
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=REPLY_BLOCK_MS / 1000 + CLOSE_WAIT_S)
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        try:
            await self.redis.delete(self.keys.client(self.client_id), self.keys.reply(self.client_id))
        except (RedisError, OSError):
            pass  # they expire on their own
        await self.redis.aclose()
        await self._reader_redis.aclose()

    async def models(self) -> dict[str, list[Heartbeat]]:
        """Live replicas by model name, from their heartbeats (at most REPLICAS_REFRESH_S old)."""
        self._start()
        if time.monotonic() - self._replicas_at > REPLICAS_REFRESH_S:
            await self._refresh_replicas()
        return {model: list(beats) for model, beats in self._replicas.items()}

    async def replicas(self, model: str) -> list[Heartbeat]:
        return (await self.models()).get(model, [])

    async def known_models(self) -> set[str]:
        """Models any replica ever published a card for (served now or not)."""
        prefix = self.keys.model_card("")
        return {key.decode()[len(prefix):] async for key in self.redis.scan_iter(match=prefix + "*", count=200)}

    async def model_card(self, model: str) -> ModelCard | None:
        """The tokenizer and chat template the model's replicas published, if any replica ever ran."""
        data = await self.redis.get(self.keys.model_card(model))
        return decode_model_card(data) if data is not None else None

    async def submit(self, request: EngineRequest, *, timeout_s: float | None = None) -> RequestStream:
        """Queue `request`; raises EngineUnavailable when no replica serves its model."""
        try:
            if not await self.replicas(request.model):
                await self._refresh_replicas()  # one just started?
                if not self._replicas.get(request.model):
                    raise EngineUnavailable(f"no engine replica serves model {request.model!r}")
        except RedisConnectionError as error:
            raise EngineUnavailable(f"Redis unreachable: {error}") from error
        if request.deadline is None:
            request.deadline = time.time() + (timeout_s or self.timeout_s)
        request.reply_to = self.client_id
        self._waiting[request.request_id] = asyncio.Queue()
        try:
            entry_id = await self._enqueue(request)
        except BaseException:
            del self._waiting[request.request_id]
            raise
        return RequestStream(self, request, entry_id)

    async def abort(self, request_id: str) -> None:
        async with self.redis.pipeline(transaction=False) as pipe:
            await (pipe.xadd(self.keys.aborts, {"request_id": request_id}, maxlen=ABORTS_MAXLEN, approximate=True)
                   .expire(self.keys.aborts, ABORTS_TTL_S).execute())

    # -- background tasks ---------------------------------------------------------------------------

    def _running(self) -> bool:
        """Whether a background loop goes on: not once the client closes, nor once its task was
        cancelled (asyncio.run cancels what is left at its end), even if redis-py swallowed the
        cancel in a blocking read."""
        task = asyncio.current_task()
        return not self._closing and not (task is not None and task.cancelling())

    def _start(self) -> None:
        if not self._tasks:
            self._tasks = [asyncio.create_task(job(), name=f"engine-client-{job.__name__}")
                           for job in (self._read_replies, self._keep_alive, self._keep_replicas_fresh)]

    async def _read_replies(self) -> None:
        """The one reader: every delta for this process, handed to the stream that waits for it."""
        key, last_id, backoff = self.keys.reply(self.client_id), "0-0", Backoff()
        while self._running():
            try:
                reply = await self._reader_redis.xread({key: last_id}, count=1000, block=REPLY_BLOCK_MS)
                backoff.reset()
            except (RedisError, OSError) as error:
                delay = backoff.delay()
                logger.warning("client: Redis unreachable (%s); retrying in %.1fs", error, delay)
                await asyncio.sleep(delay)
                continue
            if not reply:
                continue
            entries = reply[0][1]
            for entry_id, fields in entries:
                try:
                    deltas = decode_deltas(fields.get(b"data", b""))
                except ProtocolError as error:
                    logger.error("client: dropping a malformed reply entry %s: %s", entry_id, error)
                    continue
                for delta in deltas:
                    waiting = self._waiting.get(delta.request_id)
                    if waiting is not None:  # else its stream already ended (aborted, say)
                        waiting.put_nowait(delta)
            last_id = entries[-1][0]
            self._replies_read_to = _entry_id(last_id)
            try:  # read entries are of no more use: keep Redis small
                await self._reader_redis.xdel(key, *(entry_id for entry_id, _ in entries))
            except (RedisError, OSError):
                pass

    async def _keep_alive(self) -> None:
        key = self.keys.client(self.client_id)
        while self._running():
            try:
                await self.redis.set(key, b"1", ex=CLIENT_TTL_S)
            except (RedisError, OSError) as error:
                logger.warning("client: could not refresh its liveness key: %s", error)
            await asyncio.sleep(CLIENT_REFRESH_S)

    async def _keep_replicas_fresh(self) -> None:
        while self._running():
            await asyncio.sleep(REPLICAS_REFRESH_S / 2)
            try:
                await self._refresh_replicas()
            except (RedisError, OSError):
                pass  # the streams' stall checks notice a Redis that stays away

    async def _refresh_replicas(self) -> None:
        keys = [key async for key in self.redis.scan_iter(match=self.keys.heartbeat_pattern(), count=500)]
        values = await self.redis.mget(keys) if keys else []
        replicas: dict[str, list[Heartbeat]] = {}
        for value in values:
            if value is not None:
                beat = decode_heartbeat(value)
                replicas.setdefault(beat.model, []).append(beat)
        self._replicas, self._replicas_at = replicas, time.monotonic()

    # -- one request ----------------------------------------------------------------------------------

    async def _enqueue(self, request: EngineRequest) -> bytes:
        """Replicas delete what they take; the expiry clears what nobody took once every deadline passed."""
        stream = self.keys.requests(request.model)
        ttl = max(REQUEST_STREAM_TTL_S, int(request.deadline - time.time()) + 60)
        async with self.redis.pipeline(transaction=False) as pipe:
            entry_id, _ = await (pipe.xadd(stream, {"data": encode(request)}, maxlen=STREAM_MAXLEN, approximate=True)
                                 .expire(stream, ttl).execute())
        return entry_id

    async def _requeue(self, request: EngineRequest, entry_id: bytes) -> bytes:
        """Queue a request again whose replica died; its old entry goes first, so a replica that
        reclaims the dead one's unacknowledged reads cannot run it a second time."""
        stream = self.keys.requests(request.model)
        async with self.redis.pipeline(transaction=False) as pipe:
            await pipe.xack(stream, GROUP, entry_id).xdel(stream, entry_id).execute()
        return await self._enqueue(request)

    async def _stream(self, request: EngineRequest, entry_id: bytes, on_abort_usage=None) -> AsyncIterator[OutputDelta]:
        deltas = self._waiting[request.request_id]
        replica_id, finished, stalls = None, False, 0
        next_seq, streamed = 0, False  # the seq the replica sends next; whether any token was yielded
        try:
            while True:
                if deltas.empty():
                    remaining = request.deadline - time.time()
                    if remaining <= 0:
                        yield error_delta(request.request_id, -1, "deadline_exceeded", "the request's deadline passed")
                        return
                    try:
                        async with asyncio.timeout(min(remaining, self.stall_check_s)):
                            delta = await deltas.get()
                    except TimeoutError:
                        stalls += 1
                        try:
                            problem, entry_id = await self._check_stalled(request, entry_id, replica_id, stalls)
                        except (RedisError, OSError) as error:
                            logger.warning("client: stall check of %s failed: %s", request.request_id, error)
                            continue
                        if problem and problem[0] == "replica_lost" and not streamed:
                            # Nothing reached the caller: run it again on another replica.
                            logger.warning("replica %s lost request %s before it streamed; queueing it again",
                                           replica_id, request.request_id)
                            entry_id, replica_id, stalls = await self._requeue(request, entry_id), None, 0
                            continue
                        if problem:
                            finished = problem[0] == "replica_lost"  # a lost replica holds nothing to abort
                            yield error_delta(request.request_id, -1, *problem)
                            return
                        continue
                else:
                    delta = deltas.get_nowait()
                stalls = 0
                if delta.replica_id != replica_id:  # a replica took the request: its seqs start at 0
                    next_seq = 0
                replica_id = delta.replica_id or replica_id
                if delta.seq < next_seq:
                    continue  # sent again after a Redis restart, and read the first time
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
                    return
        finally:
            if finished:
                self._waiting.pop(request.request_id, None)
            else:  # a replica that holds it answers the abort with what it cost
                usage = await self._forget(request.request_id, wait_for_usage=replica_id is not None
                                           or not deltas.empty())
                if usage is not None and on_abort_usage is not None:
                    on_abort_usage(usage)

    async def _check_stalled(self, request: EngineRequest, entry_id: bytes, replica_id: str | None,
                             stalls: int) -> tuple[tuple[str, str] | None, bytes]:
        """Why a quiet stream will never speak again, if it won't (checked twice, to ride out a
        Redis restart); a request that Redis lost before any replica took it is queued again."""
        live = await self.replicas(request.model)
        if replica_id is not None:
            if stalls >= 2 and all(beat.replica_id != replica_id for beat in live):
                return ("replica_lost", f"engine replica {replica_id} stopped while serving the request"), entry_id
            return None, entry_id
        if not live:
            if stalls >= 2:
                return ("engine_unavailable", f"no engine replica serves model {request.model!r}"), entry_id
            return None, entry_id
        stream = self.keys.requests(request.model)
        if not await self.redis.xrange(stream, entry_id, entry_id):
            # A replica deletes the entry it took right after writing its note: the note may be unread yet.
            if not self._waiting[request.request_id].empty() or await self._reply_unread():
                return None, entry_id
            logger.warning("request %s vanished from Redis before a replica took it; queueing it again",
                           request.request_id)
            entry_id = await self._enqueue(request)
        return None, entry_id

    async def _reply_unread(self) -> bool:
        """Whether the reply stream holds entries the reader has not handed out yet."""
        try:
            info = await self.redis.xinfo_stream(self.keys.reply(self.client_id))
        except ResponseError:  # no stream: nothing was ever written to this client
            return False
        return _entry_id(info["last-generated-id"]) > self._replies_read_to

    async def _forget(self, request_id: str, *, wait_for_usage: bool = False) -> Usage | None:
        """Stop waiting for a request nobody will read, and abort it; with `wait_for_usage`, wait
        briefly for the replica's last delta, whose usage says what the request cost (it is billed)."""
        deltas = self._waiting.get(request_id)
        if deltas is None:
            return None
        return await asyncio.shield(self._abort_quietly(request_id, deltas if wait_for_usage else None))

    async def _abort_quietly(self, request_id: str, deltas: asyncio.Queue | None) -> Usage | None:
        try:
            try:
                await self.abort(request_id)
            except Exception as error:  # the client is going away anyway
                logger.warning("could not abort %s: %s", request_id, error)
                return None
            if deltas is None:
                return None
            try:
                async with asyncio.timeout(ABORT_USAGE_WAIT_S):
                    while not (delta := await deltas.get()).finished:
                        pass
                return delta.usage
            except TimeoutError:
                return None
        finally:
            self._waiting.pop(request_id, None)


def _entry_id(entry_id: bytes | str) -> tuple[int, int]:
    millis, _, seq = (entry_id.decode() if isinstance(entry_id, bytes) else entry_id).partition("-")
    return int(millis), int(seq or 0)


class RequestStream:
    """The deltas of one submitted request. `aclose()` before the end aborts the request, also when
    iteration never began (a generator's `finally` would not run then)."""

    def __init__(self, client: EngineClient, request: EngineRequest, entry_id: bytes) -> None:
        self.request_id = request.request_id
        self.abort_usage: Usage | None = None  # what a request closed early cost, when its replica said so
        self._client, self._started = client, False
        self._deltas = client._stream(request, entry_id, self._set_abort_usage)

    def _set_abort_usage(self, usage: Usage) -> None:
        self.abort_usage = usage

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> OutputDelta:
        self._started = True
        return await self._deltas.__anext__()

    async def aclose(self) -> None:
        if self._started:
            await self._deltas.aclose()
        else:
            await self._client._forget(self.request_id)
