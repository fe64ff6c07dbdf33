"""The README's main command, end to end: scripts/serve starts everything, the seed tutorial's
`openai` calls work with the key it prints, and Ctrl-C stops every process it started."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx2 as httpx
import openai
import pytest

from tests.service.conftest import REPO_ROOT, free_port, redis_answers, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]


def test_serve_starts_everything_and_ctrl_c_stops_it(tmp_path: Path):
    if not redis_answers(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")):
        pytest.skip("no Redis")
    port, log = free_port(), tmp_path / "serve.log"
    env = {**os.environ, "PORT": str(port), "DATABASE_URL": f"sqlite:///{tmp_path / 'serve.sqlite3'}",
           "ENGINE_KEY_PREFIX": f"test-{uuid.uuid4().hex[:12]}", "ENGINE_ARGS": "--kv-cache-memory-bytes 300000000"}
    with open(log, "wb") as out:
        serve = subprocess.Popen(["scripts/serve"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    try:
        key = wait_until(lambda: re.search(r"Demo key:\s+(\S+)", log.read_text()), 240, "the demo key").group(1)
        base = f"http://127.0.0.1:{port}"

        def healthy():
            assert serve.poll() is None, log.read_text()[-3000:]
            try:
                response = httpx.get(f"{base}/ready", timeout=2)
            except httpx.HTTPError:
                return False
            return response.status_code == 200 and response.json()["engines"]

        wait_until(healthy, 240, "the service and its engine to be healthy", interval=0.5)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                               max_tokens=8)
        assert reply.choices[0].message.content
        stream = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=8, stream=True)
        assert "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    finally:
        os.killpg(serve.pid, signal.SIGINT)  # what Ctrl-C in the terminal sends
        serve.wait(60)
    def survivors() -> str:
        return subprocess.run(["pgrep", "-a", "-g", str(serve.pid)], capture_output=True, text=True).stdout

    deadline = time.monotonic() + 20
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert survivors() == "", f"processes left running:\n{survivors()}\n{log.read_text()[-2000:]}"
