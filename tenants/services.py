"""Writes of the tenants app (HackSoft style: services write, selectors read).

Every change of a tenant or key writes its audit entry in the same transaction.
"""
from collections.abc import Iterable
from datetime import UTC, date, datetime, time, timedelta

from django.db import IntegrityError, transaction
from django.db.models import Count, Exists, OuterRef, Q, Sum
from django.utils import timezone

from tenants.audit import Actor, created, record_audit
from tenants.errors import TenantAlreadyExists
from tenants.keys import generate_key, hash_key
from tenants.models import ApiKey, DailyUsage, Tenant, UsageEvent, UsageStatus

# Fields of Tenant that create_tenant accepts as limits.
TENANT_LIMIT_FIELDS = (
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
    "token_budget",
    "budget_period",
    "max_tokens_cap",
    "max_prompt_tokens",
    "priority_tier",
    "max_sequences_per_request",
    "max_sequences_in_flight",
    "sampling_defaults",
)
# Settings of an ApiKey that its creator chooses (and a rotation carries over).
API_KEY_SETTINGS = (
    "name",
    "allowed_models",
    "expires_at",
    "requests_per_minute",
    "tokens_per_minute",
    "max_concurrent_requests",
)
LAST_USED_RESOLUTION = timedelta(minutes=1)  # ApiKey.last_used_at: one write a minute, not one per call


def create_tenant(*, name: str, is_active: bool = True, actor: Actor = None, **limits) -> Tenant:
    """A validated tenant; limits left out take the model defaults.

    Unknown limit names are a TypeError (a typo must not silently fall back to
    a default); a taken name is TenantAlreadyExists.
    """
    unknown = set(limits) - set(TENANT_LIMIT_FIELDS)
    if unknown:
        raise TypeError(f"unknown tenant limits: {', '.join(sorted(unknown))}")
    tenant = Tenant(name=name, is_active=is_active, **limits)
    if Tenant.objects.filter(name=name).exists():
        raise TenantAlreadyExists(f"tenant {name!r} already exists")
    tenant.full_clean()
    try:
        with transaction.atomic():
            tenant.save()
            record_audit(
                actor=actor, action="tenant.create", target=tenant,
                changes=created(tenant, ("name", "is_active", *TENANT_LIMIT_FIELDS)),
            )
    except IntegrityError as exc:  # a concurrent create won the race
        raise TenantAlreadyExists(f"tenant {name!r} already exists") from exc
    return tenant


@transaction.atomic
def update_tenant(*, tenant: Tenant, actor: Actor = None, **fields) -> Tenant:
    """Change `tenant`'s limits or `is_active`; the audit entry lists only the fields that changed.

    Unknown field names are a TypeError, as in create_tenant; changing nothing logs nothing.
    """
    unknown = set(fields) - {"is_active", *TENANT_LIMIT_FIELDS}
    if unknown:
        raise TypeError(f"unknown tenant fields: {', '.join(sorted(unknown))}")
    changes = {f: [getattr(tenant, f), new] for f, new in fields.items() if getattr(tenant, f) != new}
    if not changes:
        return tenant
    for field, (_, new) in changes.items():
        setattr(tenant, field, new)
    tenant.full_clean()
    tenant.save(update_fields=list(changes))
    record_audit(actor=actor, action="tenant.update", target=tenant, changes=changes)
    return tenant


@transaction.atomic
def create_api_key(
    *,
    tenant: Tenant,
    name: str = "",
    allowed_models: Iterable[str] = (),
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent_requests: int | None = None,
    actor: Actor = None,
) -> tuple[ApiKey, str]:
    """A new key of `tenant` and the full key, which is returned here once and stored nowhere."""
    api_key, raw_key = _issue_api_key(
        tenant=tenant,
        name=name,
        allowed_models=list(allowed_models),
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_concurrent_requests=max_concurrent_requests,
    )
    record_audit(
        actor=actor, action="api_key.create", target=api_key,
        changes=created(api_key, API_KEY_SETTINGS),
    )
    return api_key, raw_key


@transaction.atomic
def revoke_api_key(*, api_key: ApiKey, actor: Actor = None) -> ApiKey:
    """Mark the key revoked now; revoking twice keeps the first time (and logs only the first)."""
    changes = _revoke(api_key)
    if changes:
        record_audit(actor=actor, action="api_key.revoke", target=api_key, changes=changes)
    return api_key


@transaction.atomic
def rotate_api_key(*, api_key: ApiKey, actor: Actor = None) -> tuple[ApiKey, str]:
    """Revoke `api_key` and issue a replacement with the same tenant, name, models and limits."""
    changes = _revoke(api_key)
    new_key, raw_key = _issue_api_key(
        tenant=api_key.tenant, **{field: getattr(api_key, field) for field in API_KEY_SETTINGS}
    )
    changes["replaced_by"] = [None, new_key.prefix]
    record_audit(actor=actor, action="api_key.rotate", target=api_key, changes=changes)
    return new_key, raw_key


