"""Fixtures for the engine service tests: a real Redis, real `python -m engine serve` replicas
running the bundled model, and the real EngineClient. No mocks.

Every `Service` owns a unique key prefix, so tests never see each other's streams; closing it
kills the replicas it started and deletes its keys. The replica's log is kept in a file and its
tail is printed on teardown (pytest shows it when a test fails).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import redis

from engine.config import BUNDLED_MODEL
from engine.service.client import EngineClient
from engine.service.protocol import EngineRequest, Heartbeat, OutputDelta, decode_deltas, decode_heartbeat, encode
from engine.local_services import die_with_parent as _die_with_parent, free_port, redis_answers  # noqa: F401 (shared)
from engine.service.transport import GROUP, Keys

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL = BUNDLED_MODEL
READY_TIMEOUT_S = 120  # loading the model takes ~10 s alone; much more when the machine is busy
# Small KV cache (fast start), float32 on CPU; tests add their own flags after these.
REPLICA_ARGS = ["--dtype", "float32", "--kv-cache-memory-bytes", "300000000", "--max-num-seqs", "16"]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll `predicate` until it returns something truthy (returned); fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- Redis ------------------------------------------------------------------------------------------


class RedisServer:
    """A private `redis-server` on a fixed port (no persistence), which a test may stop and restart."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_dir / f"redis-{self.port}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> RedisServer:
        assert self.process is None or self.process.poll() is not None
        self.process = subprocess.Popen(
            ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "", "--appendonly", "no",
             "--daemonize", "no", "--logfile", str(self.log_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
        client = redis.Redis.from_url(self.url, socket_connect_timeout=1)

        def answers():
            assert self.process.poll() is None, f"redis-server exited; see {self.log_path}"
            with contextlib.suppress(redis.ConnectionError):
                return client.ping()

        wait_until(answers, 10, f"redis-server on port {self.port}")
        client.close()
        return self

    def stop(self) -> None:
        """Kill it (all data is lost, as with a crash: nothing is saved)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """$REDIS_URL (default 127.0.0.1:6379) when it answers, else a private redis-server."""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if redis_answers(url):
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.skip(f"no Redis answers at {url} and there is no redis-server to start")
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server.url
    server.stop()


@pytest.fixture
def make_redis_server(tmp_path):
    """`make_redis_server()` starts a private redis-server, killed at teardown."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        servers.append(RedisServer(tmp_path).start())
        return servers[-1]

    yield make
    for server in servers:
        server.stop()


# -- engine replicas --------------------------------------------------------------------------------


class Replica:
    """One `python -m engine serve` process."""

    def __init__(self, redis_url: str, prefix: str, replica_id: str, args: list[str], log_path: Path,
                 threads: int | None = None) -> None:
        self.replica_id = replica_id
        self.redis_url = redis_url
        self.keys = Keys(prefix)
        self.log_path = log_path
        command = [sys.executable, "-m", "engine", "serve", "--redis-url", redis_url, "--key-prefix", prefix,
                   "--replica-id", replica_id, *REPLICA_ARGS, *args]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=_die_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def heartbeat(self) -> Heartbeat | None:
        client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            value = client.get(self.keys.heartbeat(MODEL, self.replica_id))
        except redis.ConnectionError:
            return None
        finally:
            client.close()
        return decode_heartbeat(value) if value else None

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> Replica:
        def ready():
            assert self.alive(), f"replica {self.replica_id} exited with {self.process.returncode}:\n{self.log_tail()}"
            return self.heartbeat()

        wait_until(ready, timeout, f"replica {self.replica_id} to send a heartbeat", interval=0.2)
        return self

    def send(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no cleanup (its heartbeat expires on its own)."""
        self.send(signal.SIGKILL)
        self.process.wait(30)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class Service:
    """A unique key prefix on one Redis, the replicas serving it, and ways to talk to them."""

    MODEL = MODEL

    def __init__(self, redis_url: str, log_dir: Path) -> None:
        self.redis_url = redis_url
        self.prefix = f"test-{uuid.uuid4().hex[:12]}"
        self.keys = Keys(self.prefix)
        self.reader_id = f"test-reader-{uuid.uuid4().hex[:8]}"  # the reply_to of requests enqueued directly
        self.log_dir = log_dir
        self.replicas: list[Replica] = []

    # replicas

    def start_replica(self, replica_id: str | None = None, *args: str, wait: bool = True,
                      threads: int | None = None) -> Replica:
        replica_id = replica_id or f"replica-{len(self.replicas)}"
        replica = Replica(self.redis_url, self.prefix, replica_id, list(args),
                          self.log_dir / f"{self.prefix}-{replica_id}.log", threads)
        self.replicas.append(replica)
        return replica.wait_ready() if wait else replica

    def start_replicas(self, replica_ids: list[str], *args: str) -> list[Replica]:
        """Start several at once (they load the model in parallel), then wait for all. They share
        the machine's cores: torch threads that outnumber the cores halve the throughput."""
        threads = max(1, len(os.sched_getaffinity(0)) // len(replica_ids))
        replicas = [self.start_replica(replica_id, *args, wait=False, threads=threads)
                    for replica_id in replica_ids]
        return [replica.wait_ready() for replica in replicas]

    def close(self) -> None:
        for replica in self.replicas:
            if replica.alive():
                replica.kill()
            print(f"--- log of replica {replica.replica_id} (exit code {replica.process.returncode}) ---")
            print(replica.log_tail())
        with contextlib.suppress(redis.ConnectionError):
            client = self.sync_redis()
            keys = list(client.scan_iter(match=f"{self.prefix}:*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()

    # talking to them

    def sync_redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=10)

    @contextlib.asynccontextmanager
    async def client(self, **options):
        """An EngineClient for this prefix, inside a running event loop; closed on exit."""
        client = EngineClient(self.redis_url, key_prefix=self.prefix, **options)
        try:
            yield client
        finally:
            await client.close()

    def request(self, prompt: str | list[int] = "The capital of France is", **params) -> EngineRequest:
        """A greedy request (8 tokens unless told otherwise) for the bundled model; its reply_to is
        this Service's reader until a client's submit names the client instead."""
        params = {"temperature": 0.0, "max_tokens": 8, **params}
        text, token_ids = (prompt, None) if isinstance(prompt, str) else (None, list(prompt))
        return EngineRequest(request_id=f"req-{uuid.uuid4().hex}", model=MODEL, prompt=text,
                             prompt_token_ids=token_ids, params=params, reply_to=self.reader_id)

    @staticmethod
    async def collect(stream, timeout: float = 90.0) -> list[OutputDelta]:
        """Every delta of a stream, failing the test (instead of hanging) after `timeout` s."""
        deltas: list[OutputDelta] = []
        try:
            async with asyncio.timeout(timeout):
                async for delta in stream:
                    deltas.append(delta)
        except TimeoutError:
            raise AssertionError(f"the stream did not end within {timeout}s; got {len(deltas)} deltas") from None
        return deltas

    async def run(self, client: EngineClient, request: EngineRequest, timeout: float = 90.0,
                  **submit_options) -> list[OutputDelta]:
        return await self.collect(await client.submit(request, **submit_options), timeout)

    def enqueue_raw(self, fields: dict) -> bytes:
        """XADD an entry to the model's request stream exactly as given (bypassing the client)."""
        client = self.sync_redis()
        try:
            return client.xadd(self.keys.requests(MODEL), fields)
        finally:
            client.close()

    def enqueue(self, request: EngineRequest) -> bytes:
        """Straight onto the request stream, with this Service as the (live) client that reads it."""
        client = self.sync_redis()
        try:
            client.set(self.keys.client(self.reader_id), b"1", ex=3600)
        finally:
            client.close()
        return self.enqueue_raw({"data": encode(request)})

    def deltas_in_redis(self, request_id: str) -> list[OutputDelta]:
        """The deltas of a request enqueued with `enqueue`, as they are in its reply stream now."""
        client = self.sync_redis()
        try:
            entries = client.xrange(self.keys.reply(self.reader_id))
        finally:
            client.close()
        return [d for _, fields in entries for d in decode_deltas(fields[b"data"]) if d.request_id == request_id]

    def read_output(self, request_id: str, timeout: float = 90.0) -> list[OutputDelta]:
        """A request's deltas (enqueued with `enqueue`), up to the finished one."""
        deadline = time.monotonic() + timeout
        while not ((deltas := self.deltas_in_redis(request_id)) and deltas[-1].finished):
            assert time.monotonic() < deadline, f"{request_id} did not finish within {timeout}s: {deltas}"
            time.sleep(0.2)
        return deltas

    def pending_count(self) -> int:
        client = self.sync_redis()
        try:
            return client.xpending(self.keys.requests(MODEL), GROUP)["pending"]
        finally:
            client.close()

    wait_until = staticmethod(wait_until)

    @staticmethod
    def entry_order(entry_id: bytes | str) -> tuple[int, int]:
        """A stream entry id as a sortable (milliseconds, sequence) pair."""
        text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        ms, seq = text.split("-")
        return int(ms), int(seq)

    def last_delivered(self) -> tuple[int, int]:
        """How far the consumer group has read the model's request stream."""
        client = self.sync_redis()
        try:
            [group] = client.xinfo_groups(self.keys.requests(MODEL))
        finally:
            client.close()
        return self.entry_order(group["last-delivered-id"])

    # what a finished stream says

    @staticmethod
    def text_of(deltas: list[OutputDelta]) -> str:
        return "".join(o.text for d in deltas for o in d.outputs)

    @staticmethod
    def token_ids_of(deltas: list[OutputDelta]) -> list[int]:
        return [t for d in deltas for o in d.outputs for t in o.token_ids]

    @staticmethod
    def error_code(deltas: list[OutputDelta]) -> str | None:
        return deltas[-1].error["code"] if deltas and deltas[-1].error else None

    @staticmethod
    def assert_completed(deltas: list[OutputDelta], max_tokens: int | None = None) -> None:
        """The stream ended with a finished delta, no error, and (given max_tokens) that many tokens."""
        assert deltas, "no deltas"
        last = deltas[-1]
        assert last.finished and last.error is None, f"ended with {last}"
        assert all(not d.finished for d in deltas[:-1])
        if max_tokens is not None:
            assert len(Service.token_ids_of(deltas)) == max_tokens == last.usage.completion_tokens
            assert last.outputs[-1].finish_reason == "length"


@pytest.fixture
def make_service(redis_url, tmp_path):
    """`make_service(redis_url=None)`: a Service with its own prefix; replicas killed and keys
    deleted at teardown."""
    services: list[Service] = []

    def make(url: str | None = None) -> Service:
        services.append(Service(url or redis_url, tmp_path))
        return services[-1]

    yield make
    for service in services:
        service.close()


@pytest.fixture
def service(make_service) -> Service:
    return make_service()


@pytest.fixture(scope="module")
def make_module_service(redis_url, tmp_path_factory):
    """`make_module_service()`: as make_service, for Services shared by one test module."""
    services: list[Service] = []
    log_dir = tmp_path_factory.mktemp("service")

    def make() -> Service:
        services.append(Service(redis_url, log_dir))
        return services[-1]

    yield make
    for service in services:
        service.close()


@pytest.fixture(scope="module")
def module_service(make_module_service) -> Service:
    """A Service shared by one test module (start its replicas in a module fixture)."""
    return make_module_service()
