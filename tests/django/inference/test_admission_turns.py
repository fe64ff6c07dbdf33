"""A web process under a burst: calls are admitted in turns (inference.admission_gate), the process
is warm before its first call (inference.warmup), and a stream's [DONE] goes out before the call is
settled. Driven through the project's real ASGI application (in this process, so the gate's own
counters can be read) against the live stack's Redis and engine replica."""
from __future__ import annotations

import asyncio
import json
import os

import pytest
import redis
from django.test import override_settings

from inference.admission_gate import AdmissionGate, admission_gate
from inference.engine_client import get_engine_client, prompt_tokenizers
from inference.warmup import keep_warm, report_key, warm_models, warm_up
from tenants.models import ApiKey, UsageEvent
from tenants.ratelimit import RateLimitKeys
from tests.service.conftest import wait_until

from .conftest import MODEL, asgi_completion

pytestmark = pytest.mark.timeout(300)
DONE = b"data: [DONE]\n\n"


def stream_call(key: str, *, on_start=None, on_body=None):
    """A streamed call of two tokens, with its usage chunk (conftest.asgi_completion)."""
    return asgi_completion(key, {"model": MODEL, "prompt": "Hello", "max_tokens": 2, "ignore_eos": True,
                                 "stream": True, "stream_options": {"include_usage": True}},
                           on_start=on_start, on_body=on_body)


def test_turns_are_given_in_arrival_order_one_at_a_time():
    async def scenario():
        gate, entered = AdmissionGate(1), []

        async def call(number: int) -> None:
            async with gate.turn():
                entered.append(number)
                await asyncio.sleep(0)  # others run meanwhile: they must wait

        async with gate.turn() as first:  # held while the others arrive, in order
            tasks = []
            for number in range(5):
                tasks.append(asyncio.create_task(call(number)))
                await asyncio.sleep(0)
            assert (gate.admitting, gate.waiting) == (1, 5)
            first.end()
            first.end()  # a second end gives nothing back twice
            await asyncio.gather(*tasks)
        return gate, entered

    gate, entered = asyncio.run(scenario())
    assert entered == [0, 1, 2, 3, 4]
    assert (gate.peak, gate.turns, gate.admitting, gate.waiting) == (1, 6, 0, 0)


def test_one_turn_at_a_time_admits_every_call_and_streams_do_not_hold_a_turn(live):
    """With one turn per process, several calls at once are all admitted and answered, one
    admission at a time, while the first call's stream is still open (its client takes nothing)."""
    key = live.new_key()

    async def scenario():
        gate = admission_gate()
        first_started, let_first_go = asyncio.Event(), asyncio.Event()

        async def first_blocks():
            first_started.set()
            await let_first_go.wait()

        first = asyncio.create_task(stream_call(key, on_start=first_blocks))
        await first_started.wait()  # admitted: its response began, and its client stalls it there
        others = await asyncio.gather(*(stream_call(key) for _ in range(4)))
        counters = (gate.peak, gate.turns, gate.admitting, gate.waiting)
        let_first_go.set()
        return await first, others, counters

    with override_settings(ENGINE_KEY_PREFIX=live.prefix, WEB_ADMISSION_CONCURRENCY=1):
        first, others, counters = asyncio.run(scenario())
    for status, body in [first, *others]:
        assert status == 200 and body.endswith(DONE)
    assert counters == (1, 5, 0, 0)


def test_done_is_sent_before_the_call_is_settled_and_the_call_is_settled_after(live):
    key = live.new_key()
    api_key = ApiKey.objects.select_related("tenant").get(prefix=key.split(".")[0])
    leases = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=live.prefix).leases
    client = redis.Redis.from_url(live.redis_url)
    held = []  # whether the call's concurrency slot is held: as [DONE] goes out, as the response ends

    def on_body(body: bytes) -> None:
        if body.endswith(DONE):
            request_id = json.loads(body.split(b"\n\n")[0][len(b"data: "):])["id"]
            held.append(client.zscore(leases, request_id) is not None)

    with override_settings(ENGINE_KEY_PREFIX=live.prefix):
        status, body = asyncio.run(stream_call(key, on_body=on_body))
    assert status == 200 and body.endswith(DONE)
    usage_chunk = json.loads(body.split(b"\n\n")[-3][len(b"data: "):])
    assert usage_chunk["usage"]["completion_tokens"] == 2
    assert held == [True, False]  # not settled yet when [DONE] went out, settled before the response ended
    event = wait_until(lambda: UsageEvent.objects.filter(tenant=api_key.tenant).first(), 30, "the usage event")
    assert (event.status, event.completion_tokens) == ("ok", 2)
    client.close()


def test_a_process_warms_up_and_reports_the_models_it_is_warm_for(live):
    async def scenario():
        client = get_engine_client()
        prompt_tokenizers.entries.pop(MODEL, None)  # as in a process that never served this model
        await warm_up()
        warm = await warm_models(client)
        task = asyncio.create_task(keep_warm())
        report = await _wait_async(lambda: client.redis.get(report_key(client)))
        task.cancel()
        await client.close()
        return warm, json.loads(report)

    with override_settings(ENGINE_KEY_PREFIX=live.prefix):
        warm, report = asyncio.run(scenario())
    assert warm == [MODEL] and MODEL in prompt_tokenizers.entries
    assert report == {"pid": os.getpid(), "models": [MODEL]}
    # The live server (daphne, another process) warmed itself at its start and said so.
    client = redis.Redis.from_url(live.redis_url)
    reports = [json.loads(client.get(k)) for k in client.scan_iter(match=f"{live.prefix}:web-warm:*")]
    client.close()
    assert any(r["pid"] != os.getpid() and r["models"] == [MODEL] for r in reports), reports


async def _wait_async(read, timeout: float = 30):
    async with asyncio.timeout(timeout):
        while not (value := await read()):
            await asyncio.sleep(0.1)
    return value