def _issue_api_key(*, tenant: Tenant, **settings) -> tuple[ApiKey, str]:
    """A new, saved key; its caller writes the audit entry (a create or a rotation)."""
    for _ in range(5):  # prefix collisions are ~1e-12 likely; retry instead of failing
        prefix, raw_key = generate_key()
        if not ApiKey.objects.filter(prefix=prefix).exists():
            break
    api_key = ApiKey(tenant=tenant, prefix=prefix, hashed_key=hash_key(raw_key), **settings)
    api_key.full_clean()
    api_key.save()
    return api_key, raw_key


def _revoke(api_key: ApiKey) -> dict[str, list]:
    """Revoke the key unless it already is; returns the change made, for the audit entry."""
    if api_key.revoked_at is not None:
        return {}
    api_key.revoked_at = timezone.now()
    api_key.save(update_fields=["revoked_at"])
    return {"revoked_at": [None, api_key.revoked_at]}


def usage_event(
    *,
    api_key: ApiKey,
    request_id: str,
    model: str,
    endpoint: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
    status: str = UsageStatus.OK,
    error_code: str = "",
    latency_ms: int | None = None,
    ttft_ms: int | None = None,
    user: str = "",
) -> UsageEvent:
    """The (unsaved) usage event of a request that ends now; a bad status is a ValueError here,
    where the call is, not a row the usage flush cannot write."""
    return UsageEvent(
        tenant_id=api_key.tenant_id, api_key=api_key, request_id=request_id, model=model,
        endpoint=endpoint, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
        cached_tokens=cached_tokens, status=UsageStatus(status), error_code=error_code,
        latency_ms=latency_ms, ttft_ms=ttft_ms, user=user,
    )


def record_usage(**fields) -> UsageEvent:
    """Write the usage event of one request now (`usage_event`'s arguments); recording a request
    twice keeps (and returns) the first. API calls buffer theirs instead (tenants.usage_buffer)."""
    event = usage_event(**fields)
    record_usage_events(events=[event])
    return UsageEvent.objects.get(request_id=event.request_id)


@transaction.atomic
def record_usage_events(*, events: list[UsageEvent]) -> None:
    """Insert unsaved usage events in one statement, and note their keys' use.

    A request_id already recorded keeps its first event, so writing a batch twice is harmless.
    Events of tenants deleted since are dropped, and deleted keys are left out, as the foreign
    keys' on_delete would have done had the events been written before.
    """
    tenants = set(Tenant.objects.filter(pk__in={e.tenant_id for e in events}).values_list("pk", flat=True))
    keys = set(ApiKey.objects.filter(pk__in={e.api_key_id for e in events}).values_list("pk", flat=True))
    kept = [e for e in events if e.tenant_id in tenants]
    for event in kept:
        if event.api_key_id not in keys:
            event.api_key_id = None
    UsageEvent.objects.bulk_create(kept, ignore_conflicts=True)
    _touch_api_keys(pks=keys)


def _touch_api_keys(*, pks: set[int]) -> None:
    """last_used_at of the keys `pks`, written at most once a minute per key (an update(), so
    cached keys stay cached: tenants.key_cache)."""
    now = timezone.now()
    ApiKey.objects.filter(pk__in=pks).filter(
        Q(last_used_at__isnull=True) | Q(last_used_at__lt=now - LAST_USED_RESOLUTION)
    ).update(last_used_at=now)


@transaction.atomic
def roll_up_usage(*, day: date) -> int:
    """Recompute the DailyUsage rows of UTC `day` from its usage events; returns their number.

    Upserts rather than delete-and-insert, so two overlapping runs cannot collide on the
    unique (tenant, day, model); rows whose events are all gone are removed.
    """
    start = datetime.combine(day, time.min, tzinfo=UTC)
    events = UsageEvent.objects.filter(
        created_at__gte=start, created_at__lt=start + timedelta(days=1)
    )
    totals = events.order_by().values("tenant_id", "model").annotate(
        request_count=Count("id"),
        error_count=Count("id", filter=Q(status=UsageStatus.ERROR)),
        prompt=Sum("prompt_tokens"),
        completion=Sum("completion_tokens"),
    )
    rows = [
        DailyUsage(
            tenant_id=row["tenant_id"], day=day, model=row["model"],
            requests=row["request_count"], errors=row["error_count"],
            prompt_tokens=row["prompt"], completion_tokens=row["completion"],
        )
        for row in totals
    ]
    DailyUsage.objects.bulk_create(
        rows,
        update_conflicts=True,
        unique_fields=["tenant", "day", "model"],
        update_fields=["requests", "errors", "prompt_tokens", "completion_tokens"],
    )
    DailyUsage.objects.filter(day=day).exclude(
        Exists(events.filter(tenant=OuterRef("tenant"), model=OuterRef("model")))
    ).delete()
    return len(rows)
