"""Many web processes on one port (`python -m project.supervisor`), end to end: a real Redis, an
engine replica with the bundled model, two daphne workers on a fresh SQLite database, and a tenant
made with the management commands, as in production.

A worker SIGKILLed mid-stream breaks only its own streams (never a hang), new calls keep being
served, the supervisor starts a replacement, the engine aborts the dead worker's requests, and
the tenant gets the concurrency slots and quota holds of its dead calls back.

To know which worker serves which stream, the other one is SIGSTOPped while the streams connect
(only a running process accepts from the shared socket), and only until their calls are recorded:
a worker stopped longer than its client's liveness TTL would count as dead.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import threading
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.scripts.web_tier import sigstopped
from tests.service.conftest import MODEL, REPO_ROOT, Service, _die_with_parent, free_port, redis_answers, \
    wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # a busy 2-core machine decodes ~1 token/s

MAX_CONCURRENT = 5  # the tenant's limit: the 4 streams the test holds open, and one call more
SURVIVOR_TOKENS = 48


class Stack:
    """The supervisor and its two workers, the replica, the tenant's key; everything logged to tmp."""

    def __init__(self, tmp_path: Path, service: Service) -> None:
        self.service, self.port, self.log_path = service, free_port(), tmp_path / "supervisor.log"
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
                    "REDIS_URL": service.redis_url, "ENGINE_KEY_PREFIX": service.prefix, "DJANGO_DEBUG": "0",
                    "DJANGO_SECRET_KEY": secrets.token_urlsafe(50), "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
                    "DJANGO_SECURE_SSL_REDIRECT": "0", "PYTHONUNBUFFERED": "1"}
        self.key = ""
        self.supervisor: subprocess.Popen | None = None

    def manage(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=self.env, capture_output=True,
                              text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout

    def start(self) -> None:
        self.service.start_replica("replica", wait=False)  # loads the model while the database is made
        self.manage("migrate", "--no-input")
        self.manage("create_tenant", "t", "--max-concurrent-requests", str(MAX_CONCURRENT),
                    "--token-budget", "10000000")
        self.key = self.manage("create_api_key", "t").strip().splitlines()[-1]
        with open(self.log_path, "wb") as log:
            self.supervisor = subprocess.Popen(
                [sys.executable, "-m", "project.supervisor", "--workers", "2", "--port", str(self.port)],
                cwd=REPO_ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self.replica.wait_ready()
        wait_until(self.healthy, 120, "the workers to answer /ready with the engine", interval=0.3)

    def stop(self) -> None:
        if self.supervisor is None:
            return
        if self.supervisor.poll() is None:
            self.supervisor.terminate()
            self.supervisor.wait(60)
        print("--- supervisor log ---\n" + self.log()[-6000:])

    @property
    def replica(self):
        return self.service.replicas[0]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def healthy(self) -> bool:
        assert self.supervisor.poll() is None, f"the supervisor exited:\n{self.log()[-3000:]}"
        with contextlib.suppress(httpx.HTTPError):
            response = httpx.get(f"{self.base_url}/ready", timeout=2)
            return response.status_code == 200 and bool(response.json()["engines"])
        return False

    def workers(self) -> dict[int, int]:
        """Worker number -> pid of its latest start, from the supervisor's log."""
        return {int(n): int(pid) for n, pid in re.findall(r"worker (\d+) started \(pid (\d+)\)", self.log())}

    def live_workers(self) -> list[int]:
        return [int(pid) for pid in Path(f"/proc/{self.supervisor.pid}/task/{self.supervisor.pid}/children")
                .read_text().split()]

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"}

    def complete(self, max_tokens: int = 4) -> httpx.Response:
        return httpx.post(f"{self.base_url}/v1/completions", headers=self.headers(), timeout=120,
                          json={"model": MODEL, "prompt": "Hello", "max_tokens": max_tokens})

    def streams_while_paused(self, paused: int, *, count: int, max_tokens: int) -> list[SseStream]:
        """`count` streams that the worker not `paused` accepts."""
        registered = self.registered_calls()
        with sigstopped(paused):
            streams = [SseStream(self, max_tokens) for _ in range(count)]
            wait_until(lambda: self.registered_calls() == registered + count, 60, f"{count} calls to be recorded")
        return streams

    # what Redis holds for the tenant

    def registered_calls(self) -> int:
        redis = self.service.sync_redis()
        try:
            return sum(redis.hlen(key) for key in redis.scan_iter(match=f"{self.service.prefix}:calls:*"))
        finally:
            redis.close()

    def held_request_ids(self) -> set[str]:
        """Request ids holding a concurrency slot or a quota reservation."""
        redis, prefix = self.service.sync_redis(), self.service.prefix
        try:
            keys = [*redis.scan_iter(match=f"{prefix}:ratelimit:*:leases"),
                    *redis.scan_iter(match=f"{prefix}:quota:*:holds")]
            return {member.decode() for key in keys for member in redis.zrange(key, 0, -1)}
        finally:
            redis.close()


class SseStream(threading.Thread):
    """One streamed completion read in a thread: its request id (from the first chunk), the tokens
    the usage chunk counts, and how it ended: "done", or what broke it."""

    def __init__(self, stack: Stack, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.stack, self.max_tokens = stack, max_tokens
        self.request_id: str | None = None
        self.chunks = self.completion_tokens = 0
        self.outcome: str | None = None
        self.start()

    def run(self) -> None:
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": self.max_tokens, "ignore_eos": True,
                "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
        try:
            with httpx.stream("POST", f"{self.stack.base_url}/v1/completions", json=body, timeout=30,
                              headers=self.stack.headers()) as response:
                if response.status_code != 200:
                    self.outcome = f"HTTP {response.status_code}: {response.read()[:300]!r}"
                    return
                for line in response.iter_lines():
                    if line == "data: [DONE]":
                        self.outcome = "done"
                        return
                    if line.startswith("data: "):
                        chunk = json.loads(line.removeprefix("data: "))
                        self.request_id, self.chunks = chunk["id"], self.chunks + 1
                        self.completion_tokens = (chunk.get("usage") or {}).get("completion_tokens", 0)
            self.outcome = "closed before [DONE]"
        except httpx.HTTPError as error:
            self.outcome = f"{type(error).__name__}: {error}"

    def ended(self, timeout: float) -> str:
        self.join(timeout)
        assert not self.is_alive(), f"stream {self.request_id} hangs: open {timeout}s more after {self.chunks} chunks"
        return self.outcome



@pytest.fixture
def stack(tmp_path):
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(redis_url):
        pytest.skip(f"no Redis at {redis_url}")
    service = Service(redis_url, tmp_path)
    stack = Stack(tmp_path, service)
    try:
        stack.start()
        yield stack
    finally:
        stack.stop()
        service.close()


def test_a_worker_killed_mid_stream_is_replaced_and_its_calls_give_everything_back(stack: Stack):
    first, second = stack.workers()[1], stack.workers()[2]
    victims = stack.streams_while_paused(second, count=2, max_tokens=1000)
    survivors = stack.streams_while_paused(first, count=2, max_tokens=SURVIVOR_TOKENS)
    wait_until(lambda: all(s.request_id for s in victims + survivors), 120, "every stream's first tokens")
    aborted_before = stack.replica.heartbeat().num_aborted

    os.kill(first, signal.SIGKILL)

    for stream in victims:
        assert stream.ended(15) != "done", "a stream of the killed worker went on"
    assert stack.complete().status_code == 200, "a new call was not served after the kill"
    replacement = wait_until(lambda: stack.workers()[1] != first and stack.workers()[1], 60, "a replacement")
    assert f"worker 1 (pid {first}) exited with status -9; starting a replacement" in stack.log()
    assert sorted(stack.live_workers()) == sorted([second, replacement])

    # The engine aborts the dead worker's requests (1000 tokens each: they would run for minutes)
    # once its client's liveness key expires ...
    wait_until(lambda: stack.replica.heartbeat().num_aborted - aborted_before == 2, 60,
               "the engine to abort the killed worker's 2 requests")
    # ... and the other worker's janitor gives their slots and quota holds back.
    victim_ids = {s.request_id for s in victims}
    wait_until(lambda: not stack.held_request_ids() & victim_ids, 60,
               "the killed worker's calls to give their slots and quota holds back")

    for stream in survivors:
        assert stream.ended(300) == "done" and stream.completion_tokens == SURVIVOR_TOKENS
    assert stack.held_request_ids() == set() and stack.registered_calls() == 0
    with sigstopped(second):  # only the replacement accepts: it serves the API
        assert httpx.get(f"{stack.base_url}/v1/models", headers=stack.headers(), timeout=60).status_code == 200
    busy = [SseStream(stack, 4) for _ in range(MAX_CONCURRENT)]  # every slot is free again
    assert [stream.ended(120) for stream in busy] == ["done"] * MAX_CONCURRENT
