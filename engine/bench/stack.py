"""`python -m engine.bench serve --launch`: the whole service on this machine, for one benchmark run.

A Redis (the one at --redis-url if it answers, else a private server), a key prefix of its own, a
throwaway SQLite database with a tenant whose limits never bind, one engine replica and the web
tier, ready once /ready sees the engine and every web worker has reported itself warm (it has paid
at its start what its first calls would). Each child runs in a session of its own and logs to a
file; one that exits while the stack starts fails the start at once, with its log tail. Everything
is stopped on exit, error, Ctrl-C or SIGTERM. The offline benchmarks run in a child process too:
its exit frees all the GPU memory it held, which deleting an `LLM` in this process does not
guarantee.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import redis

from engine.cli_args import engine_flags
from engine.local_services import die_with_parent, free_port, redis_answers

REPO_ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600  # loading a large model; a child that dies ends the wait long before
TENANT = "bench"
UNBOUNDED_LIMITS = ["--requests-per-minute", "100000000", "--tokens-per-minute", "1000000000",
                    "--max-concurrent-requests", "100000", "--max-sequences-in-flight", "100000"]

class StackError(RuntimeError):
    pass


class Child:
    """One process in a session of its own (a stop reaches its children too), logging to a file."""

    def __init__(self, name: str, command: list[str], log_dir: Path, env: dict | None = None) -> None:
        self.name, self.log_path = name, log_dir / f"{name}.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                            start_new_session=True, preexec_fn=die_with_parent)

    def check(self) -> None:
        if self.process.poll() is not None:
            raise StackError(f"{self.name} exited with {self.process.returncode}:\n{self.tail()}")

    def stop(self, timeout: float = 30) -> None:
        self._signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout)
        self._signal(signal.SIGKILL)  # the leader if it is still there, and whatever its group left behind
        self.process.wait()

    def tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)


class LaunchedStack:
    """`with LaunchedStack(...) as stack:` serves `stack.model` at `stack.base_url` to `stack.api_key`."""

    def __init__(self, engine_options: dict, *, web_workers: int, redis_url: str, log_dir: str | None) -> None:
        self.engine_options, self.model = engine_options, engine_options["model"]
        self.web_workers, self.redis_url = web_workers, redis_url
        self.work_dir = Path(tempfile.mkdtemp(prefix="bench-serve-"))
        self.log_dir = Path(log_dir) if log_dir else self.work_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.prefix = f"bench-{uuid.uuid4().hex[:12]}"
        self.children: list[Child] = []
        self.redis_server: Child | None = None  # set when no Redis answered at redis_url
        self.base_url = self.api_key = None

    def __enter__(self) -> LaunchedStack:
        self._previous_sigterm = signal.signal(signal.SIGTERM, _exit_on_sigterm)
        try:
            self._start()
        except BaseException:
            self._stop(failed=True)
            raise
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        self._stop(failed=exc_type is not None)

    def _start(self) -> None:
        if not redis_answers(self.redis_url):
            self._start_redis()
        self._spawn("engine", [sys.executable, "-m", "engine", "serve", "--redis-url", self.redis_url,
                               "--key-prefix", self.prefix, *engine_flags(self.engine_options)], os.environ)
        env = {**os.environ, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
               "DJANGO_ALLOWED_HOSTS": "127.0.0.1,localhost", "DJANGO_SECURE_SSL_REDIRECT": "0",
               "REDIS_URL": self.redis_url, "ENGINE_KEY_PREFIX": self.prefix, "LOG_LEVEL": "WARNING",
               "DATABASE_URL": f"sqlite:///{self.work_dir / 'db.sqlite3'}"}  # an absolute path: four slashes
        self._manage(env, "migrate", "--no-input")  # while the engine loads its model
        self._manage(env, "create_tenant", TENANT, *UNBOUNDED_LIMITS)
        self.api_key = self._manage(env, "create_api_key", TENANT).splitlines()[-1].strip()
        port = free_port()
        web = self._spawn("web", self._web_command(port), env)
        self.base_url = f"http://127.0.0.1:{port}"
        self._wait_for(self._healthy, f"{self.base_url}/ready to report an engine for {self.model}")
        self._wait_for(lambda: self._web_workers_warm(web), f"all {self.web_workers} web workers to warm up")

    def _start_redis(self) -> None:
        server = shutil.which("redis-server") or shutil.which("valkey-server")
        if server is None:
            raise StackError(f"no Redis answers at {self.redis_url}, and there is no redis-server or valkey-server")
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        self.redis_server = self._spawn("redis", [server, "--bind", "127.0.0.1", "--port", str(port), "--save", "",
                                                  "--appendonly", "no"], os.environ)
        self._wait_for(lambda: redis_answers(self.redis_url), f"{server} on port {port}")

    def _web_command(self, port: int) -> list[str]:
        """The supervisor, also for one worker: its socket's backlog is 4096, while daphne's own listener
        (Twisted's default) queues 50 connections, and a burst of hundreds had connections reset."""
        return [sys.executable, "-m", "project.supervisor", "--workers", str(self.web_workers), "--host", "127.0.0.1",
                "--port", str(port)]

    def _spawn(self, name: str, command: list[str], env) -> Child:
        self.children.append(Child(name, command, self.log_dir, {**env, "PYTHONUNBUFFERED": "1"}))
        return self.children[-1]

    def _manage(self, env: dict, *args: str) -> str:
        done = subprocess.run([sys.executable, "manage.py", *args], cwd=REPO_ROOT, env=env, capture_output=True,
                              text=True, preexec_fn=die_with_parent)
        if done.returncode:
            raise StackError(f"manage.py {' '.join(args)} exited with {done.returncode}:\n{done.stdout}{done.stderr}")
        return done.stdout

    def _healthy(self) -> bool:
        import httpx2 as httpx  # here: the service bench uses this module too, with no HTTP client

        try:
            response = httpx.get(f"{self.base_url}/ready", timeout=2)
        except httpx.HTTPError:
            return False
        return response.status_code == 200 and response.json()["engines"].get(self.model, 0) > 0

    def _web_workers_warm(self, web: Child) -> bool:
        """Whether every web worker has reported itself warm for the model: each one writes
        `{prefix}:web-warm:{its client id}` = {"pid", "models"} once it has paid what a first call
        would (inference/warmup.py), so a run's first requests find no cold worker."""
        workers = _children(web.process.pid)
        if len(workers) < self.web_workers:
            return False
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=10)
        try:
            keys = list(client.scan_iter(match=f"{self.prefix}:web-warm:*", count=1000))
            reports = [json.loads(value) for value in client.mget(keys) if value is not None] if keys else []
        finally:
            client.close()
        warm = {report["pid"] for report in reports if self.model in report["models"]}
        return workers <= warm

    def _wait_for(self, predicate, what: str) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not predicate():
            for child in self.children:
                child.check()
            if time.monotonic() > deadline:
                raise StackError(f"timed out after {START_TIMEOUT_S} s waiting for {what}")
            time.sleep(0.3)

    def _stop(self, failed: bool) -> None:
        """The web tier first (no new requests), then the engine; a shared Redis loses only our keys."""
        signal.signal(signal.SIGTERM, self._previous_sigterm)
        for child in reversed(self.children):
            if child is not self.redis_server:
                child.stop()
        if self.redis_server is None:
            delete_keys(self.redis_url, self.prefix)
        else:
            self.redis_server.stop()
        if failed:
            for child in self.children:
                print(f"--- {child.name} (exit code {child.process.returncode}), {child.log_path} ---\n{child.tail()}",
                      file=sys.stderr)
        else:
            shutil.rmtree(self.work_dir, ignore_errors=True)


