"""A web process pays at its start what its first calls would pay, and says in Redis when it is warm.

Why: a process's first /v1/completions call took 165 ms of CPU to reach the engine, against 7 ms
for the next (a local profile): importing the URLconf and the views, the engine client's Redis
connections and reader task, the key cache's Redis client, and above all each model's
PromptTokenizer (parsing the tokenizer JSON, compiling the chat template). A burst that lands on
cold processes pays all that on the event loops that should be admitting it; and behind a shared
socket a load balancer's /ready poll reaches one worker of N, so the others would stay cold.

`keep_warm()` runs for the life of the process, on its event loop (`start_when_serving`, from
project.asgi). It warms everything once, then every WARM_EVERY_S it warms each model that gained
a live replica since (an engine may load after the web tier starts), which also refreshes the
models' cached cards here rather than in a call, and reports in `{prefix}:web-warm:{client id}`
(JSON `{"pid": ..., "models": [...]}`, expiring after REPORT_TTL_S) the models it is warm for.
`engine.bench.stack` starts a run only once every web worker has reported its model.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys

from django.conf import settings
from django.urls import resolve

from engine.service.client import EngineClient
from inference.engine_client import get_engine_client, prompt_tokenizers
from tenants.key_cache import connect_key_cache
from tenants.usage_buffer import ensure_usage_flusher

logger = logging.getLogger(__name__)

WARM_EVERY_S = 2.0
REPORT_TTL_S = 10
_keep_warm_task: asyncio.Task | None = None  # a reference, so the task is not garbage-collected


WARM_CONNECTIONS = 64


def report_key(client: EngineClient) -> str:
    return f"{settings.ENGINE_KEY_PREFIX}:web-warm:{client.client_id}"


async def warm_up() -> None:
    """What any first call would pay, whatever it asks for."""
    resolve("/v1/completions")  # imports the URLconf: the views, serializers, the admin
    client = get_engine_client()
    await client.models()  # starts its reply reader, liveness key and replica list
    # Connections a burst's admissions use at once, opened now (each costs a few ms to open); the pool
    # grows past these on demand.
    warm = min(settings.WEB_ADMISSION_CONCURRENCY, WARM_CONNECTIONS)
    await asyncio.gather(*(client.redis.ping() for _ in range(warm)))
    await asyncio.to_thread(connect_key_cache)
    ensure_usage_flusher()


async def warm_models(client: EngineClient) -> list[str]:
    """Build (or refresh) the PromptTokenizer of every model with a live replica; returns those warm."""
    warm = []
    for model in sorted(await client.models()):
        if await prompt_tokenizers.get(client, model) is not None:
            warm.append(model)
    return warm


async def keep_warm() -> None:
    client, warmed_up = get_engine_client(), False
    while True:
        try:
            if not warmed_up:
                await warm_up()
                warmed_up = True
            report = json.dumps({"pid": os.getpid(), "models": await warm_models(client)})
            await client.redis.set(report_key(client), report, ex=REPORT_TTL_S)
        except Exception as error:  # Redis away for a moment, say: the next round tries again
            logger.warning("warming this web process failed (%s: %s); retrying in %.0f s", type(error).__name__,
                           error, WARM_EVERY_S)
        await asyncio.sleep(WARM_EVERY_S)


def start_when_serving() -> None:
    """Run keep_warm() on the server's event loop as soon as it runs. Daphne runs no ASGI lifespan
    events; its loop is Twisted's asyncio reactor, whose callLater runs on that loop. Elsewhere (a
    test process that imports the application) there is no reactor, or it never runs: nothing happens."""
    reactor = sys.modules.get("twisted.internet.reactor")
    if reactor is not None:
        reactor.callLater(0, _start_keep_warm)


def _start_keep_warm() -> None:
    global _keep_warm_task
    _keep_warm_task = asyncio.get_running_loop().create_task(keep_warm(), name="web-keep-warm")
