"""Runs a batch in a Celery worker: validating -> in_progress -> finalizing -> completed.

Every line goes through the API's own code path (its serializer, `start_chat`/`start_completion`,
`Call.collect()` and `Call.close()`), so rate limits, quota reservation and usage recording are
exactly those of interactive calls; only the engine priority is lower. Each result is saved as
it finishes and a restarted run takes only lines without one. A Redis lease makes sure one worker
at a time runs a batch, whatever the broker redelivers.

Fair to other tenants: a run is a slice of at most `BATCH_SLICE_S` (then the batch goes back to the
end of the queue, so other batches interleave), a tenant runs at most `BATCH_SLOTS_PER_TENANT`
batches at once (so its batches cannot hold every worker), a line that can never be admitted fails at once instead of being
retried forever, and the batch's key is checked before each line (a revoked key stops the batch).
"""
from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone
from redis.asyncio import Redis
from redis.exceptions import LockError

from engine.service.protocol import Usage
from inference.batch_input import output_line, parse_input
from inference.batch_key_check import KEY_REFUSED, KeyRefused, live_batch_key
from inference.batch_services import create_file, requeue_after_slice
from inference.lease_semaphore import LeaseSemaphore
from inference.engine_client import get_engine_client
from inference.errors import OpenAIError
from inference.models import Batch, BatchLine, BatchStatus, File, FilePurpose
from inference.endpoints import BY_PATH
from inference.serializers import validated
from tenants.admission import release_abandoned

logger = logging.getLogger(__name__)

LEASE_S = 15  # a dead worker's batch is free again this long after its last renewal
RUNNING_TTL_S = 7 * 24 * 3600  # the record of a batch's admitted lines outlives any run of it
WATCH_EVERY_S = 1.0  # how often a running batch looks for a cancel (and renews its lease)
RETRYABLE_CODES = {"rate_limit_exceeded", "engine_unavailable"}  # wait and retry the line, don't fail it
PAGE = 200  # pending lines read from the database at a time


def run_batch(*, batch_id: str) -> None:
    """Run one slice of a batch (or end it); returns at once if another worker holds it. A batch
    with lines left goes back to the queue, behind the batches that waited meanwhile."""
    ran = asyncio.run(_run(batch_id))
    if ran is not None:  # it held a tenant slot: the tenant's next batches take their turn first
        tenant_id, again_in_s = ran
        requeue_after_slice(tenant_id=tenant_id, batch_id=batch_id, again_in_s=again_in_s)


async def _run(batch_id: str) -> tuple[int, float | None] | None:
    """One slice. When it held one of its tenant's slots: the tenant, and the seconds after which
    to run the batch again (None: it ended). A batch whose tenant's slots are all taken is left
    alone: the slice that frees a slot queues it (and the resume beat would)."""
    redis = Redis.from_url(settings.REDIS_URL)
    lease = redis.lock(f"{settings.ENGINE_KEY_PREFIX}:batch-lease:{batch_id}", timeout=LEASE_S)
    slot = None
    try:
        if not await lease.acquire(blocking=False):
            logger.info("batch %s: another worker runs it", batch_id)
            return None
        batch = await sync_to_async(_load)(batch_id)
        if batch is None or batch.is_finished:
            return None
        if batch.status in (BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS) and timezone.now() < batch.expires_at:
            slot = _tenant_slot(redis, batch)
            if not await slot.acquire():
                logger.info("batch %s: its tenant's other batches hold every slot; later", batch_id)
                slot = None
                return None
        if batch.status == BatchStatus.VALIDATING:
            batch = await sync_to_async(prepare_lines)(batch=batch)
        failure = None
        if batch.status == BatchStatus.IN_PROGRESS and slot is not None:  # no slot: expired, cancelling
            await _release_lines_of_a_dead_run(batch, redis)
            end = await _run_lines(batch, lease, slot)
            if end.reason == "slice":
                return batch.tenant_id, end.again_in_s
            failure = KEY_REFUSED if end.reason == "key" else None
        await sync_to_async(finalize)(batch_id=batch_id, failure=failure)
        return None if slot is None else (batch.tenant_id, None)
    finally:
        if slot is not None:
            await slot.release()
        try:
            await lease.release()
        except LockError:
            pass  # never acquired, or expired
        await get_engine_client().close()
        await redis.aclose()


