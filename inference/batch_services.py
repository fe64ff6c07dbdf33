"""Writes of the Batch API: files in, batches created and cancelled, stalled batches resumed.

The work itself happens in a Celery worker (`inference.batch_runner`); these only record intent
and enqueue it once the transaction has committed, so a worker never looks for a row not yet there.
"""
from __future__ import annotations

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from inference.models import Batch, BatchStatus, File
from tenants.models import ApiKey, Tenant

COMPLETION_WINDOWS = {"24h": timedelta(hours=24)}


def create_file(*, tenant: Tenant, purpose: str, filename: str, content: bytes) -> File:
    return File.objects.create(tenant=tenant, purpose=purpose, filename=filename, bytes=len(content),
                               content=content)


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


def _enqueue(batch_id: str) -> None:
    from inference.tasks import run_batch  # tasks import the runner, which imports these services' models

    transaction.on_commit(lambda: run_batch.delay(batch_id))
