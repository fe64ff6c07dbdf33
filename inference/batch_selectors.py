"""Reads of the Batch API, always scoped to one tenant: another tenant's objects do not exist here."""
from __future__ import annotations

from django.db.models import Q, QuerySet
from django.utils import timezone

from inference.models import Batch, File
from tenants.models import Tenant


def live_files(*, tenant: Tenant) -> QuerySet[File]:
    """The tenant's files not past their expiry: an expired file is gone (404) before it is deleted."""
    return File.objects.filter(tenant=tenant).filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()))


def get_file(*, tenant: Tenant, file_id: str) -> File | None:
    """The file's metadata (its content is left in the database)."""
    return live_files(tenant=tenant).defer("content").filter(id=file_id).first()


def get_file_content(*, tenant: Tenant, file_id: str) -> bytes | None:
    content = live_files(tenant=tenant).filter(id=file_id).values_list("content", flat=True).first()
    return None if content is None else bytes(content)


def get_batch(*, tenant: Tenant, batch_id: str) -> Batch | None:
    return Batch.objects.filter(tenant=tenant, id=batch_id).first()


def list_batches(*, tenant: Tenant, after: str | None, limit: int) -> tuple[list[Batch], bool]:
    """One page of the tenant's batches, newest first, after the batch `after`; and whether more follow."""
    batches: QuerySet[Batch] = Batch.objects.filter(tenant=tenant).order_by("-created_at", "-id")
    cursor = get_batch(tenant=tenant, batch_id=after) if after else None
    if cursor is not None:
        batches = batches.filter(Q(created_at__lt=cursor.created_at) | Q(created_at=cursor.created_at,
                                                                          id__lt=cursor.id))
    page = list(batches[:limit + 1])
    return page[:limit], len(page) > limit
