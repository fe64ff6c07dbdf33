"""/health, /ready, /metrics and the OpenAPI schema of the live server."""
from __future__ import annotations

from .conftest import METRICS_TOKEN, MODEL


def test_ready_names_the_engine_and_health_is_liveness(live):
    with live.http() as http:
        assert http.get("/ready").json() == {"status": "ok", "redis": True, "engines": {MODEL: 1}}
        assert http.get("/health").json() == {"status": "ok"}


def test_metrics_count_calls_tokens_and_engine_state(live):
    key = live.new_key()
    reply = live.openai(key).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                     max_tokens=4, temperature=0)
    tenant = live.tenant_of(key).name
    with live.http() as http:
        assert http.get("/metrics").status_code == 401  # it names tenants: never open in production
        text = http.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert float(lines[f'llm_tenant_tokens_total{{direction="in",tenant="{tenant}"}}']) == reply.usage.prompt_tokens
    assert float(lines[f'llm_tenant_tokens_total{{direction="out",tenant="{tenant}"}}']) == \
        reply.usage.completion_tokens
    assert float(lines['llm_api_requests_total{endpoint="chat.completions",status="ok"}']) >= 1
    assert float(lines['llm_time_to_first_token_seconds_count{endpoint="chat.completions"}']) >= 1
    replica = f'model="{MODEL}",replica="{live.replica.replica_id}"'
    assert f"llm_engine_queue_depth{{{replica}}}" in lines and f"llm_engine_kv_cache_usage_ratio{{{replica}}}" in lines


def test_openapi_schema_documents_the_api(live):
    with live.http() as http:
        schema = http.get("/v1/openapi.json", headers={"Accept": "application/json"}).json()
    assert {"/v1/models", "/v1/completions", "/v1/chat/completions"} <= set(schema["paths"])
    chat = schema["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert {"messages", "stream_options", "top_logprobs", "max_completion_tokens", "min_p"} <= set(chat)
    assert schema["components"]["securitySchemes"]["ApiKey"]["scheme"] == "bearer"
