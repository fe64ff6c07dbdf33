"""SSE disconnects abort the engine request; websockets multiplex and cancel calls by id."""
from __future__ import annotations

import asyncio
import json
import time

import pytest
from django.test import override_settings
from websockets.sync.client import connect

from tenants.models import UsageEvent
from tests.service.conftest import wait_until

from .conftest import MODEL, asgi_completion

pytestmark = pytest.mark.timeout(300)
LONG = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 2000, "ignore_eos": True}


def test_sse_disconnect_aborts_the_engine_request(live):
    key = live.new_key()
    with live.http() as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "stream": True},
                         headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            events = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                if len(events) == 3:
                    break  # leaving the block closes the connection mid-stream
    assert all(e["object"] == "text_completion" for e in events)
    tenant = live.tenant_of(key)
    event = wait_until(lambda: UsageEvent.objects.filter(tenant=tenant).first(), 30, "the usage event")
    assert event.status == "cancelled" and 3 <= event.completion_tokens < 2000
    since = time.time()  # a heartbeat from before could show the request not yet admitted
    wait_until(lambda: (beat := live.replica.heartbeat()) and beat.sent_at > since and beat.num_running == 0, 30,
               "the engine to drop the aborted request")


def test_a_client_gone_during_prefill_is_billed_the_prompt_tokens_computed(live):
    """The client leaves before any token reaches it; the engine computed the prompt (the server notices
    the close when it next writes, at the first token): that work is billed, not 0."""
    key = live.new_key()
    prompt = list(range(1000, 7000))  # 6,000 token ids: seconds of prefill chunks on the CPU engine
    with live.http() as http:
        with http.stream("POST", "/v1/completions", json={**LONG, "prompt": prompt, "max_tokens": 16, "stream": True},
                         headers={"Authorization": f"Bearer {key}"}) as response:
            assert response.status_code == 200
            # leaving now, before any token, closes the connection while the prompt is being computed
    tenant = live.tenant_of(key)
    event = wait_until(lambda: UsageEvent.objects.filter(tenant=tenant).first(), 30, "the usage event")
    assert event.status == "cancelled" and event.completion_tokens < 16, (event.status, event.completion_tokens)
    assert 0 < event.prompt_tokens <= len(prompt)
    since = time.time()  # a heartbeat from before could show the request not yet admitted
    wait_until(lambda: (beat := live.replica.heartbeat()) and beat.sent_at > since and beat.num_running == 0, 30,
               "the engine to drop the aborted request")


def test_a_client_gone_before_the_stream_starts_frees_its_holds(live):
    """The client disconnects while the response headers are being sent, so Django cancels the
    request before the SSE generator has started and its `finally` never runs: the request's
    closers must settle the call, writing its usage event and freeing its concurrency slot at once
    rather than when the lease expires. Driven through the project's real ASGI application, with a
    client whose socket never takes the headers."""
    key = live.new_key(max_concurrent_requests=1)

    async def headers_never_taken():
        await asyncio.Event().wait()  # the client is gone: these headers are never taken

    with override_settings(ENGINE_KEY_PREFIX=live.prefix):
        status, _ = asyncio.run(asgi_completion(key, {**LONG, "max_tokens": 16, "stream": True},
                                                on_start=headers_never_taken, gone_at_start=True))
    assert status == 200
    tenant = live.tenant_of(key)
    event = wait_until(lambda: UsageEvent.objects.filter(tenant=tenant).first(), 30, "the usage event")
    assert event.status == "cancelled" and event.completion_tokens == 0
    # The one request this tenant may run at a time is admitted now, not in 15 minutes.
    completion = live.openai(key).completions.create(model=MODEL, prompt="Hi", max_tokens=2)
    assert completion.usage.completion_tokens == 2


def ws_connect(live, key: str | None):
    url = live.base_url.replace("http://", "ws://") + "/v1/ws"
    headers = {"Authorization": f"Bearer {key}"} if key else None
    return connect(url, additional_headers=headers, open_timeout=30)


def frames_until(socket, done: set[str], timeout: float = 120) -> list[dict]:
    """Frames until every id in `done` has ended (done, cancelled or error)."""
    frames, open_ids = [], set(done)
    while open_ids:
        frame = json.loads(socket.recv(timeout=timeout))
        frames.append(frame)
        if frame["type"] in ("done", "cancelled", "error"):
            open_ids.discard(frame["id"])
    return frames


def test_websocket_multiplexes_and_cancels(live):
    key = live.new_key()
    with ws_connect(live, key) as socket:
        assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        socket.send(json.dumps({"type": "request", "id": "long", "endpoint": "completions", "body": LONG}))
        socket.send(json.dumps({"type": "request", "id": "chat", "endpoint": "chat.completions", "body": {
            "model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8, "temperature": 0}}))
        frames = frames_until(socket, {"chat"})
        socket.send(json.dumps({"type": "cancel", "id": "long"}))
        frames += frames_until(socket, {"long"})
    chat = [f["data"] for f in frames if f["id"] == "chat" and f["type"] == "chunk"]
    assert chat[0]["object"] == "chat.completion.chunk" and chat[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chat)
    assert {"type": "done", "id": "chat"} in frames and {"type": "cancelled", "id": "long"} in frames
    long_chunks = [f for f in frames if f["id"] == "long" and f["type"] == "chunk"]
    assert long_chunks and len(long_chunks) < 2000
    tenant = live.tenant_of(key)
    wait_until(lambda: UsageEvent.objects.filter(tenant=tenant).count() == 2, 30, "both usage events")
    assert sorted(UsageEvent.objects.filter(tenant=tenant).values_list("status", flat=True)) == ["cancelled", "ok"]


def test_websocket_auth_by_first_message_and_errors_as_frames(live):
    key = live.new_key()
    with ws_connect(live, None) as socket:
        socket.send(json.dumps({"type": "request", "id": "a", "endpoint": "completions", "body": {}}))
        assert json.loads(socket.recv(timeout=30))["error"]["code"] == "missing_api_key"
        socket.send(json.dumps({"type": "auth", "api_key": key}))
        assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        socket.send(json.dumps({"type": "request", "id": "b", "endpoint": "completions",
                                "body": {"model": MODEL, "prompt": "Hi", "temperature": 7}}))
        error = json.loads(socket.recv(timeout=30))
        assert error["type"] == "error" and error["id"] == "b" and error["error"]["param"] == "temperature"
        socket.send("not json")
        assert json.loads(socket.recv(timeout=30))["type"] == "error"


def test_websocket_wrong_key_is_refused(live):
    with ws_connect(live, "sk-nope.nothing") as socket:
        frame = json.loads(socket.recv(timeout=30))
        assert frame["type"] == "error" and frame["error"]["code"] == "invalid_api_key"
