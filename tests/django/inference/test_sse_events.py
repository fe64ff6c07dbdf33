"""The SSE generator on its own: whatever happens mid-stream, the stream ends with an error event in
OpenAI's shape and `data: [DONE]`, never with a silent close (a cut stream)."""
from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from inference.apis import _sse
from inference.errors import OpenAIError


class ScriptedCall:
    """Stands in for services.Call: yields `chunks`, then raises `failure` (if any)."""

    def __init__(self, chunks, failure: Exception | None = None, close_failure: Exception | None = None) -> None:
        self.plan = SimpleNamespace(request_id="cmpl-test")
        self._chunks, self._failure, self._close_failure = chunks, failure, close_failure
        self.closed = False

    async def chunks(self):
        for chunk in self._chunks:
            yield chunk
        if self._failure is not None:
            raise self._failure

    async def close(self) -> None:
        self.closed = True
        if self._close_failure is not None:
            raise self._close_failure


def events(call) -> list:
    async def collect():
        return [event async for event in _sse(call)]

    raw = asyncio.run(collect())
    assert all(e.startswith(b"data: ") and e.endswith(b"\n\n") for e in raw)
    return [e[6:-2].decode() if e == b"data: [DONE]\n\n" else json.loads(e[6:-2]) for e in raw]


def test_a_finished_stream_ends_with_done():
    call = ScriptedCall([{"n": 1}, {"n": 2, "text": "é"}])
    assert events(call) == [{"n": 1}, {"n": 2, "text": "é"}, "[DONE]"]
    assert call.closed


@pytest.mark.parametrize("failure, code", [
    (OpenAIError("engine gone", status=503, type="server_error", code="replica_lost"), "replica_lost"),
    (KeyError("a bug"), "internal_error"),
])
def test_a_failure_mid_stream_is_an_error_event_then_done(failure, code):
    call = ScriptedCall([{"n": 1}], failure)
    first, error, done = events(call)
    assert first == {"n": 1} and done == "[DONE]"
    assert set(error["error"]) == {"message", "type", "param", "code"} and error["error"]["code"] == code
    assert call.closed


def test_a_failure_to_settle_does_not_cut_an_answered_stream():
    call = ScriptedCall([{"n": 1}], close_failure=RuntimeError("database is locked"))
    assert events(call) == [{"n": 1}, "[DONE]"]
