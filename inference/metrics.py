"""Prometheus metrics of the API and of the engines (their heartbeats, at scrape).

Under `project.supervisor` every web worker writes its counters and histograms to files in
PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode; the supervisor sets it up), and
any worker's /metrics sums them over all workers, the dead ones included, so a scrape that lands
on any worker sees the whole tier. A lone process (runserver, one daphne) reports itself. Engine
gauges come from the heartbeats in Redis: the same from any worker.
"""
from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from engine.service.protocol import Heartbeat, Usage

REQUESTS = Counter("llm_api_requests_total", "API calls that reached an engine, by outcome",
                   ["endpoint", "status"])
REFUSALS = Counter("llm_api_refusals_total", "API calls refused by rate limits or quotas", ["endpoint", "code"])
ERRORS = Counter("llm_api_errors_total", "API error responses, by HTTP status", ["status"])
TOKENS = Counter("llm_tenant_tokens_total", "Tokens in and out, per tenant", ["tenant", "direction"])
TTFT = Histogram("llm_time_to_first_token_seconds", "Time to first token", ["endpoint"],
                 buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
TPOT = Histogram("llm_time_per_output_token_seconds", "Time per output token after the first", ["endpoint"],
                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1))
_LONG = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
E2E = Histogram("llm_e2e_request_latency_seconds", "A call from its arrival to its last byte", ["endpoint"],
                buckets=_LONG)
# Per engine request, from the engine's own clock (the final delta's timings).
QUEUE_TIME = Histogram("llm_request_queue_time_seconds", "Waiting in a replica before first admission",
                       ["endpoint"], buckets=_LONG)
PREFILL_TIME = Histogram("llm_request_prefill_time_seconds", "From first admission to the first token",
                         ["endpoint"], buckets=_LONG)
DECODE_TIME = Histogram("llm_request_decode_time_seconds", "From the first token to the last", ["endpoint"],
                        buckets=_LONG)
_TIMINGS = {"queue_s": QUEUE_TIME, "prefill_s": PREFILL_TIME, "decode_s": DECODE_TIME}


def observe_call(*, endpoint: str, tenant: str, status: str, usage: Usage, ttft_s: float | None,
                 duration_s: float, engine_timings: list[dict] = ()) -> None:
    REQUESTS.labels(endpoint, status).inc()
    E2E.labels(endpoint).observe(duration_s)
    for timings in engine_timings:
        for name, histogram in _TIMINGS.items():
            value = timings.get(name)
            if isinstance(value, (int, float)) and value >= 0:
                histogram.labels(endpoint).observe(value)
    TOKENS.labels(tenant, "in").inc(usage.prompt_tokens)
    TOKENS.labels(tenant, "out").inc(usage.completion_tokens)
    if ttft_s is not None:
        TTFT.labels(endpoint).observe(ttft_s)
        if usage.completion_tokens > 1:
            TPOT.labels(endpoint).observe((duration_s - ttft_s) / (usage.completion_tokens - 1))


def observe_refusal(*, endpoint: str, tenant: str, code: str) -> None:
    REFUSALS.labels(endpoint, code).inc()


def observe_error(*, status: int) -> None:
    ERRORS.labels(str(status)).inc()


# Heartbeat field -> (metric, help, family): one series per model and replica.
_ENGINE_FIGURES = {
    "queue_depth": ("llm_engine_queue_depth", "Requests queued in a replica", GaugeMetricFamily),
    "num_running": ("llm_engine_running_requests", "Requests running in a replica", GaugeMetricFamily),
    "num_waiting": ("llm_engine_waiting_requests", "Requests waiting in a replica", GaugeMetricFamily),
    "kv_cache_usage": ("llm_engine_kv_cache_usage_ratio", "KV cache blocks in use", GaugeMetricFamily),
    "tokens_per_s": ("llm_engine_generation_tokens_per_second", "Tokens generated per second over the last minute",
                     GaugeMetricFamily),
    "device_memory_bytes": ("llm_engine_device_memory_bytes", "Weights and KV cache a replica holds on its device",
                            GaugeMetricFamily),
    "step_seconds": ("llm_engine_step_seconds", "Mean engine step over the last minute", GaugeMetricFamily),
    "num_preemptions": ("llm_engine_preemptions", "Sequences preempted since start", CounterMetricFamily),
    "prefix_cache_queries": ("llm_engine_prefix_cache_queries", "Prompt tokens looked up in the prefix cache",
                             CounterMetricFamily),
    "prefix_cache_hits": ("llm_engine_prefix_cache_hits", "Prompt tokens served by the prefix cache",
                          CounterMetricFamily),
    # Acceptance rate: rate(..._accepted_tokens_total) / rate(..._draft_tokens_total).
    "spec_num_draft_tokens": ("llm_engine_spec_decode_draft_tokens", "Tokens proposed by speculative decoding",
                              CounterMetricFamily),
    "spec_num_accepted_tokens": ("llm_engine_spec_decode_accepted_tokens", "Proposed tokens the model confirmed",
                                 CounterMetricFamily),
    "spec_num_steps": ("llm_engine_spec_decode_steps", "Sequence steps that speculated", CounterMetricFamily),
}


def exposition(replicas: dict[str, list[Heartbeat]]) -> bytes:
    """The API's metrics plus one family per engine figure (from its heartbeat), labelled by model and
    replica; the prefix-cache hit rate is rate(..._hits_total) / rate(..._queries_total)."""
    families = {field: family(name, help_text, labels=["model", "replica"])
                for field, (name, help_text, family) in _ENGINE_FIGURES.items()}
    for model, beats in replicas.items():
        for beat in beats:
            for field, family in families.items():
                family.add_metric([model, beat.replica_id], float(getattr(beat, field)))
    engines = CollectorRegistry()
    engines.register(_Families(list(families.values())))
    return _api_metrics() + generate_latest(engines)


def _api_metrics() -> bytes:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return generate_latest()
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return generate_latest(registry)


class _Families:
    def __init__(self, families) -> None:
        self.families = families

    def collect(self):
        return self.families
