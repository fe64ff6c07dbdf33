"""Writes of the Batch API: files in, batches created and cancelled, stalled batches resumed.

The work itself happens in a Celery worker (`inference.batch_runner`); these only record intent
and enqueue it once the transaction has committed, so a worker never looks for a row not yet there.
"""
from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Sum
from django.utils import timezone

from inference.batch_selectors import live_files
from inference.errors import OpenAIError
from inference.models import Batch, BatchStatus, File
from tenants.models import ApiKey, Tenant

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}


def create_file(*, tenant: Tenant, purpose: str, filename: str, content: bytes) -> File:
    """A file that expires after FILES_RETENTION_DAYS (a batch's own output and error files too)."""
    return File.objects.create(tenant=tenant, purpose=purpose, filename=filename, bytes=len(content),
                               content=content,
                               expires_at=timezone.now() + timedelta(days=settings.FILES_RETENTION_DAYS))


@transaction.atomic
def upload_file(*, tenant: Tenant, purpose: str, filename: str, content: bytes) -> File:
    """`create_file` within the tenant's storage cap (FILES_MAX_BYTES_PER_TENANT), or a 400.

    The tenant's row is locked while its files are summed and the new one written, so parallel
    uploads are counted one after another and cannot pass the cap together (PostgreSQL; SQLite
    writes one transaction at a time anyway). A batch's output is never refused: it counts here."""
    Tenant.objects.select_for_update().filter(pk=tenant.pk).first()
    used = live_files(tenant=tenant).aggregate(total=Sum("bytes"))["total"] or 0
    if used + len(content) > settings.FILES_MAX_BYTES_PER_TENANT:
        raise OpenAIError(f"Storing this file ({len(content)} bytes) would take tenant {tenant.name!r} past its "
                          f"storage limit of {settings.FILES_MAX_BYTES_PER_TENANT} bytes ({used} in use). Delete "
                          "files you no longer need, or wait for them to expire.", param="file",
                          code="storage_limit_exceeded")
    return create_file(tenant=tenant, purpose=purpose, filename=filename, content=content)


def delete_expired_files(*, chunk: int = 500) -> int:
    """Delete files past their expiry (a beat task); batches keep the ids of their deleted files."""
    deleted = 0
    while ids := list(File.objects.filter(expires_at__lte=timezone.now()).values_list("id", flat=True)[:chunk]):
        deleted += File.objects.filter(id__in=ids).delete()[0]
    return deleted


def delete_file(*, file: File) -> None:
    """Batches keep the id of a deleted input file; output files they point to are unlinked."""
    file.delete()


@transaction.atomic
def create_batch(*, api_key: ApiKey, input_file: File, endpoint: str, completion_window: str,
                 metadata: dict | None) -> Batch:
    batch = Batch.objects.create(
        tenant=api_key.tenant, api_key=api_key, input_file=input_file, endpoint=endpoint,
        completion_window=completion_window, metadata=metadata,
        expires_at=timezone.now() + COMPLETION_WINDOWS[completion_window])
    _enqueue(batch.id)
    return batch


def cancel_batch(*, batch: Batch) -> Batch:
    """Ask the batch's worker to stop: it aborts running lines and ends `cancelled` with what is done.

    A batch that already finished (or is being finalized) is returned unchanged.
    """
    now = timezone.now()
    active = [BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS]
    if Batch.objects.filter(pk=batch.pk, status__in=active).update(status=BatchStatus.CANCELLING, cancelling_at=now):
        _enqueue(batch.id)  # a batch no worker holds (still queued, or its worker died) ends too
    batch.refresh_from_db()
    return batch


def resume_unfinished_batches() -> int:
    """Enqueue every batch not yet finished; the runner's lease makes extra runs return at once."""
    ids = list(Batch.objects.filter(status__in=[BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS,
                                                BatchStatus.FINALIZING, BatchStatus.CANCELLING])
               .values_list("id", flat=True))
    for batch_id in ids:
        _enqueue(batch_id)
    return len(ids)


def requeue_after_slice(*, tenant_id: int, batch_id: str, again_in_s: float | None) -> None:
    """After a slice of `batch_id` freed one of its tenant's slots: queue the tenant's other
    unfinished batches, the ones after it first (round robin by id, as many as may run at once),
    then the batch itself (`again_in_s` later; None: it ended). All go behind what other tenants
    queued meanwhile; those that find the slots taken return at once."""
    others = list(Batch.objects.filter(tenant_id=tenant_id, status__in=[BatchStatus.VALIDATING,
                                                                        BatchStatus.IN_PROGRESS])
                  .exclude(id=batch_id).order_by("id").values_list("id", flat=True))
    turn = [other for other in others if other > batch_id] + [other for other in others if other < batch_id]
    for other in turn[:settings.BATCH_SLOTS_PER_TENANT]:
        _enqueue(other)
    if again_in_s is not None:
        _enqueue(batch_id, countdown=again_in_s)


def _enqueue(batch_id: str, countdown: float = 0) -> None:
    from inference.tasks import run_batch  # tasks import the runner, which imports these services' models

    transaction.on_commit(lambda: run_batch.apply_async(args=[batch_id], countdown=countdown or None))
