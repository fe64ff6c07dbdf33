"""Reads behind the operator dashboard (HackSoft style: selectors read, services write).

Usage comes from two places: DailyUsage for past days (rolled up every few minutes by Celery
beat) and the raw UsageEvents for today, whose roll-up always lags. Engine status comes from the
replicas' heartbeats in Redis; batch jobs from inference.Batch, looked up lazily because the
dashboard must work whether or not the batch API is installed.
"""
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta

import redis
from django.apps import apps
from django.conf import settings
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import TruncDate
from django.utils import timezone

from engine.service.protocol import Heartbeat, ProtocolError, decode_heartbeat
from engine.service.transport import Keys
from tenants.models import AuditLog, DailyUsage, Tenant, UsageEvent, UsageStatus
from tenants.quota import period_bounds
from tenants.selectors import tokens_used_in_period

WINDOW_DAYS = 14


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    errors: int = 0

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def add(self, row: dict) -> None:
        self.prompt_tokens += row["prompt"] or 0
        self.completion_tokens += row["completion"] or 0
        self.requests += row["request_count"] or 0
        self.errors += row["error_count"] or 0


@dataclass(frozen=True)
class ModelStatus:
    """One model's live replicas, summed (the KV usage is the fullest replica's)."""

    model: str
    replicas: list[Heartbeat]

    @property
    def queue_depth(self) -> int:
        return sum(beat.queue_depth + beat.num_waiting for beat in self.replicas)

    @property
    def num_running(self) -> int:
        return sum(beat.num_running for beat in self.replicas)

    @property
    def kv_cache_percent(self) -> float:
        return 100 * max((beat.kv_cache_usage for beat in self.replicas), default=0.0)

    @property
    def tokens_per_s(self) -> float:
        return sum(beat.tokens_per_s for beat in self.replicas)

    @property
    def lora_adapters(self) -> list[str]:
        """LoRA adapters loaded on at least one replica."""
        return sorted({name for beat in self.replicas for name in beat.lora_adapters})


@dataclass(frozen=True)
class BudgetStatus:
    budget: int | None  # None: unlimited
    used: int
    period: str

    @property
    def percent(self) -> float | None:
        return None if not self.budget else min(100.0, 100 * self.used / self.budget)


def utc_today() -> date:
    return timezone.now().astimezone(UTC).date()


def usage_by_day(*, tenant: Tenant | None = None, days: int = WINDOW_DAYS) -> list[tuple[date, Usage]]:
    """Usage per UTC day of the last `days` days, oldest first, days without traffic as zeros."""
    totals = _usage_totals(key="day", tenant=tenant, days=days)
    first = utc_today() - timedelta(days=days - 1)
    return [(day, totals.get(day, Usage())) for day in (first + timedelta(n) for n in range(days))]


def top_tenants(*, limit: int = 5, days: int = WINDOW_DAYS) -> list[tuple[Tenant, Usage]]:
    """The tenants that used the most tokens in the last `days` days, most first."""
    totals = _usage_totals(key="tenant", days=days)
    ranked = sorted(totals.items(), key=lambda item: item[1].tokens, reverse=True)[:limit]
    tenants = Tenant.objects.in_bulk([tenant_id for tenant_id, _ in ranked])
    return [(tenants[tenant_id], usage) for tenant_id, usage in ranked if tenant_id in tenants]


def usage_by_model(*, tenant: Tenant, days: int = WINDOW_DAYS) -> list[tuple[str, Usage]]:
    """`tenant`'s usage of the last `days` days per model, most tokens first; a LoRA adapter's calls
    count under the adapter's name (the model they named), not its base model's."""
    totals = _usage_totals(key="model", tenant=tenant, days=days)
    return sorted(totals.items(), key=lambda item: (-item[1].tokens, item[0]))


def _usage_totals(*, key: str, days: int, tenant: Tenant | None = None) -> dict:
    """Usage summed by `key` ("day", "tenant" or "model"): roll-ups before today plus today's events."""
    today = utc_today()
    rollups = DailyUsage.objects.filter(day__gte=today - timedelta(days=days - 1), day__lt=today)
    events = UsageEvent.objects.filter(created_at__gte=datetime.combine(today, time.min, tzinfo=UTC))
    if tenant is not None:
        rollups, events = rollups.filter(tenant=tenant), events.filter(tenant=tenant)
    if key == "day":
        events = events.annotate(day=TruncDate("created_at", tzinfo=UTC))
    totals: dict = {}
    for rows in (
        rollups.order_by().values(key).annotate(
            prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"),
            request_count=Sum("requests"), error_count=Sum("errors"),
        ),
        events.order_by().values(key).annotate(
            prompt=Sum("prompt_tokens"), completion=Sum("completion_tokens"), request_count=Count("id"),
            error_count=Count("id", filter=Q(status=UsageStatus.ERROR)),
        ),
    ):
        for row in rows:
            totals.setdefault(row[key], Usage()).add(row)
    return totals


def budget_status(*, tenant: Tenant) -> BudgetStatus:
    """Tokens `tenant` used in its current budget period, against its budget."""
    start, _ = period_bounds(budget_period=tenant.budget_period, now=timezone.now())
    return BudgetStatus(tenant.token_budget, tokens_used_in_period(tenant=tenant, period_start=start),
                        tenant.get_budget_period_display().lower())


def tenants_with_key_counts() -> QuerySet[Tenant]:
    return Tenant.objects.annotate(
        active_keys=Count("api_keys", filter=Q(api_keys__revoked_at__isnull=True))
    ).order_by("name")


def tenant_audit_entries(*, tenant: Tenant, limit: int = 25) -> QuerySet[AuditLog]:
    return AuditLog.objects.filter(tenant=tenant).order_by("-created_at")[:limit]


def engine_status(*, redis_url: str | None = None, timeout_s: float = 0.5) -> list[ModelStatus] | None:
    """Live replicas per model from their heartbeats; None when Redis does not answer.

    A plain sync client with a short timeout: the page must still render, saying Redis is
    down, rather than hang; a heartbeat that does not decode is left out, not an error page.
    """
    keys = Keys(prefix=settings.ENGINE_KEY_PREFIX)
    client = redis.Redis.from_url(redis_url or settings.REDIS_URL,
                                  socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    try:
        names = list(client.scan_iter(match=keys.heartbeat_pattern(), count=200))
        values = client.mget(names) if names else []
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()
    by_model: dict[str, list[Heartbeat]] = {}
    for value in filter(None, values):
        try:
            beat = decode_heartbeat(value)
        except ProtocolError:
            continue
        by_model.setdefault(beat.model, []).append(beat)
    return [ModelStatus(model, sorted(beats, key=lambda b: b.replica_id))
            for model, beats in sorted(by_model.items())]


def batch_model():
    """inference.Batch when that app defines it, else None (the batch API may not be installed)."""
    try:
        return apps.get_model("inference", "Batch")
    except LookupError:
        return None


def recent_batches(*, limit: int = 20) -> list | None:
    """The newest batch jobs, each with `progress_percent`; None when there is no Batch model."""
    model = batch_model()
    if model is None:
        return None
    batches = list(model.objects.select_related("tenant").order_by("-created_at")[:limit])
    for batch in batches:
        done = batch.completed_requests + batch.failed_requests
        batch.progress_percent = round(100 * done / batch.total_requests) if batch.total_requests else 0
    return batches
