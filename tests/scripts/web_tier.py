"""The web tier as production runs it, for end-to-end tests: a fresh SQLite database migrated with
the management commands, a tenant and its key, and `project.supervisor` with N daphne workers."""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.local_services import die_with_parent

REPO_ROOT = Path(__file__).resolve().parents[2]


def web_env(tmp_path: Path, redis_url: str, key_prefix: str, **extra: str) -> dict[str, str]:
    return {**os.environ, "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}", "REDIS_URL": redis_url,
            "ENGINE_KEY_PREFIX": key_prefix, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
            "DJANGO_ALLOWED_HOSTS": "127.0.0.1", "DJANGO_SECURE_SSL_REDIRECT": "0", **extra}


def manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def database_with_a_key(env: dict[str, str]) -> str:
    """Migrate, create tenant `t` (default limits) and return a raw key of it."""
    manage(env, "migrate", "--no-input")
    manage(env, "create_tenant", "t")
    return manage(env, "create_api_key", "t").strip().splitlines()[-1]


def start_supervisor(env: dict[str, str], port: int, workers: int, log_path: Path) -> subprocess.Popen:
    with open(log_path, "wb") as log:
        return subprocess.Popen([sys.executable, "-m", "project.supervisor", "--workers", str(workers), "--port",
                                 str(port)], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                preexec_fn=die_with_parent)


def wait_for(predicate, timeout: float, what: str):
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


@contextlib.contextmanager
def sigstopped(pid: int):
    """Pause a worker: only a running process accepts from the shared socket."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)
