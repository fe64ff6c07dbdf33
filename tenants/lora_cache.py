"""Who owns which LoRA adapter, as the serving path reads it: cached in the process, so a call needs no query.

The whole table of active adapters is one entry (adapters are few: one or some per tenant), reloaded
when it is API_KEY_CACHE_S old or when any LoRAAdapter is saved or deleted anywhere: tenants.signals
then sets a Redis "generation" to a fresh random value, which every lookup compares (one Redis GET),
as the API key cache does (tenants.key_cache). Lookups run on the event loop with its async Redis
client; only a reload touches the database, in a thread.
"""
from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import redis
from asgiref.sync import sync_to_async
from django.conf import settings

from tenants.db_connection import release_connection_after
from tenants.models import LoRAAdapter


@dataclass(frozen=True)
class OwnedAdapter:
    """An active adapter as calls see it: callable by its owner's keys as `model=name`."""

    name: str
    tenant_id: int
    base_model: str
    path: str
    created: int  # unix seconds, for /v1/models


class LoRAAdapterCache:
    def __init__(self) -> None:
        self._adapters: dict[str, OwnedAdapter] = {}
        self._generation: bytes | None = None
        self._loaded_at = float("-inf")
        self._reloading = threading.Lock()  # one reload at a time, whichever event loop or thread asks

    async def adapters(self, *, redis_client) -> dict[str, OwnedAdapter]:
        """Every active adapter by name, fresh as of this call's generation."""
        generation = await redis_client.get(_generation_key())
        if not self._fresh(generation):
            await sync_to_async(self._reload)(generation)
        return self._adapters

    def _fresh(self, generation: bytes | None) -> bool:
        return generation == self._generation and time.monotonic() - self._loaded_at < settings.API_KEY_CACHE_S

    def _reload(self, generation: bytes | None) -> None:
        with self._reloading:
            if self._fresh(generation):  # reloaded by the call this one waited for
                return
            # Read after the generation: a change in between makes this table stale at the next call.
            self._adapters = _active_adapters()
            self._generation, self._loaded_at = generation, time.monotonic()


@release_connection_after
def _active_adapters() -> dict[str, OwnedAdapter]:
    rows = LoRAAdapter.objects.filter(disabled_at__isnull=True).values_list(
        "name", "tenant_id", "base_model", "path", "created_at")
    return {name: OwnedAdapter(name, tenant_id, base_model, path, int(created_at.timestamp()))
            for name, tenant_id, base_model, path, created_at in rows}


lora_adapter_cache = LoRAAdapterCache()


def invalidate_lora_adapters() -> None:
    """Make every process reload its adapter table at its next lookup (a short-lived sync client:
    this runs where adapters change, in admin, dashboard and command processes)."""
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.set(_generation_key(), uuid.uuid4().hex)
    finally:
        client.close()


def _generation_key() -> str:
    return f"{settings.ENGINE_KEY_PREFIX}:lora-adapters:generation"
