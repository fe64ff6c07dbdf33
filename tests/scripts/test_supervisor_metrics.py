"""/metrics under `project.supervisor` adds up every web worker's counters: a scrape that lands on any
worker sees the calls all of them served. No engine is needed: the calls counted are refused (401).

Each worker in turn is SIGSTOPped while the other serves half of the calls (only a running process
accepts from the shared socket), so both have counted some before the scrapes.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import pytest

from engine.local_services import die_with_parent, free_port, redis_answers

REPO_ROOT = Path(__file__).resolve().parents[2]
CALLS_PER_WORKER = 6
METRICS_TOKEN = secrets.token_urlsafe(24)


@contextlib.contextmanager
def sigstopped(pid: int):
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def refused_calls_counted(text: str) -> float:
    match = re.search(r'^llm_api_errors_total\{status="401"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@pytest.fixture
def workers(tmp_path):
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(redis_url):
        pytest.skip(f"no Redis at {redis_url}")
    env = {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "REDIS_URL": redis_url,
           "ENGINE_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}", "DJANGO_DEBUG": "0",
           "DJANGO_SECRET_KEY": secrets.token_urlsafe(50), "DJANGO_ALLOWED_HOSTS": "127.0.0.1",
           "DJANGO_SECURE_SSL_REDIRECT": "0", "METRICS_TOKEN": METRICS_TOKEN,
           "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    migrated = subprocess.run([sys.executable, "manage.py", "migrate", "--no-input"], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, timeout=180)
    assert migrated.returncode == 0, migrated.stderr
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_999999.db").write_bytes(b"stale")  # an earlier run's: removed at start
    port, log_path = free_port(), tmp_path / "supervisor.log"
    with open(log_path, "wb") as log:
        supervisor = subprocess.Popen([sys.executable, "-m", "project.supervisor", "--workers", "2", "--port",
                                       str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      preexec_fn=die_with_parent)
    base_url = f"http://127.0.0.1:{port}"
    try:
        def pids():
            found = re.findall(r"worker \d+ started \(pid (\d+)\)", log_path.read_text(errors="replace"))
            return [int(pid) for pid in found] if len(found) == 2 else None

        worker_pids = wait_for(pids, 60, "two workers to start")
        for pid in worker_pids:  # each must answer on its own before the other is stopped
            with sigstopped(next(p for p in worker_pids if p != pid)):
                wait_for(lambda: _answers(base_url), 120, f"worker {pid} to answer")
        yield base_url, worker_pids, tmp_path / "metrics"
    finally:
        supervisor.terminate()
        supervisor.wait(60)
        print("--- supervisor log ---\n" + log_path.read_text(errors="replace")[-4000:])


def _answers(base_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    return False


def test_every_workers_metrics_count_the_calls_of_all_of_them(workers):
    base_url, (first, second), metrics_dir = workers
    assert not (metrics_dir / "counter_999999.db").exists()
    for stopped in (first, second):
        with sigstopped(stopped):
            for _ in range(CALLS_PER_WORKER):  # a new connection each: the running worker takes it
                refused = httpx.get(f"{base_url}/v1/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=30)
                assert refused.status_code == 401
    counts = set()
    for stopped in (first, second, None):  # a scrape served by each worker, then by either
        with sigstopped(stopped) if stopped else contextlib.nullcontext():
            scrape = httpx.get(f"{base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                               timeout=30)
        assert scrape.status_code == 200, scrape.text[:500]
        counts.add(refused_calls_counted(scrape.text))
    assert counts == {2 * CALLS_PER_WORKER}
