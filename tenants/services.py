"""Writes of the tenants app (HackSoft style: services write, selectors read)."""
from collections.abc import Iterable
from datetime import datetime

from django.db import IntegrityError, transaction
from django.utils import timezone

from tenants.errors import TenantAlreadyExists
from tenants.keys import generate_key, hash_key
from tenants.models import ApiKey, Tenant

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
)


def create_tenant(*, name: str, is_active: bool = True, **limits) -> Tenant:
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
    except IntegrityError as exc:  # a concurrent create won the race
        raise TenantAlreadyExists(f"tenant {name!r} already exists") from exc
    return tenant


def create_api_key(
    *,
    tenant: Tenant,
    name: str = "",
    allowed_models: Iterable[str] = (),
    expires_at: datetime | None = None,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    max_concurrent_requests: int | None = None,
) -> tuple[ApiKey, str]:
    """A new key of `tenant` and the full key, which is returned here once and stored nowhere."""
    for _ in range(5):  # prefix collisions are ~1e-12 likely; retry instead of failing
        prefix, raw_key = generate_key()
        if not ApiKey.objects.filter(prefix=prefix).exists():
            break
    api_key = ApiKey(
        tenant=tenant,
        name=name,
        prefix=prefix,
        hashed_key=hash_key(raw_key),
        allowed_models=list(allowed_models),
        expires_at=expires_at,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        max_concurrent_requests=max_concurrent_requests,
    )
    api_key.full_clean()
    api_key.save()
    return api_key, raw_key


def revoke_api_key(*, api_key: ApiKey) -> ApiKey:
    """Mark the key revoked now; revoking twice keeps the first time."""
    if api_key.revoked_at is None:
        api_key.revoked_at = timezone.now()
        api_key.save(update_fields=["revoked_at"])
    return api_key


@transaction.atomic
def rotate_api_key(*, api_key: ApiKey) -> tuple[ApiKey, str]:
    """Revoke `api_key` and issue a replacement with the same tenant, name, models and limits."""
    revoke_api_key(api_key=api_key)
    return create_api_key(
        tenant=api_key.tenant,
        name=api_key.name,
        allowed_models=api_key.allowed_models,
        expires_at=api_key.expires_at,
        requests_per_minute=api_key.requests_per_minute,
        tokens_per_minute=api_key.tokens_per_minute,
        max_concurrent_requests=api_key.max_concurrent_requests,
    )


def touch_api_key(*, api_key: ApiKey) -> None:
    """Record use of the key without a read-modify-write of the whole row."""
    now = timezone.now()
    ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
    api_key.last_used_at = now
