"""The live stack of the API tests: real Redis, a real engine replica (bundled model), and a real
daphne server on the test database; clients are the official `openai` SDK, httpx and websockets.

Tenants and keys are made in this process and committed (the server reads them from the same
database), each test with its own tenant, so tests never share limits or usage.
"""
from __future__ import annotations

import os
import secrets
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx2 as httpx
import openai
import pytest
from django.conf import settings
from django.db import connection

from engine.config import BUNDLED_MODEL
from tenants.models import ApiKey
from tenants.services import create_api_key, create_tenant
from tests.service.conftest import REPO_ROOT, Replica, _die_with_parent, free_port, redis_answers, wait_until

MODEL = BUNDLED_MODEL


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


def _live_database_url() -> str:
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@pytest.fixture(scope="session")
def live(django_test_database, tmp_path_factory):
    redis_url = settings.REDIS_URL
    if not redis_answers(redis_url):
        pytest.skip(f"no Redis at {redis_url}")
    logs = tmp_path_factory.mktemp("live")
    prefix = f"test-{uuid.uuid4().hex[:12]}"
    replica = Replica(redis_url, prefix, "api-replica", ["--max-num-seqs", "32"], logs / "engine.log")
    port = free_port()
    env = {**os.environ, "DATABASE_URL": _live_database_url(), "REDIS_URL": redis_url, "ENGINE_KEY_PREFIX": prefix,
           "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
           "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost", "DJANGO_SECURE_SSL_REDIRECT": "0", "PYTHONUNBUFFERED": "1"}
    server_log = logs / "daphne.log"
    with open(server_log, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                                   "project.asgi:application"], cwd=REPO_ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
    stack = LiveStack(f"http://127.0.0.1:{port}", redis_url, prefix, replica, server_log)
    try:
        replica.wait_ready()

        def healthy():
            assert server.poll() is None, f"daphne exited:\n{server_log.read_text()[-3000:]}"
            try:
                return httpx.get(f"{stack.base_url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 60, "daphne and the engine to be healthy", interval=0.3)
        yield stack
    finally:
        server.terminate()
        server.wait(10)
        replica.kill()
        print("--- daphne log ---\n" + server_log.read_text(errors="replace")[-4000:])
        print("--- engine log ---\n" + replica.log_tail())
