"""An engine replica: serves one model's request stream from Redis with an LLMEngine.

Three threads, so Redis never stalls the model: the main thread only steps the engine; a reader
takes requests (as many as there is room for), aborts and orphaned requests of dead replicas; a
writer publishes deltas, acknowledgements and heartbeats. A request is acknowledged when the
engine accepts it, so one read by a replica that dies before that is reclaimed by another.
When the engine itself dies (a tensor-parallel worker died), the replica stops and exits 1: its
clients queue what had not streamed yet on the other replicas (see EngineServer._abandon).
"""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import threading
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass

import redis

from engine import tracing
from engine.errors import EngineDeadError
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import RequestOutputKind
from engine.service.protocol import (
    CompletionDelta, EngineRequest, Heartbeat, ModelCard, OutputDelta, ProtocolError, Usage, decode_request,
    encode, error_delta,
)
from engine.service.lora_sync import ReplicaAdapters
from engine.service.replies import ClientWatch, ReplyWriter
from engine.service.stream_pacing import StreamPacer
from engine.service.transport import (
    DEAD_LETTER_BYTES, DEAD_LETTER_MAXLEN, GROUP, HEARTBEAT_INTERVAL_S, HEARTBEAT_TTL_S, Backoff, Keys,
)
from engine.tokenization import decodes_like_its_backend

logger = logging.getLogger(__name__)
MODEL_CARD_CHECK_S = 10.0  # how often the writer makes sure the model card is still in Redis
CLIENT_CHECK_S = 2.0  # how often the writer looks for clients that went away
DEAD_OWNER_IDLE_MS = 1000  # requests read by a replica whose heartbeat is gone are taken over this soon  # final deltas kept this long, to send again if Redis restarts and loses them


@dataclass
class InFlight:
    """What the replica tracks of one accepted request (main thread only)."""

    reply_to: str
    next_seq: int = 1  # seq 0 was the note that said which replica took it
    completion_tokens: int = 0
    prompt_logprobs_pending: bool = False
    trace_context: dict | None = None  # the web span to hang this request's engine spans under


