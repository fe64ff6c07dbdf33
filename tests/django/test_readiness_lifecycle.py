"""/health and /ready of a live daphne server through a real engine replica's life: loading (no
replica yet), serving, and killed (its heartbeat expires). A load balancer polls /ready all along:
its 503s while the engine loads are answers, not ERROR lines in the server's log."""
from __future__ import annotations

import time
import uuid

import httpx2 as httpx
import pytest
from django.conf import settings

from engine.config import BUNDLED_MODEL
from tests.django.live_server import daphne_server
from tests.service.conftest import Replica, redis_answers, wait_until


def test_ready_follows_the_engine_and_health_the_web_process(django_test_database, tmp_path):
    if not redis_answers(settings.REDIS_URL):
        pytest.skip(f"no Redis at {settings.REDIS_URL}")
    prefix, server_log = f"test-{uuid.uuid4().hex[:12]}", tmp_path / "daphne.log"
    with daphne_server(log_path=server_log, ready_path="/health", env={"ENGINE_KEY_PREFIX": prefix}) as base_url, \
            httpx.Client(base_url=base_url, timeout=10) as http:
        starting = http.get("/ready")
        assert starting.status_code == 503
        assert starting.json() == {"status": "degraded", "redis": True, "engines": {}}

        replica = Replica(settings.REDIS_URL, prefix, "lifecycle", [], tmp_path / "engine.log")
        try:
            polls = []

            def ready():
                assert replica.alive(), replica.log_tail()
                polls.append(http.get("/ready").status_code)
                assert http.get("/health").status_code == 200
                return polls[-1] == 200

            wait_until(ready, 180, "/ready to answer 200 once the engine has loaded", interval=0.3)
            assert polls[0] == 503 and set(polls) == {503, 200}
            assert http.get("/ready").json() == {"status": "ok", "redis": True, "engines": {BUNDLED_MODEL: 1}}
            assert " ERROR " not in server_log.read_text(), "a /ready poll while the engine loaded logged an ERROR"

            replica.kill()
            died = time.monotonic()
            wait_until(lambda: http.get("/ready").status_code == 503, 20, "/ready to notice the dead replica")
            assert time.monotonic() - died < 15  # the heartbeat's TTL (5 s) plus the client's cache (1 s), and slack
            assert http.get("/ready").json() == {"status": "degraded", "redis": True, "engines": {BUNDLED_MODEL: 0}}
            assert http.get("/health").json() == {"status": "ok"}
        finally:
            replica.kill()
