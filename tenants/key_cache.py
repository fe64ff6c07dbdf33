"""API keys as the serving path reads them, cached in the process so that a call needs no database query.

An entry (the ApiKey row with its tenant, found by the key's public prefix) lives API_KEY_CACHE_S at
most, and dies at once when any ApiKey or Tenant is saved or deleted anywhere: tenants.signals then
sets a Redis "generation" to a fresh random value, and every lookup compares it (one Redis GET). A
random value rather than a counter, so that a Redis that lost the key and counted again can never
bring an old generation back. Changes made with QuerySet.update() send no signal; no service makes one.

An entry holds the row, whose key is only a hash: callers still compare that hash, and check
revocation, expiry and the tenant against the clock, on every call. Treat cached rows as read-only.
"""
from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache

import redis
from django.conf import settings

from tenants.models import ApiKey


@dataclass(frozen=True)
class _Entry:
    api_key: ApiKey | None  # None: no such key
    generation: bytes | None
    loaded_at: float


class ApiKeyCache:
    def __init__(self) -> None:
        self._entries: dict[str, _Entry] = {}
        self._generation: bytes | None = None
        # One load per prefix at a time: a burst of calls with a new key (200 at once) makes one
        # query, and the others wait for its row, instead of 200 queries draining the pool.
        self._loading: dict[str, threading.Lock] = {}
        self._loading_guard = threading.Lock()

    def get(self, *, prefix: str, load: Callable[[], ApiKey | None]) -> ApiKey | None:
        """The cached row of `prefix` while fresh, else `load()`'s (a row found is cached)."""
        generation = _redis().get(_generation_key())
        if (entry := self._fresh(prefix, generation)) is not None:
            return entry.api_key
        with self._loading_guard:
            lock = self._loading.setdefault(prefix, threading.Lock())
        with lock:
            if (entry := self._fresh(prefix, generation)) is not None:
                return entry.api_key  # loaded by the call this one waited for
            if generation != self._generation:  # every entry is stale now: let them go
                self._entries, self._generation = {}, generation
            # Read after the generation: a change in between makes this entry stale at the next call.
            api_key = load()
            # An unknown prefix is cached too (a flood of made-up keys makes no queries); a key
            # created later changes the generation, so it is found at once.
            self._entries[prefix] = _Entry(api_key, generation, time.monotonic())
        with self._loading_guard:
            self._loading.pop(prefix, None)
        return api_key

    def _fresh(self, prefix: str, generation: bytes | None) -> _Entry | None:
        entry = self._entries.get(prefix)
        if (entry is not None and entry.generation == generation
                and time.monotonic() - entry.loaded_at < settings.API_KEY_CACHE_S):
            return entry
        return None


def invalidate_api_keys() -> None:
    """Make every process drop its cached keys at its next lookup."""
    _redis().set(_generation_key(), uuid.uuid4().hex)


api_key_cache = ApiKeyCache()


def connect_key_cache() -> None:
    """Open the cache's Redis connection now (a web process warming up) rather than in a first call."""
    _redis().ping()


def _generation_key() -> str:
    return f"{settings.ENGINE_KEY_PREFIX}:apikeys:generation"


@cache
def _redis() -> redis.Redis:
    """One client per process, shared by the threads that authenticate calls. A burst of calls
    waits for one of its connections (a GET is quick) rather than opening one per thread."""
    return redis.Redis(connection_pool=redis.BlockingConnectionPool.from_url(
        settings.REDIS_URL, max_connections=32, timeout=30))
