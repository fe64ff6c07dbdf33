"""A real daphne server on the test database, for tests that need a live web process (the API
stack, the dashboard in a browser). Rows those tests read must be committed: it is another process."""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
from pathlib import Path

import httpx2 as httpx
from django.conf import settings
from django.db import connection

from tests.service.conftest import REPO_ROOT, _die_with_parent, free_port, wait_until


def live_database_url() -> str:
    """The test database (created by the session fixture) as a DATABASE_URL for the server."""
    db = connection.settings_dict
    if db["ENGINE"].endswith("sqlite3"):
        return f"sqlite:///{db['NAME']}"
    auth = db["USER"] + (f":{db['PASSWORD']}" if db["PASSWORD"] else "")
    return f"postgres://{auth}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


@contextlib.contextmanager
def daphne_server(*, log_path: Path, ready_path: str, host: str = "127.0.0.1", env: dict | None = None):
    """Serve the project with DEBUG off, as in production; yields the base URL once `ready_path`
    answers 200, and prints the server's log tail when done (pytest shows it on failure)."""
    port = free_port()
    environment = {**os.environ, "DATABASE_URL": live_database_url(), "REDIS_URL": settings.REDIS_URL,
                   "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
                   "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost", "DJANGO_SECURE_SSL_REDIRECT": "0",
                   "PYTHONUNBUFFERED": "1", **(env or {})}
    with open(log_path, "wb") as log:
        # Twisted listens with a backlog of 50 unless told: the 200-call bursts of the limit tests then
        # overflow it, and the kernel's dropped SYNs come back as client connect timeouts.
        endpoint = f"tcp:port={port}:interface=127.0.0.1:backlog=4096"
        server = subprocess.Popen([sys.executable, "-m", "daphne", "-e", endpoint, "project.asgi:application"],
                                  cwd=REPO_ROOT, env=environment, stdout=log, stderr=subprocess.STDOUT,
                                  preexec_fn=_die_with_parent)
    base_url = f"http://{host}:{port}"

    def ready():
        assert server.poll() is None, f"daphne exited:\n{log_path.read_text()[-3000:]}"
        try:
            return httpx.get(f"{base_url}{ready_path}", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 90, f"daphne to answer {ready_path}", interval=0.3)
        yield base_url
    finally:
        server.terminate()
        server.wait(10)
        print("--- daphne log ---\n" + log_path.read_text(errors="replace")[-4000:])
