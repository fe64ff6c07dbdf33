"""Standard reason phrases for every status daphne may send.

Daphne writes the status line through Twisted, whose phrase table (`twisted.web.http.RESPONSES`)
stops at RFC 2616: a 429 went out as "429 Unknown Status" (also 422, 431, 451, ...), and ASGI has no
field for a phrase. Filling the table's gaps from Python's `http.HTTPStatus` fixes every status
line without replacing a phrase Twisted already has.
"""
from __future__ import annotations

from http import HTTPStatus


def complete_reason_phrases() -> None:
    """Add the phrases Twisted lacks (a no-op where Twisted is not installed: no daphne there)."""
    try:
        from twisted.web import http
    except ImportError:
        return
    for status in HTTPStatus:
        http.RESPONSES.setdefault(status.value, status.phrase.encode("ascii"))
