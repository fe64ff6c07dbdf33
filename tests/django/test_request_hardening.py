"""Hostile input at the web door, without an engine (Django's test client, real Redis): what the
parser, the serializers, the body cap, /metrics and the 401s do with it (issue 15, findings 1, 2,
8, 9, 13). The live table over REST, SSE, websockets and batches is in
tests/django/inference/test_hostile_inputs.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import timedelta

import pytest
from asgiref.testing import ApplicationCommunicator
from django.test import override_settings
from django.utils import timezone

from tenants.models import ApiKey
from tenants.services import create_api_key, create_tenant, revoke_api_key
from tests.django.test_prompt_limits import forget_rate_limits
from tests.service.conftest import REPO_ROOT

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture
def key(db) -> str:
    tenant = create_tenant(name="hardening", requests_per_minute=10_000)
    forget_rate_limits(tenant.pk)
    return create_api_key(tenant=tenant)[1]


def post(client, key: str, path: str, body: bytes | dict):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client.post(path, data=content, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {key}")


def assert_openai_error(response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


RAW = [  # (id, path, raw JSON body, param the 400 names or None)
    ("nested 100k deep", CHAT, b'{"model": "m", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),
    ("nested 2000 deep in a message", CHAT,
     b'{"model": "m", "messages": [{"role": "user", "content": ' + b"[" * 2000 + b"]" * 2000 + b"}]}", None),
    ("lone surrogate in content", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "\\ud800"}]}', None),
    ("lone low surrogate in stop", CHAT, b'{"model": "m", "messages": [], "stop": ["a\\udc00"]}', None),
    ("lone surrogate in prompt", COMPLETIONS, b'{"model": "m", "prompt": "\\ud800x"}', None),
    ("top_k 2^64", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 18446744073709551616}',
     "top_k"),
    ("top_k 2^63", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 9223372036854775808}',
     "top_k"),
    ("seed 2^64", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 18446744073709551616}',
     "seed"),
    ("seed 2^63", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 9223372036854775808}',
     "seed"),
    ("stop_token_ids 2^64", CHAT,
     b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop_token_ids": [18446744073709551616]}',
     "stop_token_ids[0]"),
    ("prompt id 2^64", COMPLETIONS, b'{"model": "m", "prompt": [1, 18446744073709551616]}', "prompt"),
    ("prompt ids with a boolean", COMPLETIONS, b'{"model": "m", "prompt": [1, true]}', "prompt"),
    ("prompt id 2^31", COMPLETIONS, b'{"model": "m", "prompt": [[1], [2147483648]]}', "prompt"),
    ("prompt id 2^40 with echo", COMPLETIONS, b'{"model": "m", "prompt": [1, 1099511627776], "echo": true}', "prompt"),
    ("max_tokens 10^30", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": '
     + b"1" + b"0" * 30 + b"}", "max_tokens"),
    ("temperature 1e400", CHAT, b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 1e400}',
     None),
    ("five stop strings", CHAT, json.dumps({"model": "m", "messages": MSG, "stop": list("abcde")}).encode(), "stop"),
    ("a stop string of 1025 chars", CHAT, json.dumps({"model": "m", "messages": MSG, "stop": "x" * 1025}).encode(),
     "stop"),
    ("65 prompts", COMPLETIONS, json.dumps({"model": "m", "prompt": ["x"] * 65}).encode(), "prompt"),
    ("1025 messages", CHAT, json.dumps({"model": "m", "messages": MSG * 1025}).encode(), "messages"),
]


@pytest.mark.parametrize("name, path, body, param", RAW, ids=[c[0] for c in RAW])
def test_valid_json_that_used_to_break_the_error_path_is_a_400(client, key, name, path, body, param):
    assert_openai_error(post(client, key, path, body), 400, param)


def test_unknown_argument_names_are_quoted_short_and_encodable(client, key):
    body = b'{"model": "m", "messages": [], "' + b"\\ud800" * 10 + b"x" * 10_000 + b'": 1}'
    assert_openai_error(post(client, key, CHAT, body), 400)  # orjson refuses the surrogate key itself
    error = assert_openai_error(post(client, key, CHAT, {"model": "m", "messages": MSG, "k" * 10_000: 1}), 400)
    assert len(error["message"]) < 200 and len(error["param"]) == 64


def test_a_refused_call_counts_against_requests_per_minute(client, db):
    tenant = create_tenant(name="counted", requests_per_minute=3)
    forget_rate_limits(tenant.pk)
    raw = create_api_key(tenant=tenant)[1]
    for _ in range(3):  # refused by validation: each still counts
        assert_openai_error(post(client, raw, CHAT, {"model": "m", "messages": []}), 400)
    error = assert_openai_error(post(client, raw, CHAT, {"model": "m", "messages": MSG}), 429)
    assert error["code"] == "rate_limit_exceeded"


def asgi_post(path: str, chunks: list[bytes], content_length: int | None):
    """POST through the project's real ASGI application; returns (status, JSON body)."""
    from project.asgi import application

    headers = [(b"host", b"testserver"), (b"content-type", b"application/json")]
    if content_length is not None:
        headers.append((b"content-length", str(content_length).encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1234), "server": ("127.0.0.1", 80)}

    async def run():
        app = ApplicationCommunicator(application, scope)
        for index, chunk in enumerate(chunks):
            await app.send_input({"type": "http.request", "body": chunk, "more_body": index < len(chunks) - 1})
        start = await app.receive_output(10)
        body = await app.receive_output(10)
        await app.wait(10)
        return start["status"], json.loads(body["body"])

    from asgiref.sync import async_to_sync
    return async_to_sync(run)()


