"""The status lines and error bodies a live daphne server sends, read off the socket: the reason
phrase of every status (Twisted's table lacked 429's: "429 Unknown Status"), and the API edges with
real CSRF middleware in front. No engine is needed: none of these calls reaches one."""
from __future__ import annotations

import json
import socket
import uuid
from urllib.parse import urlsplit

import pytest

from tenants.services import create_api_key, create_tenant
from tests.django.live_server import daphne_server

MAX_BODY = 4096


@pytest.fixture(scope="module")
def base_url(django_test_database, tmp_path_factory):
    log = tmp_path_factory.mktemp("status-lines") / "daphne.log"
    with daphne_server(log_path=log, ready_path="/health", env={"API_MAX_BODY_BYTES": str(MAX_BODY),
                                                               "ENGINE_KEY_PREFIX": f"test-{uuid.uuid4().hex}"}) as url:
        yield url


def raw_call(base_url: str, method: str, path: str, *, body: bytes = b"", headers: dict | None = None):
    """(status line, headers, body) of one HTTP/1.1 exchange, exactly as the server wrote them."""
    address = urlsplit(base_url)
    lines = [f"{method} {path} HTTP/1.1", f"Host: {address.hostname}", "Connection: close",
             f"Content-Length: {len(body)}", "Content-Type: application/json",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, payload = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    return status_line, dict(line.split(": ", 1) for line in header_lines), payload


def test_429_says_too_many_requests(base_url):
    _, key = create_api_key(tenant=create_tenant(name=f"t-{uuid.uuid4().hex[:10]}", requests_per_minute=1))
    auth = {"Authorization": f"Bearer {key}"}
    call = json.dumps({"model": "no-such-model", "messages": [{"role": "user", "content": "Hi"}]}).encode()
    first, _, _ = raw_call(base_url, "POST", "/v1/chat/completions", body=call, headers=auth)
    assert first != "HTTP/1.1 200 OK"  # no engine: refused, and a refused call counts against the minute's one
    status_line, headers, body = raw_call(base_url, "POST", "/v1/chat/completions", body=call, headers=auth)
    assert status_line == "HTTP/1.1 429 Too Many Requests"
    assert json.loads(body)["error"]["code"] == "rate_limit_exceeded" and "Retry-After" in headers


def test_413_says_its_phrase(base_url):
    status_line, _, body = raw_call(base_url, "POST", "/v1/chat/completions", body=b"x" * (MAX_BODY + 1))
    assert status_line == "HTTP/1.1 413 Request Entity Too Large"
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_post_to_an_unknown_api_path_is_a_json_404_not_csrf(base_url):
    status_line, headers, body = raw_call(base_url, "POST", "/v1/embeddings", body=b'{"input": "hi"}')
    assert status_line == "HTTP/1.1 404 Not Found"
    assert headers["Content-Type"] == "application/json"
    assert json.loads(body)["error"]["code"] == "unknown_url"


def test_wrong_method_is_a_405_with_allow(base_url):
    status_line, headers, body = raw_call(base_url, "GET", "/v1/completions")
    assert status_line == "HTTP/1.1 405 Method Not Allowed"
    assert headers["Allow"] == "POST, OPTIONS"
    assert json.loads(body)["error"]["code"] == "method_not_allowed"
