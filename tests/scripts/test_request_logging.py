"""Each request is one line of the web server's log, under both of scripts/serve's web servers:
runserver (development) and the supervisor's daphne workers (production)."""
from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx2 as httpx
import pytest

from tests.service.conftest import REPO_ROOT, free_port, wait_until

pytestmark = pytest.mark.timeout(120)

SERVERS = {
    "runserver": lambda port: [sys.executable, "manage.py", "runserver", "--noreload", f"127.0.0.1:{port}"],
    "supervisor": lambda port: [sys.executable, "-m", "project.supervisor", "--workers", "1", "--port", str(port)],
}


@pytest.mark.parametrize("server", SERVERS)
def test_each_request_is_logged_once(server: str, tmp_path: Path):
    port, log = free_port(), tmp_path / "web.log"
    env = {**os.environ, "DJANGO_DEBUG": "1", "LOG_LEVEL": "INFO",
           "ENGINE_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}"}
    with open(log, "wb") as out:
        web = subprocess.Popen(SERVERS[server](port), cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                               start_new_session=True)
    try:
        def answers():
            assert web.poll() is None, log.read_text()
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
            except httpx.HTTPError:
                return None

        wait_until(answers, 60, "the web server")
        marker = uuid.uuid4().hex
        assert httpx.get(f"http://127.0.0.1:{port}/health?{marker}=ok").status_code == 200
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models?{marker}=401").status_code == 401
        wait_until(lambda: f"{marker}=401" in log.read_text(), 10, "the 401 in the log")
    finally:
        web.terminate()
        web.wait(30)
    lines = log.read_text().splitlines()
    for request in (f"/health?{marker}=ok", f"/v1/models?{marker}=401"):
        assert len([line for line in lines if request in line]) == 1, "\n".join(lines)
    assert not [line for line in lines if "Unauthorized: /v1/models" in line], "\n".join(lines)