@override_settings(API_MAX_BODY_BYTES=10_000)
def test_a_body_over_the_cap_is_a_413_before_django_reads_it():
    status, body = asgi_post(CHAT, [b"x"], content_length=10_001)  # declared: refused before reading
    assert status == 413 and body["error"]["code"] == "request_too_large" and "10001 bytes" in body["error"]["message"]
    status, body = asgi_post(CHAT, [b"x" * 4000] * 3, content_length=None)  # chunked: cut off on arrival
    assert status == 413 and set(body["error"]) == {"message", "type", "param", "code"}
    status, body = asgi_post(CHAT, [b"{}"], content_length=2)  # under the cap: Django answers (no key: 401)
    assert status == 401


def test_metrics_wants_its_token_compared_in_constant_time(client):
    with override_settings(DEBUG=False, METRICS_TOKEN=""):
        assert_openai_error(client.get("/metrics"), 403)["code"] == "metrics_token_not_configured"
    with override_settings(DEBUG=False, METRICS_TOKEN="s3cret"):
        assert_openai_error(client.get("/metrics"), 401)
        assert_openai_error(client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cre"), 401)
        response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret")
        assert response.status_code == 200 and b"llm_api_requests_total" in response.content
    with override_settings(DEBUG=True, METRICS_TOKEN=""):
        assert client.get("/metrics").status_code == 200  # development


def test_every_unusable_key_gets_the_same_401(client, db, caplog):
    tenant = create_tenant(name="keys")
    live_key, revoked, expired, inactive = (create_api_key(tenant=tenant)[1] for _ in range(4))
    revoke_api_key(api_key=ApiKey.objects.get(prefix=revoked.split(".")[0]))
    ApiKey.objects.filter(prefix=expired.split(".")[0]).update(expires_at=timezone.now() - timedelta(seconds=1))
    other = create_tenant(name="inactive-tenant", is_active=False)
    inactive = create_api_key(tenant=other)[1]
    unknown = live_key.split(".")[0][:-2] + "zz." + live_key.split(".")[1]
    caplog.set_level("INFO", logger="tenants.selectors")
    errors = {}
    for name, raw in (("revoked", revoked), ("expired", expired), ("inactive", inactive), ("unknown", unknown)):
        error = assert_openai_error(post(client, raw, CHAT, {"model": "m", "messages": MSG}), 401)
        shown = f"{raw[:6]}...{raw[-4:]}"
        errors[name] = (error["message"].replace(shown, "<key>"), error["type"], error["code"], error["param"])
    assert len(set(errors.values())) == 1, errors
    assert errors["revoked"] == ("Incorrect API key provided: <key>.", "invalid_request_error", "invalid_api_key", None)
    logged = caplog.text
    assert f"API key {revoked.split('.')[0]} refused: revoked" in logged
    assert f"API key {expired.split('.')[0]} refused: expired" in logged
    assert f"API key {inactive.split('.')[0]} refused: tenant_inactive" in logged


@pytest.mark.parametrize("trust, expected", [("", "None"), ("1", "('HTTP_X_FORWARDED_PROTO', 'https')")])
def test_x_forwarded_proto_is_trusted_only_when_configured(trust, expected):
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "project.settings", "DJANGO_DEBUG": "1",
           "DJANGO_TRUST_X_FORWARDED_PROTO": trust}
    out = subprocess.run([sys.executable, "-c", "import django; django.setup(); from django.conf import settings; "
                          "print(settings.SECURE_PROXY_SSL_HEADER)"], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=60, check=True).stdout.strip()
    assert out == expected
