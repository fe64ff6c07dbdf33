"""/health (liveness of the web process) and /ready (can serve a call), against real Redis: a replica
is a heartbeat key in Redis, written here as a replica writes it and left to expire as when it dies."""
import time
import uuid

import pytest
from django.conf import settings

from engine.service.protocol import Heartbeat, ModelCard, encode
from engine.service.transport import Keys
from inference.selectors import redis_is_reachable

MODEL = f"health-model-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def redis():
    import redis as redis_lib

    client = redis_lib.Redis.from_url(settings.REDIS_URL)
    keys = Keys(settings.ENGINE_KEY_PREFIX)
    yield client, keys
    for key in client.scan_iter(match=f"{settings.ENGINE_KEY_PREFIX}:*"):
        client.delete(key)
    client.close()


def beat(redis, *, ttl_ms: int) -> None:
    """A replica of MODEL alive for `ttl_ms` more (its heartbeat and its model card, as the server writes them)."""
    client, keys = redis
    client.set(keys.model_card(MODEL), encode(ModelCard(model=MODEL)))
    client.set(keys.heartbeat(MODEL, "r1"), encode(Heartbeat(replica_id="r1", model=MODEL, sent_at=time.time())),
               px=ttl_ms)


def test_health_is_liveness_even_without_engines(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response.json() == {"status": "ok"}


def test_ready_is_503_while_no_engine_has_registered(client, redis):
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json() == {"status": "degraded", "redis": True, "engines": {}}


def test_ready_while_a_replica_beats_and_not_after_its_heartbeat_expires(client, redis):
    beat(redis, ttl_ms=1500)
    wait_for_ready(client, 200)
    assert client.get("/ready").json() == {"status": "ok", "redis": True, "engines": {MODEL: 1}}
    assert client.get("/health").status_code == 200
    time.sleep(1.5)  # the heartbeat expires: the replica died
    wait_for_ready(client, 503)
    assert client.get("/ready").json() == {"status": "degraded", "redis": True, "engines": {MODEL: 0}}
    assert client.get("/health").status_code == 200


def wait_for_ready(client, status: int, timeout_s: float = 5.0) -> None:
    """The engine client caches the replica list for about a second."""
    deadline = time.monotonic() + timeout_s
    while client.get("/ready").status_code != status:
        assert time.monotonic() < deadline, f"/ready never answered {status}"
        time.sleep(0.2)


def test_health_and_ready_are_get_only(client):
    for path in ("/health", "/ready"):
        response = client.post(path)
        assert response.status_code == 405
        assert response["Allow"] == "GET, HEAD, OPTIONS"


def test_unreachable_redis_is_false_not_an_error():
    assert redis_is_reachable(url="redis://127.0.0.1:1/0", timeout_s=0.2) is False
