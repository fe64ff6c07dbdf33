"""Websockets cannot hurt other tenants: a socket must authenticate within WS_AUTH_TIMEOUT_S, a
tenant and a process hold a bounded number of them, and a revoked key or a deactivated tenant
stops an open socket at its next request. Live daphne and engine; the process cap in-process."""
from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
from channels.testing import WebsocketCommunicator
from django.test import override_settings
from websockets.exceptions import ConnectionClosed

from tenants.models import ApiKey
from tenants.services import revoke_api_key, update_tenant

from .conftest import MODEL
from .test_streaming_transports import frames_until, ws_connect

pytestmark = pytest.mark.timeout(300)
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 4, "temperature": 0}


def closing(socket, timeout: float = 30) -> tuple[list[dict], int]:
    """Frames until the server closes the socket, and its close code."""
    frames = []
    try:
        while True:
            frames.append(json.loads(socket.recv(timeout=timeout)))
    except ConnectionClosed as closed:
        return frames, closed.rcvd.code


def test_a_socket_that_does_not_authenticate_is_closed(live):
    with ws_connect(live, None) as socket:
        opened = time.monotonic()
        frames, code = closing(socket)
    assert code == 4408 and 4 <= time.monotonic() - opened < 15
    assert frames[-1]["type"] == "error" and frames[-1]["error"]["code"] == "auth_timeout"


def test_a_tenant_has_at_most_16_sockets(live):
    key, other = live.new_key(), live.new_key()
    with contextlib.ExitStack() as open_sockets:
        sockets = [open_sockets.enter_context(ws_connect(live, key)) for _ in range(16)]
        for socket in sockets:
            assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        with ws_connect(live, key) as refused:
            frames, code = closing(refused)
        assert code == 4429 and frames[-1]["error"]["code"] == "too_many_connections"
        with ws_connect(live, other) as socket:  # another tenant is not affected
            assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        sockets.pop().close()
        time.sleep(0.5)
        with ws_connect(live, key) as socket:  # a closed socket gives its place back
            assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}


@pytest.mark.parametrize("how", ["revoke the key", "deactivate the tenant"])
def test_an_open_socket_stops_serving_once_its_key_is_refused(live, how):
    key = live.new_key()
    with ws_connect(live, key) as socket:
        assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        socket.send(json.dumps({"type": "request", "id": "before", "endpoint": "chat.completions", "body": CHAT}))
        assert {"type": "done", "id": "before"} in frames_until(socket, {"before"})
        api_key = ApiKey.objects.select_related("tenant").get(prefix=key.split(".")[0])
        with override_settings(ENGINE_KEY_PREFIX=live.prefix):  # the server's key cache sees the change
            if how == "revoke the key":
                revoke_api_key(api_key=api_key)
            else:
                update_tenant(tenant=api_key.tenant, is_active=False)
        socket.send(json.dumps({"type": "request", "id": "after", "endpoint": "chat.completions", "body": CHAT}))
        frames, code = closing(socket)
    assert code == 4401 and not [f for f in frames if f["type"] == "chunk"]
    assert frames[-1]["type"] == "error" and frames[-1]["id"] == "after"
    assert frames[-1]["error"]["code"] == "invalid_api_key"


def test_a_process_has_at_most_ws_max_per_process_sockets():
    from project.asgi import application

    async def scenario():
        held = [WebsocketCommunicator(application, "/v1/ws") for _ in range(2)]
        for communicator in held:
            assert (await communicator.connect())[0]
        refused = WebsocketCommunicator(application, "/v1/ws")
        assert (await refused.connect())[0]
        frame = await refused.receive_json_from(timeout=5)
        closed = await refused.receive_output(timeout=5)
        await held[0].disconnect()
        again = WebsocketCommunicator(application, "/v1/ws")
        assert (await again.connect())[0]
        await asyncio.sleep(0.2)
        still_open = await again.receive_nothing(timeout=0.5)
        for communicator in (*held[1:], again):
            await communicator.disconnect()
        return frame, closed, still_open

    with override_settings(WS_MAX_PER_PROCESS=2, WS_AUTH_TIMEOUT_S=30):
        frame, closed, still_open = asyncio.run(scenario())
    assert frame["error"]["code"] == "too_many_connections" and frame["error"]["type"] == "server_error"
    assert closed == {"type": "websocket.close", "code": 1013} and still_open


def test_refused_frames_count_against_requests_per_minute(live):
    """A frame refused by validation is a request, as over REST: 3 bad frames use up a limit of 3."""
    key = live.new_key(requests_per_minute=3)
    with ws_connect(live, key) as socket:
        assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        for i, (endpoint, body) in enumerate([("nope", CHAT), ("chat.completions", []),
                                              ("chat.completions", {**CHAT, "max_tokens": "four"})]):
            socket.send(json.dumps({"type": "request", "id": f"bad{i}", "endpoint": endpoint, "body": body}))
            [frame] = frames_until(socket, {f"bad{i}"})
            assert frame["type"] == "error" and frame["error"]["type"] == "invalid_request_error"
        socket.send(json.dumps({"type": "request", "id": "good", "endpoint": "chat.completions", "body": CHAT}))
        [frame] = frames_until(socket, {"good"})
    assert frame["type"] == "error" and frame["error"]["code"] == "rate_limit_exceeded", frame
