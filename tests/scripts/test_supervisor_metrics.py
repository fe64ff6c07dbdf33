"""/metrics under `project.supervisor`: a scrape that lands on any web worker counts the calls all of
them served, and has the per-request and engine figures an operator needs (a real engine replica
with the bundled model, two daphne workers, SQLite, a tenant made with the management commands).

Each worker in turn is SIGSTOPped while the other serves its share of the calls (only a running
process accepts from the shared socket), so both have counted some before the scrapes.
"""
from __future__ import annotations

import contextlib
import os
import re
import secrets
from pathlib import Path

import httpx2 as httpx
import pytest

from engine.local_services import free_port, redis_answers
from tests.scripts.web_tier import database_with_a_key, sigstopped, start_supervisor, wait_for, web_env
from tests.service.conftest import MODEL, Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
CALLS_PER_WORKER = 6
METRICS_TOKEN = secrets.token_urlsafe(24)



def refused_calls_counted(text: str) -> float:
    match = re.search(r'^llm_api_errors_total\{status="401"\} (\S+)$', text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


class Tier:
    def __init__(self, base_url: str, pids: list[int], metrics_dir: Path, key: str) -> None:
        self.base_url, self.pids, self.metrics_dir, self.key = base_url, pids, metrics_dir, key

    def scrape(self) -> str:
        scrape = httpx.get(f"{self.base_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"},
                           timeout=30)
        assert scrape.status_code == 200, scrape.text[:500]
        return scrape.text


@pytest.fixture(scope="module")
def tier(tmp_path_factory):
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(redis_url):
        pytest.skip(f"no Redis at {redis_url}")
    tmp_path = tmp_path_factory.mktemp("metrics")
    service = Service(redis_url, tmp_path)
    service.start_replica("replica", wait=False)  # loads the model while the database is made
    env = web_env(tmp_path, redis_url, service.prefix, METRICS_TOKEN=METRICS_TOKEN,
                  PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "metrics"))
    key = database_with_a_key(env)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "counter_999999.db").write_bytes(b"stale")  # an earlier run's: removed at start
    port, log_path = free_port(), tmp_path / "supervisor.log"
    supervisor = start_supervisor(env, port, 2, log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        def pids():
            found = re.findall(r"worker \d+ started \(pid (\d+)\)", log_path.read_text(errors="replace"))
            return [int(pid) for pid in found] if len(found) == 2 else None

        worker_pids = wait_for(pids, 60, "two workers to start")
        service.replicas[0].wait_ready()
        for pid in worker_pids:  # each must answer on its own before the other is stopped
            with sigstopped(next(p for p in worker_pids if p != pid)):
                wait_for(lambda: _answers(base_url), 120, f"worker {pid} to answer")
        yield Tier(base_url, worker_pids, tmp_path / "metrics", key)
    finally:
        supervisor.terminate()
        supervisor.wait(60)
        print("--- supervisor log ---\n" + log_path.read_text(errors="replace")[-4000:])
        service.close()


def _answers(base_url: str) -> bool:
    with contextlib.suppress(httpx.HTTPError):
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    return False


def test_every_workers_metrics_count_the_calls_of_all_of_them(tier):
    first, second = tier.pids
    assert not (tier.metrics_dir / "counter_999999.db").exists()
    for stopped in (first, second):
        with sigstopped(stopped):
            for _ in range(CALLS_PER_WORKER):  # a new connection each: the running worker takes it
                refused = httpx.get(f"{tier.base_url}/v1/models", headers={"Authorization": "Bearer sk-wrong"},
                                    timeout=30)
                assert refused.status_code == 401
    counts = set()
    for stopped in (first, second, None):  # a scrape served by each worker, then by either
        with sigstopped(stopped) if stopped else contextlib.nullcontext():
            counts.add(refused_calls_counted(tier.scrape()))
    assert counts == {2 * CALLS_PER_WORKER}


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one series: `name` with at least these labels (the first match)."""
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        if series.split("{")[0] == name and all(f'{k}="{v}"' in series for k, v in labels.items()):
            return float(value)
    raise AssertionError(f"no series {name} {labels} in /metrics")


def test_metrics_have_latencies_per_request_and_the_engines_figures(tier):
    for stopped in tier.pids:  # one call served by each worker
        with sigstopped(stopped):
            answer = httpx.post(f"{tier.base_url}/v1/completions", headers={"Authorization": f"Bearer {tier.key}"},
                                json={"model": MODEL, "prompt": "Hello there", "max_tokens": 4, "ignore_eos": True},
                                timeout=300)
            assert answer.status_code == 200, answer.text[:500]
    labels = {"endpoint": "completions"}

    def scraped_after_a_step():
        text = tier.scrape()
        return text if sample(text, "llm_engine_step_seconds") > 0 else None

    text = wait_for(scraped_after_a_step, 30, "a heartbeat with step times")
    assert sample(text, "llm_api_requests_total", status="ok", **labels) == 2
    assert sample(text, "llm_e2e_request_latency_seconds_count", **labels) == 2
    assert 0 < sample(text, "llm_e2e_request_latency_seconds_sum", **labels) < 600
    for name in ("queue", "prefill", "decode"):
        assert sample(text, f"llm_request_{name}_time_seconds_count", **labels) == 2
        assert 0 <= sample(text, f"llm_request_{name}_time_seconds_sum", **labels) < 600
    assert sample(text, "llm_request_decode_time_seconds_sum", **labels) > 0  # 3 tokens after the first
    assert sample(text, "llm_time_to_first_token_seconds_count", **labels) == 2
    engine = {"model": MODEL}
    assert sample(text, "llm_engine_device_memory_bytes", **engine) > 10_000_000  # weights and KV cache
    assert 0 < sample(text, "llm_engine_step_seconds", **engine) < 60
    assert sample(text, "llm_engine_prefix_cache_queries_total", **engine) >= 2  # both prompts were looked up
    assert 0 <= sample(text, "llm_engine_prefix_cache_hits_total", **engine) \
        <= sample(text, "llm_engine_prefix_cache_queries_total", **engine)
    assert sample(text, "llm_engine_preemptions_total", **engine) == 0
    for name in ("llm_engine_running_requests", "llm_engine_waiting_requests", "llm_engine_kv_cache_usage_ratio",
                 "llm_engine_queue_depth"):
        assert sample(text, name, **engine) >= 0
