"""Which calls each process has admitted, so the holds of a killed process are given back.

An admitted call holds a concurrency slot and a quota reservation in Redis until `settle()`. A
process killed mid-call (SIGKILL, out of memory) never settles, and its calls would keep the
tenant's slots and tokens until their leases expire. So every process records its calls in a
Redis hash named after its engine client, `{prefix}:calls:{client_id}` (request id -> API key id),
before admitting them; the set `{prefix}:calls` lists the clients that have such a hash. A
janitor in every process looks every SWEEP_EVERY_S for clients whose liveness key
(`client.keys.client(client_id)`, which the engines also watch to abort a dead client's requests)
is gone, and releases their calls; HDEL claims each call, so of several janitors exactly one
releases it. A call recorded but never admitted (refused, or killed first) releases nothing.
"""
from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Awaitable, Callable

from asgiref.sync import sync_to_async
from django.conf import settings

from engine.service.client import EngineClient
from tenants.admission import release_abandoned
from tenants.db_connection import release_connection_after
from tenants.models import ApiKey

logger = logging.getLogger(__name__)

SWEEP_EVERY_S = 2.0
_janitors: weakref.WeakKeyDictionary[EngineClient, asyncio.Task] = weakref.WeakKeyDictionary()


def _owners_key() -> str:
    return f"{settings.ENGINE_KEY_PREFIX}:calls"


def _registry_key(client_id: str) -> str:
    return f"{settings.ENGINE_KEY_PREFIX}:calls:{client_id}"


async def register_call(client: EngineClient, *, request_id: str, api_key_id: int) -> Callable[[], Awaitable]:
    """Record a call about to be admitted as this process's; returns the coroutine function that
    forgets it (once it is settled, or refused). Starts this process's janitor on first use."""
    if client not in _janitors:
        _janitors[client] = asyncio.create_task(_sweep_forever(client), name="call-registry-janitor")
    key = _registry_key(client.client_id)
    async with client.redis.pipeline(transaction=False) as pipe:
        await pipe.sadd(_owners_key(), client.client_id).hset(key, request_id, api_key_id).execute()

    async def forget() -> None:
        await client.redis.hdel(key, request_id)

    return forget


async def _sweep_forever(client: EngineClient) -> None:
    suspects: set[str] = set()  # clients without a liveness key at the last sweep
    while True:
        await asyncio.sleep(SWEEP_EVERY_S)
        try:
            suspects = await _sweep(client, suspects)
        except Exception:  # Redis or the database away for a moment: the next sweep retries
            logger.warning("call registry: sweep failed", exc_info=True)


async def _sweep(client: EngineClient, suspects: set[str]) -> set[str]:
    """Release the calls of clients found dead twice in a row (a process may record its first
    call a moment before its client first writes its liveness key); returns those found dead now."""
    dead = set()
    for owner in {member.decode() for member in await client.redis.smembers(_owners_key())}:
        if owner == client.client_id or await client.redis.exists(client.keys.client(owner)):
            continue
        if owner in suspects:
            await _release_calls(client, owner)
            await client.redis.srem(_owners_key(), owner)  # a dead client records nothing more
        else:
            dead.add(owner)
    return dead


async def _release_calls(client: EngineClient, owner: str) -> None:
    key = _registry_key(owner)
    calls = {request_id.decode(): int(api_key_id) for request_id, api_key_id in
             (await client.redis.hgetall(key)).items()}
    api_keys = await sync_to_async(_api_keys)(set(calls.values())) if calls else {}
    for request_id, api_key_id in calls.items():
        if not await client.redis.hdel(key, request_id):
            continue  # another janitor claimed it
        if api_key_id in api_keys:  # a deleted key's holds lapse with their leases
            await release_abandoned(redis=client.redis, api_key=api_keys[api_key_id], request_id=request_id,
                                    key_prefix=settings.ENGINE_KEY_PREFIX)
    if calls:
        logger.warning("call registry: %s died with %d calls recorded; their holds are given back", owner,
                       len(calls))


@release_connection_after
def _api_keys(ids: set[int]) -> dict[int, ApiKey]:
    return ApiKey.objects.select_related("tenant").in_bulk(ids)
