"""Usage events and daily roll-ups: idempotent recording, exact sums, tenant-scoped reads."""
from datetime import UTC, date, datetime, timedelta

import pytest

from tenants.models import DailyUsage, UsageEvent
from tenants.selectors import (
    get_tenant_daily_usage,
    get_tenant_usage_events,
    tokens_used_in_period,
)
from tenants.services import create_api_key, create_tenant, record_usage, roll_up_usage
from tenants.tasks import roll_up_recent_usage

pytestmark = pytest.mark.usefixtures("db")

# Days long past: tests that run a live server commit usage events of today.
DAY = date(2020, 2, 28)
NOON = datetime(2020, 2, 28, 12, tzinfo=UTC)


@pytest.fixture
def acme_key():
    return create_api_key(tenant=create_tenant(name="acme"))[0]


@pytest.fixture
def globex_key():
    return create_api_key(tenant=create_tenant(name="globex"))[0]


def event(api_key, request_id, *, at=NOON, model="llama", prompt=10, completion=5, **extra):
    """A usage event recorded at `at`."""
    record_usage(
        api_key=api_key, request_id=request_id, model=model, endpoint="chat.completions",
        prompt_tokens=prompt, completion_tokens=completion, **extra,
    )
    UsageEvent.objects.filter(request_id=request_id).update(created_at=at)


def daily_rows(day=DAY) -> set[tuple]:
    return set(
        DailyUsage.objects.filter(day=day).values_list(
            "tenant__name", "model", "requests", "errors", "prompt_tokens", "completion_tokens"
        )
    )


def test_record_usage_is_idempotent_on_request_id(acme_key):
    first = record_usage(
        api_key=acme_key, request_id="req-1", model="llama", endpoint="chat.completions",
        prompt_tokens=12, completion_tokens=34, cached_tokens=8, latency_ms=900, ttft_ms=80,
    )
    again = record_usage(
        api_key=acme_key, request_id="req-1", model="llama", endpoint="chat.completions",
        prompt_tokens=999, completion_tokens=999,
    )
    assert again.pk == first.pk
    (stored,) = UsageEvent.objects.filter(tenant=acme_key.tenant)
    assert (stored.tenant, stored.api_key, stored.status) == (acme_key.tenant, acme_key, "ok")
    assert (stored.prompt_tokens, stored.completion_tokens, stored.cached_tokens) == (12, 34, 8)
    assert (stored.latency_ms, stored.ttft_ms) == (900, 80)


def test_record_usage_rejects_an_unknown_status(acme_key):
    with pytest.raises(ValueError):
        record_usage(
            api_key=acme_key, request_id="req-1", model="m", endpoint="completions",
            prompt_tokens=1, completion_tokens=1, status="weird",
        )
    assert not UsageEvent.objects.filter(tenant=acme_key.tenant).exists()


def test_usage_outlives_its_key(acme_key):
    event(acme_key, "req-1")
    acme_key.delete()
    stored = UsageEvent.objects.get(request_id="req-1")
    assert stored.api_key is None and stored.tenant.name == "acme"


def test_roll_up_sums_one_utc_day_per_tenant_and_model(acme_key, globex_key):
    event(acme_key, "a1", prompt=10, completion=5)
    event(acme_key, "a2", prompt=20, completion=0, status="error", error_code="engine_error")
    event(acme_key, "a3", prompt=7, completion=3, status="cancelled")
    event(acme_key, "a4", model="qwen", prompt=1, completion=1)
    event(globex_key, "g1", prompt=100, completion=50)
    event(acme_key, "first", at=datetime(2020, 2, 28, tzinfo=UTC), prompt=1000, completion=0)
    event(acme_key, "day-before", at=datetime(2020, 2, 27, 23, 59, 59, tzinfo=UTC), prompt=10**4)
    event(acme_key, "day-after", at=datetime(2020, 2, 29, tzinfo=UTC), prompt=10**5)

    assert roll_up_usage(day=DAY) == 3
    expected = {
        ("acme", "llama", 4, 1, 1037, 8),
        ("acme", "qwen", 1, 0, 1, 1),
        ("globex", "llama", 1, 0, 100, 50),
    }
    assert daily_rows() == expected
    assert roll_up_usage(day=DAY) == 3 and daily_rows() == expected  # idempotent


def test_roll_up_follows_changed_events(acme_key):
    event(acme_key, "a1", model="llama")
    event(acme_key, "a2", model="qwen")
    roll_up_usage(day=DAY)
    UsageEvent.objects.filter(request_id="a2").delete()
    event(acme_key, "a3", model="llama", prompt=1, completion=1)
    assert roll_up_usage(day=DAY) == 1
    assert daily_rows() == {("acme", "llama", 2, 0, 11, 6)}


def test_the_task_rolls_up_today_and_yesterday(acme_key):
    now = datetime.now(UTC)
    event(acme_key, "today", at=now)
    event(acme_key, "yesterday", at=now - timedelta(days=1))
    event(acme_key, "older", at=now - timedelta(days=2))
    days = {now.date(), (now - timedelta(days=1)).date()}
    assert roll_up_recent_usage() == DailyUsage.objects.filter(day__in=days).count()
    rows = DailyUsage.objects.filter(tenant=acme_key.tenant).values_list("day", "requests")
    assert set(rows) == {(day, 1) for day in days}


def test_selectors_never_show_another_tenants_usage(acme_key, globex_key):
    event(acme_key, "a-old", at=NOON - timedelta(days=3), prompt=1000, completion=0)
    event(acme_key, "a-new", prompt=10, completion=5)
    event(globex_key, "g-new", prompt=100, completion=50)
    roll_up_usage(day=DAY)
    roll_up_usage(day=DAY - timedelta(days=3))
    acme, globex = acme_key.tenant, globex_key.tenant

    assert [e.request_id for e in get_tenant_usage_events(tenant=acme)] == ["a-new", "a-old"]
    assert [e.request_id for e in get_tenant_usage_events(tenant=acme, since=NOON)] == ["a-new"]
    assert [e.request_id for e in get_tenant_usage_events(tenant=globex)] == ["g-new"]
    assert {r.tenant for r in get_tenant_daily_usage(tenant=acme)} == {acme}
    assert get_tenant_daily_usage(tenant=acme).count() == 2
    assert get_tenant_daily_usage(tenant=acme, since=DAY).count() == 1
    assert [r.prompt_tokens for r in get_tenant_daily_usage(tenant=globex)] == [100]
    assert tokens_used_in_period(tenant=acme, period_start=NOON - timedelta(days=3)) == 1015
    assert tokens_used_in_period(tenant=acme, period_start=NOON) == 15
    assert tokens_used_in_period(tenant=globex, period_start=NOON) == 150
    assert tokens_used_in_period(tenant=globex, period_start=NOON + timedelta(seconds=1)) == 0
