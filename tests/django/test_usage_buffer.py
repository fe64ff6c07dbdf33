"""Usage events buffered in Redis by calls (no query) and written in batches by a flush: exactly
once, with the call's own time, surviving failed flushes, deleted tenants and deleted keys."""
from datetime import timedelta
from uuid import uuid4

import pytest
import redis
from asgiref.sync import async_to_sync
from django.conf import settings
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tenants import usage_buffer
from tenants.models import ApiKey, UsageEvent
from tenants.services import usage_event
from tenants.usage_buffer import buffer_usage, ensure_usage_flusher, flush_usage, usage_stream
from tests.django.admission_testing import async_redis_client, key_prefix, make_api_key  # noqa: F401
from tests.service.conftest import wait_until

def plain_redis() -> redis.Redis:
    return redis.Redis.from_url(settings.REDIS_URL)


def buffer(key_prefix, api_key, request_id, *, prompt_tokens=3, **fields) -> UsageEvent:
    event = usage_event(api_key=api_key, request_id=request_id, model="m", endpoint="completions",
                        prompt_tokens=prompt_tokens, completion_tokens=4, **fields)

    async def append():
        async with async_redis_client() as client:
            await buffer_usage(redis=client, key_prefix=key_prefix, event=event)

    async_to_sync(append)()
    return event


def flush(key_prefix) -> int:
    return flush_usage(redis=plain_redis(), key_prefix=key_prefix)


def buffered(key_prefix) -> int:
    return plain_redis().xlen(usage_stream(key_prefix=key_prefix))


def test_buffering_runs_no_query_and_the_flush_writes_the_call_as_it_was(db, key_prefix):
    api_key = make_api_key()
    with CaptureQueriesContext(connection) as queries:
        sent = buffer(key_prefix, api_key, "r1", status="error", error_code="engine_dead", latency_ms=120,
                      ttft_ms=30, cached_tokens=2)
    assert len(queries) == 0 and not UsageEvent.objects.filter(request_id="r1").exists()
    assert flush(key_prefix) == 1 and buffered(key_prefix) == 0
    stored = UsageEvent.objects.get(request_id="r1")
    assert (stored.tenant_id, stored.api_key_id, stored.model, stored.endpoint) == (
        api_key.tenant_id, api_key.pk, "m", "completions")
    assert (stored.prompt_tokens, stored.completion_tokens, stored.cached_tokens) == (3, 4, 2)
    assert (stored.status, stored.error_code, stored.latency_ms, stored.ttft_ms) == ("error", "engine_dead", 120, 30)
    assert abs(stored.created_at - sent.created_at) < timedelta(milliseconds=1)  # the call's time, not the flush's


def test_a_request_buffered_twice_keeps_its_first_event(db, key_prefix):
    api_key = make_api_key()
    buffer(key_prefix, api_key, "r1", prompt_tokens=3)
    buffer(key_prefix, api_key, "r1", prompt_tokens=99)
    assert flush(key_prefix) == 2
    buffer(key_prefix, api_key, "r1", prompt_tokens=77)
    flush(key_prefix)
    assert list(UsageEvent.objects.filter(request_id="r1").values_list("prompt_tokens", flat=True)) == [3]


def test_a_failed_flush_leaves_the_events_buffered(db, key_prefix, monkeypatch):
    api_key = make_api_key()
    buffer(key_prefix, api_key, "r1")

    def database_down(**kwargs):
        raise RuntimeError("database down")

    with monkeypatch.context() as patch:
        patch.setattr(usage_buffer, "record_usage_events", database_down)
        with pytest.raises(RuntimeError):
            flush(key_prefix)
    assert buffered(key_prefix) == 1
    assert flush(key_prefix) == 1 and UsageEvent.objects.filter(request_id="r1").exists()


def test_events_of_deleted_tenants_and_keys_do_not_block_the_stream(db, key_prefix):
    gone_tenant, gone_key = make_api_key(), make_api_key()
    buffer(key_prefix, gone_tenant, "of-a-deleted-tenant")
    buffer(key_prefix, gone_key, "of-a-deleted-key")
    gone_tenant.tenant.delete()
    gone_key.delete()
    assert flush(key_prefix) == 2 and buffered(key_prefix) == 0
    assert not UsageEvent.objects.filter(request_id="of-a-deleted-tenant").exists()
    stored = UsageEvent.objects.get(request_id="of-a-deleted-key")
    assert stored.api_key_id is None and stored.tenant_id == gone_key.tenant_id


def test_the_flush_notes_key_use_at_most_once_a_minute(db, key_prefix):
    api_key = make_api_key()
    buffer(key_prefix, api_key, "r1")
    flush(key_prefix)
    first_use = ApiKey.objects.get(pk=api_key.pk).last_used_at
    assert timezone.now() - first_use < timedelta(seconds=10)
    buffer(key_prefix, api_key, "r2")
    flush(key_prefix)
    assert ApiKey.objects.get(pk=api_key.pk).last_used_at == first_use


def test_the_background_flusher_writes_what_calls_buffer():
    """The flusher writes from a thread of its own, so this test commits its rows (no `db`)."""
    api_key = make_api_key()
    try:
        buffer(settings.ENGINE_KEY_PREFIX, api_key, f"bg-{uuid4().hex}")
        ensure_usage_flusher()
        wait_until(lambda: UsageEvent.objects.filter(tenant_id=api_key.tenant_id).exists(), 10,
                   "the flusher to write the event")
    finally:
        api_key.tenant.delete()
