"""Fixtures of the dashboard tests: users, a tenant with usage over several days, a heartbeat
in Redis, and a batch job when the batch API is installed."""
from __future__ import annotations

import uuid
from datetime import UTC, datetime, time, timedelta

import pytest
import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils import timezone

from engine.service.protocol import Heartbeat, encode
from engine.service.transport import Keys
from tenants.dashboard.selectors import batch_model, utc_today
from tenants.models import DailyUsage, Tenant
from tenants.services import create_api_key, create_tenant, record_usage

MODEL = "acme/test-model"
PASSWORD = "dashboard-pw-8271"


def make_user(*, staff: bool):
    name = f"{'staff' if staff else 'user'}-{uuid.uuid4().hex[:8]}"
    return get_user_model().objects.create_user(name, f"{name}@example.com", PASSWORD, is_staff=staff)


def make_busy_tenant(*, name: str | None = None) -> tuple[Tenant, str]:
    """A tenant with a key (returned raw), usage rolled up for two past days and three events today."""
    tenant = create_tenant(name=name or f"acme-{uuid.uuid4().hex[:8]}", token_budget=50_000)
    api_key, raw_key = create_api_key(tenant=tenant, name="ci")
    today = utc_today()
    for days_ago, prompt, completion in ((3, 4000, 1500), (1, 2500, 900)):
        DailyUsage.objects.create(tenant=tenant, day=today - timedelta(days=days_ago), model=MODEL,
                                  requests=20, errors=days_ago, prompt_tokens=prompt, completion_tokens=completion)
    start_of_today = datetime.combine(today, time.min, tzinfo=UTC)
    for n, status in enumerate(("ok", "ok", "error")):
        event = record_usage(api_key=api_key, request_id=f"{tenant.name}-{n}", model=MODEL,
                             endpoint="chat.completions", prompt_tokens=1000, completion_tokens=300, status=status)
        # Inside today whatever the clock says (a test run just after midnight UTC included).
        event.created_at = max(start_of_today, timezone.now() - timedelta(minutes=n))
        event.save(update_fields=["created_at"])
    return tenant, raw_key


def make_batch(*, tenant: Tenant, total: int, completed: int, failed: int):
    """A batch job row as the batch API writes it (its input file included)."""
    Batch = batch_model()
    File = Batch._meta.get_field("input_file").related_model
    input_file = File.objects.create(tenant=tenant, purpose="batch", filename="in.jsonl", bytes=2, content=b"{}")
    return Batch.objects.create(
        tenant=tenant, endpoint="/v1/chat/completions", input_file=input_file, status="in_progress",
        total_requests=total, completed_requests=completed, failed_requests=failed,
        expires_at=timezone.now() + timedelta(days=1),
    )


@pytest.fixture
def staff_user():
    return make_user(staff=True)


@pytest.fixture
def staff_client(client, staff_user):
    client.force_login(staff_user)
    return client


@pytest.fixture
def heartbeat():
    """A live replica of MODEL as the engine publishes it (under this session's key prefix)."""
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {settings.REDIS_URL}")
    beat = Heartbeat("replica-1", MODEL, queue_depth=2, num_running=5, num_waiting=1,
                     kv_cache_usage=0.42, tokens_per_s=123.4)
    key = Keys(prefix=settings.ENGINE_KEY_PREFIX).heartbeat(MODEL, beat.replica_id)
    client.set(key, encode(beat), ex=120)
    yield beat
    client.delete(key)
    client.close()
