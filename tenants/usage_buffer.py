"""Usage events on their way to the database: API calls append them to a Redis stream, and a
background flusher in each process that appends writes them in batches.

Why: an INSERT per call took a pooled database connection per call, and a burst of calls drained
the pool. A call now makes one Redis write, which it makes anyway for its quota. The stream, not
the process, holds what is not written yet, so a killed worker loses nothing: any process's
flusher writes it. An event leaves the stream only once written, and writing one twice is
harmless (request_id is unique), so flushers never need to agree on who writes what; a short
lease only keeps them from doing the same work at once. What is still buffered is not in the
database yet, a lag of about USAGE_FLUSH_MS (see tenants.quota on what that means for quotas).
"""
from __future__ import annotations

import atexit
import logging
import threading
import time

import redis
from django.conf import settings
from django.core import serializers
from django.db import connection
from redis.asyncio import Redis as AsyncRedis

from tenants.models import UsageEvent
from tenants.services import record_usage_events

logger = logging.getLogger(__name__)

FLUSH_BATCH = 500  # events per INSERT

_flusher_lock = threading.Lock()
_flushers: dict[tuple[str, str], threading.Thread] = {}  # (Redis URL, key prefix) -> its flusher


def usage_stream(*, key_prefix: str) -> str:
    return f"{key_prefix}:usage"


async def buffer_usage(*, redis: AsyncRedis, key_prefix: str, event: UsageEvent) -> None:
    """Append an unsaved event (tenants.services.usage_event) to the stream."""
    await redis.xadd(usage_stream(key_prefix=key_prefix), {"event": serializers.serialize("json", [event])})


def flush_usage(*, redis: redis.Redis, key_prefix: str) -> int:
    """Write every buffered event to the database; returns how many were written. `redis` must
    not decode responses. Fields an older release wrote and this one lacks are ignored."""
    stream, written = usage_stream(key_prefix=key_prefix), 0
    while entries := redis.xrange(stream, count=FLUSH_BATCH):
        events = [found.object for _, fields in entries
                  for found in serializers.deserialize("json", fields[b"event"], ignorenonexistent=True)]
        record_usage_events(events=events)
        redis.xdel(stream, *(entry_id for entry_id, _ in entries))
        written += len(entries)
        if len(entries) < FLUSH_BATCH:
            break
    return written


def ensure_usage_flusher() -> None:
    """Start this process's flusher of settings.ENGINE_KEY_PREFIX's stream unless it runs (one per
    Redis and prefix, since a process may buffer to several; a forked child starts its own); what is
    left when the process exits is flushed then."""
    where = (settings.REDIS_URL, settings.ENGINE_KEY_PREFIX)
    flusher = _flushers.get(where)
    if flusher is not None and flusher.is_alive():
        return
    with _flusher_lock:
        flusher = _flushers.get(where)
        if flusher is not None and flusher.is_alive():
            return
        client, key_prefix = redis.Redis.from_url(where[0]), where[1]
        if flusher is None:
            atexit.register(_flush_quietly, client, key_prefix, take_lease=False)
        _flushers[where] = threading.Thread(target=_flush_forever, args=(client, key_prefix), name="usage-flusher",
                                            daemon=True)
        _flushers[where].start()


def _flush_forever(client: redis.Redis, key_prefix: str) -> None:
    while True:
        time.sleep(settings.USAGE_FLUSH_MS / 1000)
        _flush_quietly(client, key_prefix, take_lease=True)


def _flush_quietly(client: redis.Redis, key_prefix: str, *, take_lease: bool) -> None:
    """Flush (unless `take_lease` and another process holds the lease: it flushes), then give the
    connection back to the pool; a failure leaves the events buffered for the next flush."""
    lease_ms = settings.USAGE_FLUSH_MS
    try:
        if not take_lease or client.set(f"{key_prefix}:usage:flush-lease", "1", nx=True, px=lease_ms):
            flush_usage(redis=client, key_prefix=key_prefix)
    except Exception:
        logger.exception("writing buffered usage events failed; they stay buffered for the next flush")
    finally:
        connection.close()