def _tenant_slot(redis: Redis, batch: Batch) -> LeaseSemaphore:
    """One of the `BATCH_SLOTS_PER_TENANT` batches its tenant may run at once, whatever the worker."""
    return LeaseSemaphore(redis, key=f"{settings.ENGINE_KEY_PREFIX}:batch-tenant-slots:{{t{batch.tenant_id}}}",
                          member=batch.pk, cap=settings.BATCH_SLOTS_PER_TENANT, lease_s=LEASE_S)


def _running_key(batch_id) -> str:
    """The request ids of a batch's admitted, unsettled lines (a Redis set)."""
    return f"{settings.ENGINE_KEY_PREFIX}:batch-running:{batch_id}"


async def _release_lines_of_a_dead_run(batch: Batch, redis: Redis) -> None:
    """Lines a killed worker had admitted never settled: free their slots and holds now (the lines
    run again below) rather than when their leases expire."""
    key = _running_key(batch.pk)
    if batch.api_key is None:  # the key was deleted: its holds lapse with their leases
        await redis.delete(key)
        return
    for request_id in await redis.smembers(key):
        await release_abandoned(redis=redis, api_key=batch.api_key, request_id=request_id.decode(),
                                key_prefix=settings.ENGINE_KEY_PREFIX)
        await redis.srem(key, request_id)


def _load(batch_id: str) -> Batch | None:
    return Batch.objects.select_related("api_key__tenant").filter(pk=batch_id).first()


@transaction.atomic
def prepare_lines(*, batch: Batch) -> Batch:
    """Validate the input file into one BatchLine per line (bad lines already answered with their error)."""
    content = File.objects.filter(pk=batch.input_file_id).values_list("content", flat=True).first()
    lines = parse_input(content=bytes(content), endpoint=batch.endpoint) if content is not None else []
    if not lines or batch.api_key is None:
        problem = ("The input file has no requests." if content is not None else "The input file was deleted.")
        problem = problem if batch.api_key is not None else "The API key of this batch was deleted."
        Batch.objects.filter(pk=batch.pk).update(status=BatchStatus.FAILED, failed_at=timezone.now(), errors=[
            {"code": "invalid_input_file" if batch.api_key else "api_key_deleted", "message": problem,
             "param": None, "line": None}])
        return _load(batch.pk)
    BatchLine.objects.bulk_create(
        [BatchLine(batch=batch, index=line.index, custom_id=line.custom_id, body=line.body,
                   result=None if line.error is None else output_line(custom_id=line.custom_id, error=line.error),
                   succeeded=None if line.error is None else False) for line in lines],
        batch_size=1000)
    invalid = sum(line.error is not None for line in lines)
    Batch.objects.filter(pk=batch.pk).update(total_requests=len(lines), failed_requests=invalid)
    Batch.objects.filter(pk=batch.pk, status=BatchStatus.VALIDATING).update(
        status=BatchStatus.IN_PROGRESS, in_progress_at=timezone.now())
    logger.info("batch %s: %d lines, %d invalid", batch.pk, len(lines), invalid)
    return _load(batch.pk)


class _PendingLines:
    """The batch's lines without a result, read a page at a time and handed to one worker each."""

    def __init__(self, batch_id: str) -> None:
        self.batch_id, self.after, self.page, self.done = batch_id, 0, [], False
        self.lock = asyncio.Lock()

    async def next(self) -> tuple[int, str, dict] | None:
        async with self.lock:
            if not self.page and not self.done:
                self.page = await sync_to_async(lambda: list(BatchLine.objects.filter(
                    batch_id=self.batch_id, succeeded__isnull=True, pk__gt=self.after).order_by("pk").values_list(
                    "pk", "custom_id", "body")[:PAGE]))()
                self.done = len(self.page) < PAGE
                self.page.reverse()
            if not self.page:
                return None
            line = self.page.pop()
            self.after = line[0]
            return line


class _NotNow(Exception):
    """The line must wait past the end of this slice: it stays pending for the next one."""

    def __init__(self, wait_s: float) -> None:
        super().__init__(wait_s)
        self.wait_s = wait_s


