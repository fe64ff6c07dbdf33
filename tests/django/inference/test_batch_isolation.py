"""Batches cannot hurt other tenants: a line that can never be admitted fails at once, workers take
turns between tenants, and revoking the key stops its batch. Live stack plus real Celery workers."""
from __future__ import annotations

import time

import pytest
from django.test import override_settings

from inference.models import Batch
from tenants.models import ApiKey
from tenants.services import revoke_api_key

from .test_batches import Worker, chat_line, results, submit, wait_for

pytestmark = pytest.mark.timeout(900)


@pytest.fixture
def make_worker(live, tmp_path):
    started = []

    def make(**env) -> Worker:
        worker = Worker(live, tmp_path / f"w{len(started)}")
        worker.log_dir.mkdir()
        worker.env.update({name: str(value) for name, value in env.items()})
        started.append(worker.start())
        return worker

    yield make
    for worker in started:
        worker.kill()
        print("--- celery log ---\n" + worker.log_tail())


def test_a_line_larger_than_the_tokens_per_minute_fails_at_once(live, make_worker):
    worker = make_worker()
    client = live.openai(live.new_key(tokens_per_minute=300))
    lines = [chat_line("ok-1"), chat_line("huge", max_tokens=400), chat_line("ok-2")]
    started = time.monotonic()
    batch = submit(client, lines)
    done = wait_for(client, batch.id, lambda b: b.status in ("completed", "failed"), timeout=120, worker=worker)
    assert done.status == "completed" and time.monotonic() - started < 60, "the line was retried"
    assert (done.request_counts.completed, done.request_counts.failed) == (2, 1)
    [error] = results(client, done.error_file_id)
    body = error["response"]["body"]["error"]
    assert error["custom_id"] == "huge" and error["response"]["status_code"] == 429
    assert body["code"] == "rate_limit_exceeded" and "Request too large" in body["message"]


def test_workers_take_turns_between_tenants(live, make_worker):
    """Tenant A's two long batches would hold both workers for their whole run; tenant B's small
    batch finishes while A's are still running (slices, and one running batch per tenant)."""
    worker = make_worker(BATCH_SLICE_S=2, BATCH_CONCURRENCY=2)
    tenant_a, tenant_b = live.openai(live.new_key()), live.openai(live.new_key())
    big = [submit(tenant_a, [chat_line(f"a{n}-{i}", max_tokens=16) for i in range(150)]) for n in range(2)]
    wait_for(tenant_a, big[0].id, lambda b: b.request_counts.completed >= 2, worker=worker)
    small = submit(tenant_b, [chat_line(f"b-{i}") for i in range(3)])
    done = wait_for(tenant_b, small.id, lambda b: b.status == "completed", timeout=300, worker=worker)
    assert done.request_counts.completed == 3
    for batch in big:  # (the second may not have had its first turn yet)
        assert tenant_a.batches.retrieve(batch.id).status in ("validating", "in_progress")
    for batch in big:
        tenant_a.batches.cancel(batch.id)


def test_revoking_the_key_stops_its_batch(live, make_worker):
    worker = make_worker(BATCH_CONCURRENCY=2)
    key = live.new_key()
    client = live.openai(key)
    batch = submit(client, [chat_line(f"r-{i}", max_tokens=16) for i in range(200)])
    wait_for(client, batch.id, lambda b: b.request_counts.completed >= 3, worker=worker)
    with override_settings(ENGINE_KEY_PREFIX=live.prefix):  # the workers' key caches see the change
        revoke_api_key(api_key=ApiKey.objects.get(prefix=key.split(".")[0]))
    stopped = wait_until_finished(batch.id, timeout=60)
    assert stopped.status == "failed" and stopped.failed_at
    assert stopped.errors[0]["code"] == "invalid_api_key"
    assert stopped.completed_requests < 200
    # Lines that had started may finish; none starts after the revocation.
    assert stopped.completed_requests + stopped.failed_requests <= 200


def wait_until_finished(batch_id: str, timeout: float) -> Batch:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        batch = Batch.objects.get(pk=batch_id)
        if batch.is_finished:
            return batch
        time.sleep(0.5)
    raise AssertionError(f"batch {batch_id} still {Batch.objects.get(pk=batch_id).status}")
