"""Refuses request bodies over a size cap with 413 in OpenAI's shape, before Django reads them.

Django's ASGI handler spools the whole body (to disk past 2.5 MB) before any view or middleware
runs, and DATA_UPLOAD_MAX_MEMORY_SIZE does not apply to the stream DRF parses. So the cap lives in
the outermost ASGI layer: a declared Content-Length over the cap is answered at once, and a body
that grows past it while arriving (chunked uploads) is cut off: Django sees a disconnect and stops
reading, and this layer answers 413.
"""
from __future__ import annotations

import orjson
from django.conf import settings

from inference.errors import OpenAIError

FILES_PATH = "/v1/files"
MULTIPART_SLACK = 1024 * 1024  # form boundaries and headers around an uploaded batch file


def body_limit_for(path: str) -> int:
    """Batch file uploads may be as large as BATCH_FILE_MAX_BYTES; every other body API_MAX_BODY_BYTES."""
    if path.rstrip("/") == FILES_PATH:
        return settings.BATCH_FILE_MAX_BYTES + MULTIPART_SLACK
    return settings.API_MAX_BODY_BYTES


def too_large(limit: int, size: int | None = None) -> OpenAIError:
    told = f"The request body is {size} bytes" if size is not None else "The request body is too large"
    return OpenAIError(f"{told}; at most {limit} bytes are allowed.", status=413, code="request_too_large")


class BodySizeLimit:
    """ASGI middleware for the HTTP app."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = body_limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            return await _answer(send, too_large(limit, declared))
        received, exceeded, started = 0, False, False

        async def limited_receive():
            nonlocal received, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    return {"type": "http.disconnect"}  # Django stops reading and answers nothing
            return message

        async def tracked_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        await self.app(scope, limited_receive, tracked_send)
        if exceeded and not started:
            await _answer(send, too_large(limit))


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _answer(send, error: OpenAIError) -> None:
    body = orjson.dumps(error.body())
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})
