"""One streamed call, one trace: spans from the web worker and from the engine replica, linked.

An OTLP/HTTP collector runs in this process (it decodes what the SDK's exporter posts); the web tier
(`project.supervisor`, one daphne worker) and an engine replica with the bundled model export to it
because OTEL_EXPORTER_OTLP_ENDPOINT names it. A second part checks that without the variable no
span is sent.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx2 as httpx
import pytest

from engine.local_services import free_port, redis_answers
from tests.scripts.web_tier import database_with_a_key, start_supervisor, wait_for, web_env
from tests.service.conftest import MODEL, Service

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


class Collector(ThreadingHTTPServer):
    """Receives OTLP/HTTP trace exports: (service, trace id, span id, parent span id, name) per span."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ExportHandler)
        self.spans: list[tuple[str, str, str, str, str]] = []
        self.lock = threading.Lock()
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def received(self) -> list[tuple[str, str, str, str, str]]:
        with self.lock:
            return list(self.spans)


class _ExportHandler(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest, ExportTraceServiceResponse,
        )

        export = ExportTraceServiceRequest.FromString(self.rfile.read(int(self.headers["Content-Length"])))
        for resource_spans in export.resource_spans:
            service = next(a.value.string_value for a in resource_spans.resource.attributes
                           if a.key == "service.name")
            for scope_spans in resource_spans.scope_spans:
                with self.server.lock:
                    self.server.spans.extend((service, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(),
                                              s.name) for s in scope_spans.spans)
        body = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@contextlib.contextmanager
def traced_stack(tmp_path: Path, monkeypatch, endpoint: str | None):
    """A replica and one web worker exporting to `endpoint` (None: tracing off); yields (url, key)."""
    redis_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if not redis_answers(redis_url):
        pytest.skip(f"no Redis at {redis_url}")
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "200"} if endpoint else {}
    for name, value in otel.items():
        monkeypatch.setenv(name, value)  # the replica's environment is this process's
    if not endpoint:
        monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    service = Service(redis_url, tmp_path)
    service.start_replica("replica", wait=False)
    env = web_env(tmp_path, redis_url, service.prefix)
    key = database_with_a_key(env)
    port, log_path = free_port(), tmp_path / "web.log"
    web = start_supervisor(env, port, 1, log_path)
    base_url = f"http://127.0.0.1:{port}"
    try:
        service.replicas[0].wait_ready()

        def ready() -> bool:
            with contextlib.suppress(httpx.HTTPError):
                return httpx.get(f"{base_url}/ready", timeout=2).status_code == 200
            return False

        wait_for(ready, 120, "the web worker to see the engine")
        yield base_url, key
    finally:
        web.terminate()
        web.wait(60)
        print("--- web log ---\n" + log_path.read_text(errors="replace")[-3000:])
        service.close()


def stream_one_call(base_url: str, key: str) -> str:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 4, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{base_url}/v1/completions", headers={"Authorization": f"Bearer {key}"}, json=body,
                      timeout=300) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return json.loads(lines[0][len("data: "):])["id"]


def test_a_streamed_call_is_one_trace_across_the_web_and_engine_processes(tmp_path, monkeypatch):
    collector = Collector()
    try:
        with traced_stack(tmp_path, monkeypatch, collector.endpoint) as (base_url, key):
            stream_one_call(base_url, key)

            def engine_spans():
                spans = [s for s in collector.received() if s[0] == "llm-engine"]
                return spans if len(spans) == 4 else None

            engine = wait_for(engine_spans, 30, "the engine's spans")
            trace_id = engine[0][1]

            def web_spans():
                spans = [s for s in collector.received() if s[0] == "llm-web" and s[1] == trace_id]
                return spans if len(spans) >= 2 else None

            web = wait_for(web_spans, 30, "the web spans of the same trace")
    finally:
        collector.shutdown()
    by_name = {name: (trace_id, span_id, parent) for _, trace_id, span_id, parent, name in engine}
    assert set(by_name) == {"llm.engine.request", "llm.engine.queue", "llm.engine.prefill", "llm.engine.decode"}
    trace_id, request_span, web_parent = by_name["llm.engine.request"]
    assert all(by_name[f"llm.engine.{phase}"][0] == trace_id and by_name[f"llm.engine.{phase}"][2] == request_span
               for phase in ("queue", "prefill", "decode"))
    # The web worker's request span is the engine's parent; admission is a phase of it.
    request = [s for s in web if s[1] == trace_id and s[2] == web_parent]
    assert len(request) == 1 and re.search(r"completions", request[0][4]), web
    admission = [s for s in web if s[1] == trace_id and s[4] == "llm.admission"]
    assert len(admission) == 1 and admission[0][3] == web_parent, web


def test_without_an_endpoint_nothing_is_traced(tmp_path, monkeypatch):
    collector = Collector()  # listening, but named nowhere
    try:
        with traced_stack(tmp_path, monkeypatch, None) as (base_url, key):
            stream_one_call(base_url, key)
            time.sleep(1)
    finally:
        collector.shutdown()
    assert collector.received() == []
