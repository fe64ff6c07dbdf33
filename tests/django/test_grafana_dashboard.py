"""deploy/grafana/llm-serve.json queries only series that /metrics exposes (a renamed metric would
leave a panel silently empty)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from engine.service.protocol import Heartbeat, Usage
from inference import metrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "llm-serve.json"


def exposed_series() -> set[str]:
    """Every series name in an exposition where each metric has been observed once."""
    metrics.observe_call(endpoint="grafana-check", tenant="grafana-check", status="ok", usage=Usage(3, 5, 0),
                         ttft_s=0.1, duration_s=0.5,
                         engine_timings=[{"queue_s": 0.01, "prefill_s": 0.05, "decode_s": 0.3}])
    metrics.observe_refusal(endpoint="grafana-check", tenant="grafana-check", code="rate_limit_exceeded")
    metrics.observe_error(status=499)
    text = metrics.exposition({"m": [Heartbeat("r1", "m", device_memory_bytes=1, step_seconds=0.01)]}).decode()
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and not line.startswith("#")}


def test_every_panel_queries_series_that_exist():
    dashboard = json.loads(DASHBOARD.read_text())
    exposed = exposed_series()
    queried = set()
    for panel in dashboard["panels"]:
        assert panel["targets"] and panel["datasource"]["type"] == "prometheus", panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\bllm_[a-z0-9_]+\b", target["expr"]))
    assert queried and queried <= exposed, sorted(queried - exposed)
    families = {re.sub(r"_(bucket|sum|count|total|created)$", "", name) for name in exposed if name.startswith("llm_")}
    unused = {name for name in families if not any(q.startswith(name) for q in queried)}
    assert not unused, f"metrics no panel shows: {sorted(unused)}"