@dataclass
class SliceEnd:
    """Why a slice stopped: "done" (no line left, or the watcher stopped it: cancelled or
    expired), "slice" (lines are left: run again `again_in_s` later) or "key" (key refused)."""

    reason: str = "done"
    again_in_s: float = 0.0


async def _run_lines(batch: Batch, lease, slot: LeaseSemaphore) -> SliceEnd:
    """Run the lines without a result, `BATCH_CONCURRENCY` at a time, for at most one slice."""
    pending, loop = _PendingLines(batch.pk), asyncio.get_running_loop()
    slice_ends = loop.time() + settings.BATCH_SLICE_S
    end = SliceEnd()

    async def work() -> None:
        while end.reason == "done":
            if loop.time() >= slice_ends:
                end.reason = "slice"
                return
            try:  # before each line, as an interactive call authenticates before each call
                api_key = await sync_to_async(live_batch_key)(prefix=batch.api_key.prefix if batch.api_key else None)
            except KeyRefused:
                end.reason = "key"
                return
            line = await pending.next()
            if line is None:
                return
            line_id, custom_id, body = line
            try:
                result, succeeded, usage = await run_line(batch=batch, api_key=api_key, custom_id=custom_id,
                                                          body=body, give_up_at=slice_ends)
            except _NotNow as wait:  # this worker is done for the slice; the others go on
                if end.reason != "key":
                    end.reason, end.again_in_s = "slice", max(end.again_in_s, wait.wait_s)
                return
            await sync_to_async(save_line_result)(batch_id=batch.pk, line_id=line_id, result=result,
                                                  succeeded=succeeded, usage=usage)

    workers = [asyncio.create_task(work()) for _ in range(settings.BATCH_CONCURRENCY)]
    watcher = asyncio.create_task(_watch(batch, lease, slot, workers))
    await asyncio.gather(*workers, return_exceptions=True)
    stopped = watcher.done() and not watcher.cancelled() and watcher.exception() is None
    watcher.cancel()
    for outcome in [w.exception() for w in workers if not w.cancelled()]:
        if outcome is not None:
            raise outcome
    return SliceEnd() if stopped else end


async def _watch(batch: Batch, lease, slot: LeaseSemaphore, workers: list[asyncio.Task]) -> None:
    """Renew the leases; on cancel or expiry stop the workers (their running calls are aborted)."""
    while True:
        await asyncio.sleep(WATCH_EVERY_S)
        await lease.reacquire()
        await slot.acquire()
        status = await sync_to_async(lambda: Batch.objects.values_list("status", flat=True).get(pk=batch.pk))()
        if status == BatchStatus.CANCELLING or timezone.now() >= batch.expires_at:
            logger.info("batch %s: %s, stopping its lines", batch.pk, status)
            for worker in workers:
                worker.cancel()
            return


async def run_line(*, batch: Batch, api_key, custom_id: str, body: dict,
                   give_up_at: float) -> tuple[dict, bool, Usage]:
    """One request as the API would run it: its output line, whether it succeeded, and its usage.

    A refusal that waiting cures (rate limits, no engine) is retried until `give_up_at` (the loop's
    clock), then _NotNow; one that never can (a request larger than the key's tokens per minute:
    `x-should-retry: false`) fails the line at once, as any other error does."""
    serializer_class, start = BY_PATH[batch.endpoint].serializer, BY_PATH[batch.endpoint].start
    loop = asyncio.get_running_loop()
    while True:
        try:
            call = await start(api_key=api_key, data=_validated(serializer_class, body),
                               priority_offset=settings.BATCH_PRIORITY_OFFSET)
            break
        except OpenAIError as error:
            if error.code not in RETRYABLE_CODES or error.headers.get("x-should-retry") == "false":
                return _error_line(custom_id, error, request_id=None), False, Usage(0, 0, 0)
            wait = float(error.headers.get("Retry-After", 1))
            if loop.time() + wait >= give_up_at:
                raise _NotNow(wait) from None
            await asyncio.sleep(wait)
    redis, running = get_engine_client().redis, _running_key(batch.pk)
    try:
        await redis.sadd(running, call.plan.request_id)  # until settled, for a run after this worker dies
        await redis.expire(running, RUNNING_TTL_S)
        response = {"status_code": 200, "request_id": call.plan.request_id, "body": await call.collect()}
        return output_line(custom_id=custom_id, response=response), True, call.usage
    except OpenAIError as error:
        return _error_line(custom_id, error, request_id=call.plan.request_id), False, call.usage
    finally:
        await call.close()
        await redis.srem(running, call.plan.request_id)