def _children(pid: int) -> set[int]:
    """The pids of a process's children (the supervisor's workers)."""
    with contextlib.suppress(FileNotFoundError):
        return {int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
    return set()


def _exit_on_sigterm(signum, frame) -> None:
    sys.exit(128 + signum)  # unwinds like Ctrl-C, so the stack is torn down


def delete_keys(redis_url: str, prefix: str) -> None:
    with contextlib.suppress(redis.ConnectionError):
        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=10)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()


def offline_throughput(engine_options: dict, *, num_prompts: int, input_len, output_len) -> dict:
    """The throughput bench's figures, EOS ignored, for the requests `make_workload` makes from the
    same lengths and seed (engine_options carries the seed)."""
    flags = ["--num-prompts", str(num_prompts), "--input-len", str(input_len), "--output-len", str(output_len),
             "--ignore-eos"]
    return run_offline_bench("throughput", engine_options, flags)["engine"]


def run_offline_bench(subcommand: str, engine_options: dict, flags: list[str]) -> dict:
    """`python -m engine.bench SUBCOMMAND FLAGS` in a child process; returns its JSON results."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "results.json"
        subprocess.run([sys.executable, "-m", "engine.bench", subcommand, *flags, *engine_flags(engine_options),
                        "--json", str(path)], cwd=REPO_ROOT, check=True, preexec_fn=die_with_parent)
        return json.loads(path.read_text())
