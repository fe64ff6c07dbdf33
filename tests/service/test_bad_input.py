"""Input that passes a first look but can take a replica (or part of it) down: each test gets a
fresh replica of its own (they load in parallel), sends the bad message, then checks that the
replica still serves a normal request. The issue: "A malformed message goes to a dead-letter stream with the
reason, and the engine goes on"; the brief: "Bad input never ... loses accepted work"."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from engine.service.protocol import encode

pytestmark = pytest.mark.timeout(240)

CASES = ("non_text_keys", "bad_abort", "huge_logprobs")


@pytest.fixture(scope="module")
def services(make_module_service):
    """One Service (own prefix) per test, each with one replica, all loading at the same time."""
    services = {case: make_module_service() for case in CASES}
    for svc in services.values():
        svc.start_replica("r", wait=False)
    return services


@pytest.fixture
def svc(request, services):
    """The fresh replica's Service for the test `test_<case>...`."""
    case = next(c for c in CASES if request.node.name.startswith(f"test_{c}"))
    service = services[case]
    service.replicas[0].wait_ready()
    return service


def served_normally(svc, timeout_s=15.0):
    """A normal request through the client completes (returns its deltas)."""
    async def main():
        async with svc.client(stall_check_s=1.0) as client:
            return await svc.run(client, svc.request("Hello", max_tokens=4), timeout=timeout_s + 20,
                                 timeout_s=timeout_s)

    deltas = asyncio.run(main())
    svc.assert_completed(deltas)
    return deltas


def dead_letter_reasons(svc) -> dict[bytes, bytes]:
    client = svc.sync_redis()
    try:
        return {fields[b"entry_id"]: fields[b"reason"] for _, fields in client.xrange(svc.keys.dead_letter)}
    finally:
        client.close()


def test_non_text_keys_in_a_request_are_dead_lettered(svc):
    """msgpack maps may have integer keys; one in the sampling params makes decode_request raise
    TypeError (not ProtocolError), which must not end the replica's reader thread (a replica
    whose reader died keeps sending heartbeats but never takes another request)."""
    payload = msgpack.unpackb(encode(svc.request("Hi")), raw=False)
    payload["params"] = {1: 2}
    entry_id = svc.enqueue_raw({"data": msgpack.packb(payload)})
    served_normally(svc)
    assert entry_id in dead_letter_reasons(svc)
    assert svc.replicas[0].alive()


def test_bad_abort_entries_are_ignored(svc):
    """Every replica reads the aborts stream; an entry without a request_id (or not UTF-8) must
    not raise in the reader thread (KeyError / UnicodeDecodeError end it): one bad XADD would
    stop the whole fleet from taking work while their heartbeats go on."""
    served_normally(svc)  # the reader is up and past its first read of the aborts stream
    client = svc.sync_redis()
    try:
        client.xadd(svc.keys.aborts, {"id": "req-x"})
        client.xadd(svc.keys.aborts, {"request_id": b"\xff\xfe"})
    finally:
        client.close()
    time.sleep(1.0)  # the reader has read them by now
    served_normally(svc)
    assert svc.replicas[0].alive()


@pytest.mark.parametrize("param", ["logprobs", "prompt_logprobs"])
def test_huge_logprobs_is_an_invalid_request(svc, param):
    """logprobs beyond the vocabulary pass validation, then torch.topk fails inside the engine
    step, and the replica fails *every* request in flight with engine_error. One bad request must
    get invalid_request and cost nobody else their work."""
    innocent = svc.request("Tell me a long story.", max_tokens=48, ignore_eos=True)
    bad = svc.request("Hello there, how are you today?", max_tokens=2, **{param: 1_000_000})

    async def main():
        async with svc.client(stall_check_s=1.0) as client:
            innocent_stream = await client.submit(innocent)
            first = await anext(innocent_stream)  # running now
            bad_deltas = await svc.run(client, bad, timeout=60)
            return [first] + await svc.collect(innocent_stream, timeout=60), bad_deltas

    innocent_deltas, bad_deltas = asyncio.run(main())
    svc.assert_completed(innocent_deltas, max_tokens=48)
    assert svc.error_code(bad_deltas) == "invalid_request", bad_deltas[-1]
    assert param in bad_deltas[-1].error["message"]
    assert svc.replicas[0].alive(), svc.replicas[0].log_tail()
