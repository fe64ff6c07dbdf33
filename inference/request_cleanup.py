"""Closes the calls a request left open when its client went away before the response began.

A streamed call is closed by its SSE generator's `finally`. But when the client disconnects before
that generator has started (while the view is still running, or while the response headers are
being sent), Django cancels the request's task and the generator never runs, so nothing would
settle the call's quota hold or free its concurrency slot until their leases expired. Calls
therefore also register their `close` here, and the outermost ASGI layer runs whatever is still
registered once Django is done with the request (`Call.close` runs once, so this is harmless when
the generator did close it).
"""

from __future__ import annotations

import asyncio
import logging
from contextvars import ContextVar

from asgiref.sync import sync_to_async
from django.db import close_old_connections

logger = logging.getLogger(__name__)

_closers: ContextVar[list | None] = ContextVar("inference_request_closers", default=None)


def close_when_request_ends(close) -> None:
    """Have the coroutine function `close` awaited when the HTTP request ends (no-op outside one:
    Celery batch lines and websocket calls close their own)."""
    closers = _closers.get()
    if closers is not None:
        closers.append(close)


class CloseWhenRequestEnds:
    """ASGI middleware for the HTTP app: gives each request a list of closers, runs them at its end."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        closers: list = []
        token = _closers.set(closers)  # Django's request task copies this context, list and all
        try:
            return await self.app(scope, receive, send)
        finally:
            _closers.reset(token)
            for close in closers:
                try:
                    await asyncio.shield(close())
                except Exception:  # one failed close must not keep the others from running
                    logger.exception("closing a call left open by an ended request failed")
            if closers:  # what they wrote ran outside Django's request: give its connection back
                await sync_to_async(close_old_connections)()