class EngineServer:
    def __init__(self, engine: LLMEngine, redis_url: str, model_name: str, *, key_prefix: str = "llm",
                 replica_id: str | None = None, reclaim_idle_s: float = 30.0, shutdown_timeout_s: float = 30.0,
                 max_queued: int | None = None, max_stream_interval: int = 2) -> None:
        self.engine = engine
        self.redis_url = redis_url
        self.model_name = model_name
        self.keys = Keys(key_prefix)
        self.replica_id = replica_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.reclaim_idle_ms = int(reclaim_idle_s * 1000)
        self.shutdown_timeout_s = shutdown_timeout_s
        # Room: what the scheduler can run plus a short queue, so new work starts at once.
        self.max_in_flight = max_queued or engine.scheduler_config.max_num_seqs * 3 // 2
        self.incoming: queue.Queue[tuple[bytes, EngineRequest]] = queue.Queue()
        self.aborts: queue.Queue[str] = queue.Queue()
        self.outgoing: queue.Queue[tuple] = queue.Queue()
        self.in_flight: dict[str, InFlight] = {}
        self.num_in_flight = 0  # read by the reader thread to size its reads
        self.deadlines: dict[str, float] = {}
        self.early_aborts: dict[str, float] = {}  # aborted before accepted: id -> when (main thread)
        self.accepting = threading.Event()
        self.accepting.set()
        self.stopped = threading.Event()
        self.wakeup = threading.Event()
        self.dead = False  # the engine can run no more steps
        self.generated = deque()  # (time, tokens) of the last minute, for the heartbeat
        self.step_times = deque()  # (time, seconds) of the last minute's engine steps, for the heartbeat
        self.num_aborted = 0  # requests stopped by an abort (their client's, or their client died)
        self.replies = ReplyWriter(self.keys)  # writer thread only
        self.client_watch = ClientWatch(self.keys)  # writer thread only
        self.adapters = ReplicaAdapters(engine, model_name, key_prefix)  # LoRA adapters, synced by their thread
        self.pacer = None  # coalesces streamed tokens while the host is the bottleneck (stream_pacing.py)
        base_interval = engine.output_processor.stream_interval
        if engine.async_scheduling and max_stream_interval > base_interval:
            self.pacer = StreamPacer(base_interval, max_stream_interval)
            engine.output_processor.stagger = True

    # -- main thread --------------------------------------------------------------------------------

    def serve_forever(self) -> int:
        """Serve until told to stop (exit status 0) or until the engine dies (1)."""
        signal.signal(signal.SIGTERM, lambda *_: self.request_shutdown())
        signal.signal(signal.SIGINT, lambda *_: self.request_shutdown())
        threads = [threading.Thread(target=self._reader, name="redis-reader", daemon=True),
                   threading.Thread(target=self._writer, name="redis-writer", daemon=True)]
        if self.engine.lora_config is not None:
            threads.append(threading.Thread(target=self.adapters.run, args=(self.redis_url, self.stopped),
                                            name="lora-sync", daemon=True))
        for thread in threads:
            thread.start()
        logger.info("replica %s serving %r from %s", self.replica_id, self.model_name, self.redis_url)
        shutdown_started = None
        while True:
            self._accept_new_requests()
            self._apply_aborts()
            self._expire_deadlines()
            self.adapters.drop_retired()
            if self.engine.has_unfinished_requests():
                self._step()
            else:
                self.wakeup.wait(0.05)
                self.wakeup.clear()
            if self.dead:
                break
            if not self.accepting.is_set():
                shutdown_started = shutdown_started or time.monotonic()
                if not self.in_flight and self.incoming.empty():
                    break
                if time.monotonic() - shutdown_started > self.shutdown_timeout_s:
                    self._fail_all("shutdown", "the engine replica shut down before the request finished")
                    break
        self.stopped.set()
        for thread in threads:
            thread.join(timeout=5)
        logger.info("replica %s stopped", self.replica_id)
        return 1 if self.dead else 0

    def _step(self) -> None:
        started, waited_before = time.monotonic(), self.engine.fetch_wait_s
        planned_ahead = not self.engine.scheduler.num_requests_reading_history  # else the wait says nothing
        try:
            outputs = self.engine.step()
        except EngineDeadError as error:
            logger.critical("the engine is dead (%s); this replica stops", error)
            self._abandon()
            return
        except Exception:  # a fault outside any one request's part: fail what is in flight, loudly
            logger.exception("engine step failed; failing %d in-flight requests", len(self.in_flight))
            self._fail_all("engine_error", "the engine failed while running the request")
            return
        elapsed = time.monotonic() - started
        self.step_times.append((started, elapsed))
        if self.pacer is not None and planned_ahead:
            interval = self.pacer.observe(elapsed, self.engine.fetch_wait_s - waited_before)
            if interval is not None:
                logger.info("streaming every %d tokens (the host %s the device)", interval,
                            "cannot keep up with" if interval > self.pacer.base_interval else "keeps up with")
                self.engine.output_processor.stream_interval = interval
        self._publish(outputs)
        for request_id, reason in self.engine.take_failed_requests().items():  # the step ran without them
            if request_id in self.in_flight:
                logger.error("request %s failed alone: %s", request_id, reason)
                self._end_with_error(request_id, "engine_error", "the engine failed while running the request")

    def request_shutdown(self) -> None:
        """Stop taking requests; finish those in flight (up to shutdown_timeout_s), then exit."""
        logger.info("shutting down: finishing %d requests", self.num_in_flight)
        self.accepting.clear()
        self.wakeup.set()

    def _accept_new_requests(self) -> None:
        while True:
            try:
                entry_id, request = self.incoming.get_nowait()
            except queue.Empty:
                return
            self._accept(request)
            # Acked after the note (or error) that names this replica, so an entry is never acked
            # while its client knows nobody who holds it (the writer keeps this order).
            self.outgoing.put(("ack", entry_id))

    def _accept(self, request: EngineRequest) -> None:
        if self.early_aborts.pop(request.request_id, None) is not None:
            return
        if request.request_id in self.in_flight:  # read twice: queued again while a reclaim took it too
            logger.warning("request %s is already running here; dropping the second copy", request.request_id)
            return
        if request.deadline is not None and request.deadline < time.time():
            self._send(request.reply_to, error_delta(
                request.request_id, 0, "deadline_exceeded", "the deadline passed before an engine took the request",
                self.replica_id))
            return
        prompt = request.prompt if request.prompt is not None else {"prompt_token_ids": request.prompt_token_ids}
        lora_request = None
        if request.lora_name is not None:
            lora_request = self.adapters.servable.get(request.lora_name)
            if lora_request is None:
                why = self.adapters.errors.get(request.lora_name)
                self._send(request.reply_to, error_delta(
                    request.request_id, 0, "lora_not_found",
                    f"LoRA adapter {request.lora_name!r} is not loaded for model {self.model_name!r}"
                    + (f": {why}" if why else ""), self.replica_id))
                return
        try:
            params = request.sampling_params().clone(output_kind=RequestOutputKind.DELTA)
            self.engine.add_request(request.request_id, prompt, params, priority=request.priority,
                                    cache_salt=request.tenant or None, tenant=request.tenant or None,
                                    lora_request=lora_request)
        except ValueError as error:
            self._send(request.reply_to, error_delta(request.request_id, 0, "invalid_request", str(error),
                                                     self.replica_id))
            return
        self.in_flight[request.request_id] = InFlight(request.reply_to,
                                                      prompt_logprobs_pending=params.prompt_logprobs is not None,
                                                      trace_context=request.trace_context or None)
        self.num_in_flight = len(self.in_flight)
        if request.deadline is not None:
            self.deadlines[request.request_id] = request.deadline
        # Tells the client which replica holds its request, before any token exists.
        self._send(request.reply_to, OutputDelta(request.request_id, 0, replica_id=self.replica_id))

    def _apply_aborts(self) -> None:
        while True:
            try:
                request_id = self.aborts.get_nowait()
            except queue.Empty:
                return
            if request_id in self.in_flight:
                self._end_with_error(request_id, "aborted", "the request was aborted")
                self.num_aborted += 1
            else:  # not accepted yet (maybe still queued here): drop it when it arrives
                now = time.monotonic()
                self.early_aborts[request_id] = now
                for old_id, when in list(self.early_aborts.items()):
                    if when < now - 60:
                        del self.early_aborts[old_id]

    def _expire_deadlines(self) -> None:
        now = time.time()
        for request_id, deadline in list(self.deadlines.items()):
            if deadline < now:
                self._end_with_error(request_id, "deadline_exceeded", "the request's deadline passed")

    def _publish(self, outputs: list[RequestOutput]) -> None:
        """A step's deltas go to the writer in one put: at 1,000 sequences, one queue operation per
        delta (a lock and a wakeup each) was a good part of the replica's host time per step."""
        num_tokens, sends = 0, []
        for output in outputs:
            progress = self.in_flight.get(output.request_id)
            if progress is None:
                continue
            completions = []
            for o in output.outputs:
                logprobs = None if o.logprobs is None else _wire_logprobs(o.logprobs)
                completions.append(CompletionDelta(o.index, o.text, o.token_ids, logprobs, o.finish_reason,
                                                   o.stop_reason))
                num_tokens += len(o.token_ids)
                progress.completion_tokens += len(o.token_ids)
            usage = Usage(len(output.prompt_token_ids), progress.completion_tokens, output.num_cached_tokens)
            delta = OutputDelta(output.request_id, progress.next_seq, completions, output.finished, usage,
                                replica_id=self.replica_id)
            prompt_logprobs = output.prompt_logprobs
            if (progress.prompt_logprobs_pending and prompt_logprobs
                    and len(prompt_logprobs) == len(output.prompt_token_ids)):
                delta.prompt_logprobs = [None, *_wire_logprobs(prompt_logprobs[1:])]
                progress.prompt_logprobs_pending = False
            if output.finished:
                delta.timings = _timings(output.metrics)
                if progress.trace_context:
                    tracing.record_engine_request(progress.trace_context, output.request_id, output.metrics, {
                        "llm.replica": self.replica_id, "llm.prompt_tokens": usage.prompt_tokens,
                        "llm.completion_tokens": usage.completion_tokens, "llm.cached_tokens": usage.cached_tokens})
            sends.append((progress.reply_to, delta))
            progress.next_seq += 1
            if output.finished:
                self._finish(output.request_id)
        if sends:
            self.outgoing.put(("deltas", sends))
        self.generated.append((time.monotonic(), num_tokens))

    def _finish(self, request_id: str) -> None:
        self.in_flight.pop(request_id, None)
        self.deadlines.pop(request_id, None)
        self.num_in_flight = len(self.in_flight)

    def _abandon(self) -> None:
        """Leave a dead engine: fail the requests that have streamed (their clients saw part of an
        answer), drop the rest silently so their clients queue them again on another replica once
        this one's heartbeat is gone, and stop; unaccepted reads go back to the others by reclaim."""
        for request_id, progress in list(self.in_flight.items()):
            if progress.next_seq > 1:  # past the note that said which replica took it
                self._send(progress.reply_to, error_delta(
                    request_id, progress.next_seq, "engine_dead",
                    "the engine replica failed while generating the answer", self.replica_id))
            self._finish(request_id)
        self.dead = True
        self.accepting.clear()

    def _fail_all(self, code: str, message: str) -> None:
        for request_id in list(self.in_flight):
            self._end_with_error(request_id, code, message)

    def _end_with_error(self, request_id: str, code: str, message: str) -> None:
        """Stop an accepted request in the engine (its KV blocks are freed) and tell its client why,
        with the tokens it cost so far."""
        progress = self.in_flight[request_id]
        prompt, completion, cached = self.engine.usage_so_far(request_id)  # what the work cost: it is billed
        usage = Usage(prompt, max(completion, progress.completion_tokens), cached)
        self.engine.abort_request(request_id)
        self._send(progress.reply_to, error_delta(request_id, progress.next_seq, code, message, self.replica_id,
                                                  usage=usage))
        self._finish(request_id)

    def _send(self, reply_to: str, delta: OutputDelta) -> None:
        self.outgoing.put(("delta", reply_to, delta))

    def heartbeat(self) -> Heartbeat:
        stats = self.engine.stats()
        now = time.monotonic()
        while self.generated and self.generated[0][0] < now - 60:
            self.generated.popleft()
        while self.step_times and self.step_times[0][0] < now - 60:
            self.step_times.popleft()
        recent = list(self.generated)  # one atomic copy: the main thread appends meanwhile
        window = min(60.0, now - recent[0][0]) if recent else 0.0
        tokens = sum(n for _, n in recent)
        steps = [seconds for _, seconds in list(self.step_times)]
        return Heartbeat(self.replica_id, self.model_name, queue_depth=self.incoming.qsize(),
                         num_running=stats["num_running"], num_waiting=stats["num_waiting"],
                         kv_cache_usage=stats["kv_cache_usage"], device_memory_bytes=self.engine.runner.memory_in_use(),
                         tokens_per_s=tokens / window if window > 0 else 0.0, num_aborted=self.num_aborted,
                         max_model_len=self.engine.max_model_len, num_preemptions=stats["num_preemptions"],
                         prefix_cache_queries=stats["prefix_cache_queries"],
                         prefix_cache_hits=stats["prefix_cache_hits"],
                         step_seconds=sum(steps) / len(steps) if steps else 0.0,
                         spec_num_draft_tokens=self.engine.scheduler.num_draft_tokens,
                         spec_num_accepted_tokens=self.engine.scheduler.num_accepted_tokens,
                         spec_num_steps=self.engine.scheduler.num_spec_steps,
                         lora_adapters=sorted(self.adapters.servable), lora_errors=dict(self.adapters.errors),
                         max_lora_rank=self.engine.lora_config.max_lora_rank if self.engine.lora_config else 0)

    def model_card(self) -> ModelCard:
        tokenizer = self.engine.tokenizer
        defaults = self.engine.sampling_defaults
        if tokenizer is None:
            return ModelCard(self.model_name, self.engine.max_model_len, sampling_defaults=defaults)
        special = {name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return ModelCard(self.model_name, self.engine.max_model_len, tokenizer.backend_tokenizer.to_str(),
                         tokenizer.chat_template, {k: v for k, v in special.items() if isinstance(v, str)},
                         sampling_defaults=defaults,
                         streams_backend_text=decodes_like_its_backend(tokenizer))

    # -- reader thread ------------------------------------------------------------------------------

    def _reader(self) -> None:
        backoff = Backoff()
        client = redis.Redis.from_url(self.redis_url)
        stream = self.keys.requests(self.model_name)
        last_abort_id = "$"
        last_reclaim = 0.0
        group_ready = False
        while not self.stopped.is_set():
            try:
                if last_abort_id == "$":
                    last_abort_id = _last_entry_id(client, self.keys.aborts)
                if not group_ready:
                    self._ensure_group(client, stream)
                    group_ready = True
                room = self.max_in_flight - self.num_in_flight - self.incoming.qsize()
                if self.accepting.is_set() and room > 0:
                    if time.monotonic() - last_reclaim > min(max(self.reclaim_idle_ms / 4000, 0.2), 1.0):
                        self._reclaim(client, stream, room)
                        last_reclaim = time.monotonic()
                    reply = client.xreadgroup(GROUP, self.replica_id, {stream: ">"}, count=room, block=20)
                    for _, entries in reply or []:
                        for entry_id, fields in entries:
                            self._take(client, stream, entry_id, fields)
                reply = client.xread({self.keys.aborts: last_abort_id}, count=1000,
                                     block=None if self.accepting.is_set() and room > 0 else 20)
                for _, entries in reply or []:
                    for entry_id, fields in entries:
                        last_abort_id = entry_id
                        request_id = fields.get(b"request_id", b"").decode("utf-8", "replace")
                        if request_id:
                            self.aborts.put(request_id)
                        self.wakeup.set()
                backoff.reset()
            except redis.ConnectionError as error:
                delay = backoff.delay()
                logger.warning("reader: Redis unreachable (%s); retrying in %.1fs", error, delay)
                last_abort_id, group_ready = "$", False  # a restarted Redis may have lost both
                time.sleep(delay)
            except redis.ResponseError as error:
                if "NOGROUP" not in str(error):
                    logger.exception("reader: unexpected Redis error")
                    time.sleep(backoff.delay())
                group_ready = False
            except Exception:  # never let the reader die silently while heartbeats go on
                logger.exception("reader: unexpected error")
                time.sleep(backoff.delay())

    def _ensure_group(self, client: redis.Redis, stream: str) -> None:
        try:
            client.xgroup_create(stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise

    def _take(self, client: redis.Redis, stream: str, entry_id: bytes, fields: dict) -> None:
        request = None
        try:
            request = decode_request(fields.get(b"data", b""), check_params=False)
            request.sampling_params()
        except ProtocolError as error:
            logger.warning("dead-lettering malformed request %s: %s", entry_id, error)
            if request is not None:  # its client is told at once rather than waiting for its deadline
                self._send(request.reply_to, error_delta(request.request_id, 0, "invalid_request", str(error),
                                                         self.replica_id))
            pipe = client.pipeline(transaction=False)
            pipe.xadd(self.keys.dead_letter, {"stream": stream, "entry_id": entry_id, "reason": str(error)[:1000],
                                              "data": fields.get(b"data", b"")[:DEAD_LETTER_BYTES]},
                      maxlen=DEAD_LETTER_MAXLEN, approximate=True)
            pipe.xack(stream, GROUP, entry_id).xdel(stream, entry_id).execute()
            return
        self.incoming.put((entry_id, request))
        self.wakeup.set()

    def _reclaim(self, client: redis.Redis, stream: str, room: int) -> None:
        """Take over requests another replica read but never accepted: at once (after a second)
        when that replica's heartbeat is gone, else once they have waited reclaim_idle_s (a replica
        alive but stuck). XPENDING + XCLAIM rather than XAUTOCLAIM, so Redis before 6.2 works too."""
        pending = [p for p in client.xpending_range(stream, GROUP, min="-", max="+", count=room)
                   if p["consumer"].decode() != self.replica_id]
        owners = sorted({p["consumer"].decode() for p in pending})
        if not owners:
            return
        pipe = client.pipeline(transaction=False)
        for owner in owners:
            pipe.exists(self.keys.heartbeat(self.model_name, owner))
        alive = {owner for owner, exists in zip(owners, pipe.execute()) if exists}
        for owner_alive, min_idle_ms in ((False, DEAD_OWNER_IDLE_MS), (True, self.reclaim_idle_ms)):
            stale = [p["message_id"] for p in pending
                     if (p["consumer"].decode() in alive) == owner_alive and p["time_since_delivered"] >= min_idle_ms]
            for entry_id, fields in client.xclaim(stream, GROUP, self.replica_id, min_idle_ms, stale) if stale else []:
                if fields:  # a deleted entry comes back empty
                    logger.info("reclaimed request entry %s from a %s replica", entry_id,
                                "stuck" if owner_alive else "dead")
                    self._take(client, stream, entry_id, fields)

    # -- writer thread ------------------------------------------------------------------------------

    def _writer(self) -> None:
        backoff = Backoff()
        client = redis.Redis.from_url(self.redis_url)
        stream = self.keys.requests(self.model_name)
        batch: list[tuple] = []
        next_heartbeat = next_card_check = next_client_check = 0.0
        card, card_key = encode(self.model_card()), self.keys.model_card(self.model_name)
        redis_run_id = None
        while not (self.stopped.is_set() and self.outgoing.empty() and not batch):
            if not batch:
                try:
                    batch.append(self.outgoing.get(timeout=0.1))
                except queue.Empty:
                    pass
                while len(batch) < 4096:
                    try:
                        batch.append(self.outgoing.get_nowait())
                    except queue.Empty:
                        break
            try:
                if batch:
                    self.replies.flush(client, stream, batch)
                    batch = []
                if time.monotonic() >= next_heartbeat:
                    beat = self.heartbeat()
                    client.set(self.keys.heartbeat(self.model_name, self.replica_id), encode(beat),
                               ex=HEARTBEAT_TTL_S)
                    next_heartbeat = time.monotonic() + HEARTBEAT_INTERVAL_S
                    run_id = client.info("server").get("run_id")
                    if redis_run_id is not None and run_id != redis_run_id:
                        self.replies.resend_finals(client)
                    redis_run_id = run_id
                if time.monotonic() >= next_card_check:  # again after a Redis restart lost it
                    if next_card_check == 0 or not client.exists(card_key):
                        client.set(card_key, card)
                    next_card_check = time.monotonic() + MODEL_CARD_CHECK_S
                if time.monotonic() >= next_client_check:
                    self._abort_requests_of_gone_clients(client)
                    next_client_check = time.monotonic() + CLIENT_CHECK_S
                backoff.reset()
            except redis.ConnectionError as error:
                delay = backoff.delay()
                logger.warning("writer: Redis unreachable (%s); retrying in %.1fs", error, delay)
                time.sleep(delay)
            except Exception:  # drop what cannot be written (clients see the gap), never the thread
                logger.exception("writer: unexpected error; dropping %d messages", len(batch))
                batch = []
                time.sleep(backoff.delay())
        client.delete(self.keys.heartbeat(self.model_name, self.replica_id))

    def _abort_requests_of_gone_clients(self, client: redis.Redis) -> None:
        """So their KV blocks go to requests someone is listening to (a web process killed mid-stream)."""
        requests_by_client: dict[str, list[str]] = defaultdict(list)
        for request_id, progress in self.in_flight.copy().items():  # copy(): one atomic step under the GIL
            requests_by_client[progress.reply_to].append(request_id)
        for name in self.client_watch.gone(client, list(requests_by_client)):
            logger.warning("client %s is gone; aborting its %d requests", name, len(requests_by_client[name]))
            for request_id in requests_by_client[name]:
                self.aborts.put(request_id)
            self.wakeup.set()


def _last_entry_id(client: redis.Redis, stream: str) -> bytes | str:
    """Read aborts from now on: the id of the newest entry, or 0 for an empty stream."""
    entries = client.xrevrange(stream, count=1)
    return entries[0][0] if entries else "0-0"


def _timings(metrics: dict) -> dict | None:
    """Queue (arrival to first admission), prefill (to the first token) and decode (to the end) times
    of a finished request, from its RequestOutput.metrics; None if it never got a token."""
    arrival, scheduled = metrics.get("arrival_time"), metrics.get("scheduled_time")
    first, finished = metrics.get("first_token_time"), metrics.get("finished_time")
    if None in (arrival, scheduled, first, finished):
        return None
    return {"queue_s": scheduled - arrival, "prefill_s": first - scheduled, "decode_s": finished - first}


def _wire_logprobs(logprobs) -> list[dict] | None:
    if logprobs is None:
        return None
    return [{token_id: [lp.logprob, lp.rank, lp.decoded_token] for token_id, lp in position.items()}
            for position in logprobs]
