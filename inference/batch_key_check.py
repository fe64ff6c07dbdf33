"""Whether a batch's API key may still start work: checked before every line, so revoking the key
or deactivating its tenant stops a running batch at once, as it stops interactive calls.

The key cache makes this one Redis GET (tenants.key_cache: any key or tenant change invalidates
every process's cache at once); the row comes back fresh after a change, so new limits apply too.
"""
from __future__ import annotations

import logging

from django.utils import timezone

from tenants.key_cache import api_key_cache
from tenants.models import ApiKey

logger = logging.getLogger(__name__)

KEY_REFUSED = {"code": "invalid_api_key", "message": "The batch's API key is no longer valid (revoked, expired or "
               "deleted, or its tenant was deactivated); the lines not yet run were not run.",
               "param": None, "line": None}


class KeyRefused(Exception):
    """The batch's key may no longer run lines."""


def live_batch_key(*, prefix: str | None) -> ApiKey:
    """The current row of the batch's key (tenant loaded), or KeyRefused saying why not (logged)."""
    api_key = None if prefix is None else api_key_cache.get(prefix=prefix, load=lambda: _load(prefix))
    reason = ("deleted" if api_key is None else "revoked" if api_key.revoked_at is not None
              else "expired" if api_key.expires_at is not None and api_key.expires_at <= timezone.now()
              else "tenant inactive" if not api_key.tenant.is_active else None)
    if reason is not None:
        logger.info("batch key %s refused: %s", prefix, reason)
        raise KeyRefused(reason)
    return api_key


def _load(prefix: str) -> ApiKey | None:
    return ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
