"""Reads of the tenants app (HackSoft style: selectors read, services write)."""
import hmac
import logging
from datetime import date, datetime

from django.db.models import F, QuerySet, Sum
from django.utils import timezone

from tenants.db_connection import release_connection_after
from tenants.errors import InvalidApiKey
from tenants.key_cache import api_key_cache
from tenants.keys import hash_key, split_key
from tenants.limits import EffectiveLimits
from tenants.models import ApiKey, DailyUsage, Tenant, UsageEvent

logger = logging.getLogger(__name__)


def authenticate_api_key(*, raw_key: str) -> ApiKey:
    """The live key behind `raw_key`, or InvalidApiKey saying why not.

    The prefix finds the row, from this process's key cache when it can (no query: this runs on
    every API call); the hash is compared in constant time so the response time leaks nothing
    about how much of the secret was right; revocation, expiry and the tenant are checked on
    every call. Use is recorded with the call's usage event (tenants.usage_buffer).
    """
    parts = split_key(raw_key) if isinstance(raw_key, str) else None
    if parts is None:
        raise _refused("(malformed)", InvalidApiKey.MALFORMED)
    api_key = api_key_cache.get(prefix=parts[0], load=lambda: _api_key_with_tenant(prefix=parts[0]))
    if api_key is None or not hmac.compare_digest(api_key.hashed_key, hash_key(raw_key)):
        raise _refused(parts[0], InvalidApiKey.UNKNOWN)
    if api_key.revoked_at is not None:
        raise _refused(parts[0], InvalidApiKey.REVOKED)
    if api_key.expires_at is not None and api_key.expires_at <= timezone.now():
        raise _refused(parts[0], InvalidApiKey.EXPIRED)
    if not api_key.tenant.is_active:
        raise _refused(parts[0], InvalidApiKey.TENANT_INACTIVE)
    return api_key


def _refused(prefix: str, reason: str) -> InvalidApiKey:
    """The reason goes to the log only: callers answer every refusal alike (no probing for revoked keys)."""
    logger.info("API key %s refused: %s", prefix, reason)
    return InvalidApiKey(reason)


@release_connection_after
def _api_key_with_tenant(*, prefix: str) -> ApiKey | None:
    return ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()


def effective_limits(*, api_key: ApiKey) -> EffectiveLimits:
    """The tenant's limits with the key's non-null overrides on top."""
    tenant = api_key.tenant

    def pick(field: str) -> int:
        override = getattr(api_key, field)
        return getattr(tenant, field) if override is None else override

    return EffectiveLimits(
        requests_per_minute=pick("requests_per_minute"),
        tokens_per_minute=pick("tokens_per_minute"),
        max_concurrent_requests=pick("max_concurrent_requests"),
        token_budget=tenant.token_budget,
        budget_period=tenant.budget_period,
        max_tokens_cap=tenant.max_tokens_cap,
        max_prompt_tokens=tenant.max_prompt_tokens,
        priority_tier=tenant.priority_tier,
        max_sequences_per_request=tenant.max_sequences_per_request,
        max_sequences_in_flight=tenant.max_sequences_in_flight,
        sampling_defaults=dict(tenant.sampling_defaults or {}),
    )


def model_allowed(*, api_key: ApiKey, model: str) -> bool:
    """Whether the key may call `model`; an empty allowlist allows every model."""
    return not api_key.allowed_models or model in api_key.allowed_models


def get_tenant_keys(*, tenant: Tenant) -> QuerySet[ApiKey]:
    """Keys of `tenant` only: the one query views should use so no tenant sees another's keys."""
    return ApiKey.objects.filter(tenant=tenant).order_by("-created_at")


def get_tenant_by_name(*, name: str) -> Tenant | None:
    return Tenant.objects.filter(name=name).first()


def get_tenant_usage_events(
    *, tenant: Tenant, since: datetime | None = None
) -> QuerySet[UsageEvent]:
    """Usage events of `tenant` only, newest first."""
    events = UsageEvent.objects.filter(tenant=tenant)
    if since is not None:
        events = events.filter(created_at__gte=since)
    return events.order_by("-created_at")


def get_tenant_daily_usage(*, tenant: Tenant, since: date | None = None) -> QuerySet[DailyUsage]:
    """Daily roll-ups of `tenant` only, newest day first."""
    rows = DailyUsage.objects.filter(tenant=tenant)
    if since is not None:
        rows = rows.filter(day__gte=since)
    return rows.order_by("-day", "model")


def tokens_used_in_period(*, tenant: Tenant, period_start: datetime) -> int:
    """Prompt + completion tokens `tenant` used since `period_start`: the quota's database truth."""
    total = get_tenant_usage_events(tenant=tenant, since=period_start).aggregate(
        tokens=Sum(F("prompt_tokens") + F("completion_tokens"))
    )["tokens"]
    return total or 0
