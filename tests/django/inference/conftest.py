"""The live stack of the API tests: real Redis, a real engine replica (bundled model), and a real
daphne server on the test database; clients are the official `openai` SDK, httpx and websockets.

Tenants and keys are made in this process and committed (the server reads them from the same
database), each test with its own tenant, so tests never share limits or usage.
"""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from django.conf import settings

from engine.config import BUNDLED_MODEL
from tenants.models import ApiKey
from tenants.services import create_api_key, create_tenant
from tests.django.live_server import daphne_server
from tests.service.conftest import Replica, redis_answers

MODEL = BUNDLED_MODEL
METRICS_TOKEN = "live-stack-metrics-token"  # the server runs with DEBUG off: /metrics wants a token


@dataclass
class LiveStack:
    base_url: str
    redis_url: str
    prefix: str
    replica: Replica
    server_log: Path

    def new_key(self, *, models: list[str] | None = None, key_limits: dict | None = None, **tenant_limits) -> str:
        """A fresh tenant (generous limits unless told) and one key of it; returns the raw key."""
        limits = {"requests_per_minute": 10_000, "tokens_per_minute": 10_000_000,
                  "max_concurrent_requests": 1_000, **tenant_limits}
        tenant = create_tenant(name=f"t-{uuid.uuid4().hex[:10]}", **limits)
        _, raw_key = create_api_key(tenant=tenant, allowed_models=models or [], **(key_limits or {}))
        return raw_key

    @staticmethod
    def tenant_of(key: str):
        return ApiKey.objects.select_related("tenant").get(prefix=key.split(".")[0]).tenant

    def openai(self, key: str) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=120)

    def async_openai(self, key: str) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=key, max_retries=0, timeout=120)

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.base_url, timeout=120)


async def asgi_completion(key: str, body: dict, *, on_start=None, on_body=None,
                          gone_at_start: bool = False) -> tuple[int, bytes]:
    """`POST /v1/completions` through the project's ASGI application in this process: (status, body).
    `on_start()` is awaited when the response starts and `on_body(body so far)` called at each body
    message; with `gone_at_start` the client disconnects as soon as the response starts."""
    from project.asgi import application

    payload = json.dumps(body).encode()
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/completions", "raw_path": b"/v1/completions", "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"authorization", f"Bearer {key}".encode()), (b"content-length", str(len(payload)).encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}
    incoming = [{"type": "http.request", "body": payload, "more_body": False}]
    gone, status, received = asyncio.Event(), [], bytearray()

    async def receive():
        if incoming:
            return incoming.pop(0)
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        if message["type"] == "http.response.start":
            status.append(message["status"])
            if gone_at_start:
                gone.set()
            if on_start is not None:
                await on_start()
        elif message["type"] == "http.response.body":
            received.extend(message.get("body", b""))
            if on_body is not None:
                on_body(bytes(received))
            if not message.get("more_body"):
                gone.set()

    await asyncio.wait_for(application(scope, receive, send), 120)
    return status[0], bytes(received)


@pytest.fixture(scope="session")
def live(django_test_database, tmp_path_factory):
    redis_url = settings.REDIS_URL
    if not redis_answers(redis_url):
        pytest.skip(f"no Redis at {redis_url}")
    logs = tmp_path_factory.mktemp("live")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    replica = Replica(redis_url, prefix, "api-replica", ["--max-num-seqs", "32"], logs / "engine.log")
    stack = LiveStack("", redis_url, prefix, replica, logs / "daphne.log")
    try:
        replica.wait_ready()
        with daphne_server(log_path=stack.server_log, ready_path="/ready",
                           env={"REDIS_URL": redis_url, "ENGINE_KEY_PREFIX": prefix,
                                "METRICS_TOKEN": METRICS_TOKEN}) as base_url:
            stack.base_url = base_url
            yield stack
    finally:
        replica.kill()
        print("--- engine log ---\n" + replica.log_tail())
