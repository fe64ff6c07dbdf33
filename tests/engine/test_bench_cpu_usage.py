"""`python -m engine.bench.cpu_usage` on this machine's real /proc: a busy child that looks like an
engine replica must have its CPU put under that role, and on its main thread."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.bench.cpu_usage import format_summary, own_role, summarize

REPO_ROOT = Path(__file__).resolve().parents[2]
BUSY = "import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\nwhile True: pass"


def test_roles_come_from_the_command_line():
    assert own_role(["/usr/bin/python3", "-m", "engine", "serve", "--model", "x"], "python3") == "replica"
    assert own_role(["python3", "-m", "engine.bench", "serve", "--launch"], "python3") == "bench"
    assert own_role(["python3", "-m", "engine.bench", "throughput"], "python3") == "offline"
    assert own_role(["python3", "-m", "daphne", "--fd", "3", "project.asgi:application"], "python3") == "web"
    assert own_role(["valkey-server *:6379"], "valkey-server") == "valkey"
    assert own_role(["bash"], "bash") == "other"
    assert own_role(["timeout", "600", "python3", "-m", "engine.bench", "serve"], "timeout") == "other"


def test_a_busy_replica_and_its_main_thread_are_attributed(tmp_path):
    out = tmp_path / "cpu.json"
    busy = subprocess.Popen([sys.executable, "-c", BUSY, "engine", "serve"])  # argv as `python -m engine serve`
    try:
        done = subprocess.run([sys.executable, "-m", "engine.bench.cpu_usage", "--out", str(out), "--interval", "0.25",
                               "--duration", "1"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
    finally:
        busy.kill()
        busy.wait()
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    pid = str(busy.pid)
    assert data["processes"][pid]["role"] == "replica"
    summary = summarize(data)
    assert summary["roles"]["replica"]["mean"] > 20  # one spinning core, on a loaded machine too
    threads = summary["threads"][pid]
    assert threads[0]["main"] and threads[0]["tid"] == pid  # the spinning one, not the sleeping one
    assert "replica" in done.stdout and format_summary(summary) in done.stdout