def _validated(serializer_class, body: dict) -> dict:
    data = validated(serializer_class, body)
    if data["stream"]:
        raise OpenAIError("stream is not supported in batch requests.", param="stream")
    return data


def _error_line(custom_id: str, error: OpenAIError, *, request_id: str | None) -> dict:
    return output_line(custom_id=custom_id, response={"status_code": error.status, "request_id": request_id,
                                                      "body": error.body()})


@transaction.atomic
def save_line_result(*, batch_id: str, line_id: int, result: dict, succeeded: bool, usage: Usage) -> None:
    """Store a line's output once; the batch's counters move only with the line that was stored."""
    if not BatchLine.objects.filter(pk=line_id, succeeded__isnull=True).update(result=result, succeeded=succeeded):
        return
    Batch.objects.filter(pk=batch_id).update(
        completed_requests=F("completed_requests") + int(succeeded),
        failed_requests=F("failed_requests") + int(not succeeded),
        prompt_tokens=F("prompt_tokens") + usage.prompt_tokens,
        completion_tokens=F("completion_tokens") + usage.completion_tokens,
        cached_tokens=F("cached_tokens") + usage.cached_tokens)


def finalize(*, batch_id: str, failure: dict | None = None) -> None:
    """Write the output and error files and end the batch: completed, cancelled or expired; or
    failed with `failure` as its error (its key was revoked: the lines not run say so)."""
    now = timezone.now()
    if failure is None:
        Batch.objects.filter(pk=batch_id, status=BatchStatus.IN_PROGRESS, expires_at__gt=now).update(
            status=BatchStatus.FINALIZING, finalizing_at=now)
    with transaction.atomic():
        batch = Batch.objects.select_for_update().get(pk=batch_id)
        if batch.is_finished:
            return
        ending = BatchStatus.FAILED if failure else {
            BatchStatus.FINALIZING: BatchStatus.COMPLETED, BatchStatus.CANCELLING: BatchStatus.CANCELLED}.get(
            batch.status, BatchStatus.EXPIRED)
        not_run = (failure or {}).get("code") or (
            "batch_cancelled" if ending == BatchStatus.CANCELLED else "batch_expired")
        outputs, errors = [], []
        for custom_id, result, succeeded in BatchLine.objects.filter(batch=batch).order_by("index").values_list(
                "custom_id", "result", "succeeded").iterator(chunk_size=2000):
            if result is None:  # never ran: cancelled, expired or stopped first
                result = output_line(custom_id=custom_id, error={
                    "code": not_run, "message": f"This line was not run: the batch {ending}"
                                                + (f" ({failure['message']})" if failure else ".")})
            (outputs if succeeded else errors).append(result)
        batch.output_file = _result_file(batch, outputs, FilePurpose.BATCH_OUTPUT, "output")
        batch.error_file = _result_file(batch, errors, FilePurpose.BATCH_ERROR, "error")
        batch.status = ending
        ended_at = {BatchStatus.COMPLETED: "completed_at", BatchStatus.CANCELLED: "cancelled_at",
                    BatchStatus.FAILED: "failed_at"}.get(ending, "expired_at")
        setattr(batch, ended_at, timezone.now())
        fields = ["output_file", "error_file", "status", ended_at]
        if failure:
            batch.errors = [failure]
            fields.append("errors")
        batch.save(update_fields=fields)
    logger.info("batch %s: %s, %d ok, %d failed", batch_id, ending, batch.completed_requests, batch.failed_requests)


def _result_file(batch: Batch, lines: list[dict], purpose: str, kind: str) -> File | None:
    if not lines:
        return None
    content = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
    return create_file(tenant=batch.tenant, purpose=purpose, filename=f"{batch.pk}_{kind}.jsonl", content=content)
