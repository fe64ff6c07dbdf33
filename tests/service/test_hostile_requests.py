"""One tenant's requests cannot hurt the others' through the engine service (issue 15): a request
with values the engine cannot represent fails alone with invalid_request; requests with big stop
lists leave Redis as small as they found it; a request aborted during its prefill reports the
prompt tokens the engine computed, so it is billed. Real Redis, a real replica, the real client."""

from __future__ import annotations

import asyncio

import pytest

from engine.service.protocol import Usage
from inference.generation import GenerationPlan, generate

pytestmark = pytest.mark.timeout(300)
CHUNK = 64  # prefill tokens per step: a long prompt takes many steps, so it can be aborted halfway


@pytest.fixture(scope="module")
def svc(module_service):
    module_service.start_replica("r", "--max-num-batched-tokens", str(CHUNK))
    return module_service


BAD_PARAMS = [
    {"top_k": 2**63}, {"top_k": 50_000},  # past int64; past the vocabulary (49152)
    {"seed": 2**64 - 1}, {"n": 10**6}, {"max_tokens": 2**40}, {"stop_token_ids": [2**40]},
    {"stop_token_ids": [49_152]}, {"logprobs": 10**6}, {"temperature": float("inf")},
    {"stop": ["x"] * 17}, {"stop": ["x" * 1025]},
]


def test_unrepresentable_parameters_fail_alone(svc):
    innocent = svc.request("Tell me a long story.", max_tokens=32, ignore_eos=True)

    async def main():
        async with svc.client(stall_check_s=1.0) as client:
            stream = await client.submit(innocent)
            first = await anext(stream)  # running now
            bad = await asyncio.gather(*(svc.run(client, svc.request("Hello", **params), timeout=60)
                                         for params in BAD_PARAMS))
            return [first] + await svc.collect(stream, timeout=60), bad

    innocent_deltas, bad = asyncio.run(main())
    svc.assert_completed(innocent_deltas, max_tokens=32)
    for params, deltas in zip(BAD_PARAMS, bad):
        assert svc.error_code(deltas) == "invalid_request", (params, deltas[-1])
        assert next(iter(params)) in deltas[-1].error["message"], (params, deltas[-1])
    assert svc.replicas[0].alive()


def prefix_memory(svc) -> tuple[int, dict[str, int]]:
    """Bytes held by every key under the test's prefix (MEMORY USAGE, exact for streams)."""
    client = svc.sync_redis()
    try:
        sizes = {key.decode(): client.memory_usage(key, samples=0) or 0
                 for key in client.scan_iter(match=f"{svc.prefix}:*", count=1000)}
    finally:
        client.close()
    return sum(sizes.values()), sizes


def test_big_stop_lists_leave_redis_as_small_as_before(svc):
    """Each request carries 16 stop strings of 1024 characters (~16 KB): before, every request
    entry stayed in the stream after it was taken (trimmed only at ~100k entries)."""
    stop = [f"{i:04d}" + "~" * 1020 for i in range(16)]
    num_requests = 96  # ~1.6 MB of request entries

    async def main():
        async with svc.client() as client:
            await svc.run(client, svc.request("Hi", max_tokens=1))  # streams, group, liveness key exist
            start, _ = prefix_memory(svc)
            requests = [svc.request(f"Request {i}:", max_tokens=2, stop=stop) for i in range(num_requests)]
            runs = [asyncio.create_task(svc.run(client, r, timeout=240)) for r in requests]
            peak = 0
            while not all(run.done() for run in runs):
                peak = max(peak, prefix_memory(svc)[0])
                await asyncio.sleep(0.5)
            results = [run.result() for run in runs]
            return start, peak, results

    start, peak, results = asyncio.run(main())
    for deltas in results:
        svc.assert_completed(deltas)
    end, sizes = svc.wait_until(lambda: (m := prefix_memory(svc))[0] < start + 64 * 1024 and m, 10,
                                f"Redis memory under the prefix back near {start} bytes")
    assert peak > start + 500_000, (start, peak)  # the test did load Redis
    client = svc.sync_redis()
    try:
        assert client.xlen(svc.keys.requests(svc.MODEL)) == 0
        assert svc.pending_count() == 0
        assert all(client.ttl(key) > 0 for key in sizes if ":requests:" in key or ":reply:" in key), \
            {key: client.ttl(key) for key in sizes}
    finally:
        client.close()


def test_a_request_aborted_during_prefill_is_billed_for_its_prompt(svc):
    """The client leaves while the replica computes a ~3000-token prompt 64 tokens a step; the
    replica's answer to the abort carries the prompt tokens it computed, and generate() (what
    inference.services.Call bills) records them."""
    prompt = list(range(1000, 4000))
    plan = GenerationPlan("call-1", svc.MODEL, "tenant-a", [prompt], {"max_tokens": 4, "temperature": 0.0})
    usages: dict[int, Usage] = {}

    async def main():
        async with svc.client() as client:
            deltas = generate(client, plan, usages)
            first = asyncio.create_task(anext(deltas))
            for _ in range(300):
                beat = await asyncio.to_thread(svc.replicas[0].heartbeat)
                if beat and beat.num_running == 1:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the replica never ran the request")
            await asyncio.sleep(1.0)  # some prefill chunks are computed
            assert not first.done(), "the prefill finished before the abort: make the prompt longer"
            first.cancel()  # the client went away
            with pytest.raises(asyncio.CancelledError):
                await first
            await deltas.aclose()

    asyncio.run(main())
    usage = usages[0]
    assert CHUNK <= usage.prompt_tokens < len(prompt), usage
    assert usage.completion_tokens == 0
