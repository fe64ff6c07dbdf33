"""Who may read /metrics: its series name every tenant and its token volumes.

With METRICS_TOKEN set, only `Authorization: Bearer <token>` (compared in constant time, so the
response time says nothing about how much of a guess was right). Without one, only a DEBUG
process serves it: a production deployment that forgot the token gets 403, not an open door.
"""
from __future__ import annotations

import hmac

from django.conf import settings

from inference.errors import OpenAIError


def check_metrics_access(authorization: str) -> None:
    token = settings.METRICS_TOKEN
    if not token:
        if settings.DEBUG:
            return
        raise OpenAIError("/metrics is disabled: set METRICS_TOKEN to serve it.", status=403,
                          code="metrics_token_not_configured")
    if not hmac.compare_digest(authorization.encode(), f"Bearer {token}".encode()):
        raise OpenAIError("A valid metrics token is required.", status=401, code="invalid_metrics_token")
