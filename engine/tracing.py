"""OpenTelemetry tracing across the web process and the engine replica, on only when
OTEL_EXPORTER_OTLP_ENDPOINT is set (spans go there over OTLP/HTTP; the SDK's other OTEL_* variables
apply). Off, nothing is imported or recorded.

One trace per API call: the web side's spans (Django's instrumentation) carry their context to the
engine in the engine request (W3C `traceparent`); the replica records, when a request finishes,
`llm.engine.request` with its `queue`, `prefill` and `decode` phases as children, timed by the
engine's own clock (RequestOutput.metrics), so the hot path costs nothing per token.
"""

from __future__ import annotations

import contextlib
import os
import time

ENDPOINT_VARIABLE = "OTEL_EXPORTER_OTLP_ENDPOINT"
_configured = False


def tracing_enabled() -> bool:
    return _configured


def configure(service_name: str) -> bool:
    """Install the SDK's tracer provider with an OTLP exporter if an endpoint is set; True if on."""
    global _configured
    if _configured or not os.environ.get(ENDPOINT_VARIABLE):
        return _configured
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({"service.name": os.environ.get("OTEL_SERVICE_NAME") or service_name})
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _configured = True
    return True


def current_context() -> dict:
    """The active span's context as W3C headers ({} when tracing is off or no span is active)."""
    if not _configured:
        return {}
    from opentelemetry import propagate

    carrier: dict = {}
    propagate.inject(carrier)
    return carrier


@contextlib.contextmanager
def span(name: str, **attributes):
    """A span around a block of the current process, child of the active one; nothing when off."""
    if not _configured:
        yield
        return
    from opentelemetry import trace

    with trace.get_tracer("llm-serve").start_as_current_span(name, attributes=attributes):
        yield


def record_engine_request(trace_context: dict, request_id: str, metrics: dict, attributes: dict) -> None:
    """The finished request's engine spans, children of the web span in `trace_context`."""
    if not _configured or not trace_context or metrics.get("finished_time") is None:
        return
    from opentelemetry import propagate, trace

    tracer = trace.get_tracer("llm-serve.engine")
    now_ns, now = time.time_ns(), time.monotonic()

    def wall_ns(monotonic: float) -> int:
        return now_ns - int((now - monotonic) * 1e9)

    arrival, scheduled = metrics.get("arrival_time"), metrics.get("scheduled_time")
    first, finished = metrics.get("first_token_time"), metrics["finished_time"]
    span = tracer.start_span("llm.engine.request", context=propagate.extract(trace_context),
                             start_time=wall_ns(arrival if arrival is not None else finished),
                             attributes={"llm.request_id": request_id, **attributes})
    parent = trace.set_span_in_context(span)
    for name, start, end in (("queue", arrival, scheduled), ("prefill", scheduled, first), ("decode", first, finished)):
        if start is not None and end is not None:
            tracer.start_span(f"llm.engine.{name}", context=parent, start_time=wall_ns(start)).end(wall_ns(end))
    span.end(wall_ns(finished))
