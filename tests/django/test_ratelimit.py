"""Rate limits on a real Redis: exact under 200 concurrent admissions, scoped, OpenAI headers."""
import asyncio
import random
import re
import threading
from uuid import uuid4

import pytest

from tenants.ratelimit import RateLimitKeys, check_rate_limits, format_duration
from tenants.selectors import effective_limits
from tenants.services import create_api_key
from tests.django.admission_testing import (  # noqa: F401  (key_prefix is a fixture)
    admit_many,
    async_redis_client,
    burst_of,
    key_prefix,
    make_api_key,
    redis_client,
    run,
)

pytestmark = pytest.mark.usefixtures("db")

DURATION = re.compile(r"^(\d+h)?(\d+m)?(\d+(\.\d+)?s|\d+ms)$")
ONE_TOKEN = [(1, 0)]


def test_requests_per_minute_exact_under_200_concurrent(key_prefix):
    api_key = make_api_key(requests_per_minute=37)
    burst = run(burst_of(api_key, key_prefix, ONE_TOKEN * 200))
    assert len(burst.admitted) == 37
    assert {(e.status, e.code, e.type) for e in burst.refused} == {
        (429, "rate_limit_exceeded", "requests")
    }
    assert "requests per min (RPM): Limit 37, Used 37" in burst.refused[0].message


def test_requests_per_minute_exact_across_threads_and_event_loops(key_prefix):
    api_key = make_api_key(requests_per_minute=23)
    admitted, start = [], threading.Barrier(4)

    def worker():
        async def main():
            async with async_redis_client() as client:
                start.wait()
                burst = await admit_many(client, api_key, key_prefix, ONE_TOKEN * 50)
            admitted.append(len(burst.admitted))

        asyncio.run(main())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(admitted) == 4 and sum(admitted) == 23


def test_concurrency_exact_and_settle_frees_slots(key_prefix):
    api_key = make_api_key(max_concurrent_requests=7)

    async def scenario(redis):
        first = await admit_many(redis, api_key, key_prefix, ONE_TOKEN * 200)
        for admission in first.admitted[:2]:
            await admission.settle(prompt_tokens=1, completion_tokens=0)
            await admission.settle(prompt_tokens=1, completion_tokens=0)  # idempotent
        second = await admit_many(redis, api_key, key_prefix, ONE_TOKEN * 200)
        return first, second

    first, second = run(scenario)
    assert (len(first.admitted), len(second.admitted)) == (7, 2)
    refusal = first.refused[0]
    assert (refusal.code, refusal.type, refusal.headers["Retry-After"]) == (
        "rate_limit_exceeded", "requests", "1",
    )
    assert "concurrent requests" in refusal.message and "Limit 7" in refusal.message


def test_tokens_per_minute_exact_and_corrected_on_settle(key_prefix):
    api_key = make_api_key(tokens_per_minute=1000)

    async def scenario(redis):
        first = await admit_many(redis, api_key, key_prefix, [(20, 30)] * 200)
        for admission in first.admitted[:5]:  # each used 10 of its 50: frees 5 * 40 = 200
            await admission.settle(prompt_tokens=5, completion_tokens=5)
        second = await admit_many(redis, api_key, key_prefix, [(20, 30)] * 200)
        return first, second

    first, second = run(scenario)
    assert len(first.admitted) == 20 and len(second.admitted) == 4
    refusal = first.refused[0]
    assert (refusal.code, refusal.type) == ("rate_limit_exceeded", "tokens")
    assert "tokens per min (TPM): Limit 1000, Used 1000, Requested 50" in refusal.message
    assert 1 <= int(refusal.headers["Retry-After"]) <= 60


def test_tokens_per_minute_refuses_only_what_does_not_fit(key_prefix):
    api_key = make_api_key(tokens_per_minute=5000)
    rng = random.Random(5)
    sizes = [(rng.randint(1, 100), rng.randint(0, 200)) for _ in range(200)]
    burst = run(burst_of(api_key, key_prefix, sizes))
    spent = sum(burst.tokens(admitted=True))
    assert spent <= 5000 and burst.refused
    # Tokens are only ever added here, so a refused request did not fit even at the end.
    assert all(spent + tokens > 5000 for tokens in burst.tokens(admitted=False))


def test_a_request_larger_than_the_limit_is_told_so(key_prefix):
    api_key = make_api_key(tokens_per_minute=100)
    burst = run(burst_of(api_key, key_prefix, [(80, 40)]))
    assert burst.refused[0].type == "tokens" and "Request too large" in burst.refused[0].message


def test_the_window_slides(key_prefix):
    api_key = make_api_key(requests_per_minute=3)
    keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
    limits = effective_limits(api_key=api_key)

    async def burst(redis, n):
        decisions = await asyncio.gather(*(
            check_rate_limits(
                redis=redis, keys=keys, limits=limits, request_id=uuid4().hex, tokens=1,
                window_ms=500,
            )
            for _ in range(n)
        ))
        return [d for d in decisions if d.admitted], [d for d in decisions if not d.admitted]

    async def scenario(redis):
        admitted, refused = await burst(redis, 10)
        assert len(admitted) == 3 and 0 < refused[0].wait_ms <= 500
        assert (await burst(redis, 10))[0] == []  # still inside the window
        await asyncio.sleep(0.55)
        assert len((await burst(redis, 10))[0]) == 3

    run(scenario)


def test_leases_of_dead_workers_expire(key_prefix):
    api_key = make_api_key(max_concurrent_requests=2)
    keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
    limits = effective_limits(api_key=api_key)

    async def scenario(redis):
        async def attempt(request_id):
            decision = await check_rate_limits(
                redis=redis, keys=keys, limits=limits, request_id=request_id, tokens=1, lease_ms=200
            )
            return decision.admitted

        assert [await attempt(f"dies-{i}") for i in range(3)] == [True, True, False]
        await asyncio.sleep(0.25)  # neither holder settled; their leases lapsed
        assert [await attempt(f"next-{i}") for i in range(3)] == [True, True, False]

    run(scenario)


def test_counters_belong_to_the_tenant_unless_the_key_overrides(key_prefix):
    first = make_api_key(requests_per_minute=5)
    second, _ = create_api_key(tenant=first.tenant)
    own, _ = create_api_key(tenant=first.tenant, requests_per_minute=3)

    async def scenario(redis):
        return await asyncio.gather(*(
            admit_many(redis, key, key_prefix, ONE_TOKEN * 20) for key in (first, second, own)
        ))

    shared_a, shared_b, separate = run(scenario)
    assert len(shared_a.admitted) + len(shared_b.admitted) == 5
    assert len(separate.admitted) == 3
    assert "API key " + own.prefix in separate.refused[0].message
    assert "tenant " + repr(first.tenant.name) in shared_a.refused[0].message
    own_keys = RateLimitKeys.for_api_key(api_key=own, key_prefix=key_prefix)
    shared_keys = RateLimitKeys.for_api_key(api_key=first, key_prefix=key_prefix)
    assert own_keys.requests != shared_keys.requests
    assert own_keys.tokens_log == shared_keys.tokens_log and own_keys.leases == shared_keys.leases


def test_headers_on_admission_and_refusal(key_prefix):
    api_key = make_api_key(requests_per_minute=2, tokens_per_minute=1000)

    async def scenario(redis):
        first = await admit_many(redis, api_key, key_prefix, [(20, 30)])
        rest = await admit_many(redis, api_key, key_prefix, [(20, 30)] * 2)
        return first.admitted[0].headers, rest.refused[0].headers

    admitted, refused = run(scenario)
    assert admitted == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "1m0s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "950",
        "x-ratelimit-reset-tokens": "1m0s",
    }
    assert refused["x-ratelimit-remaining-requests"] == "0"
    assert refused["x-ratelimit-remaining-tokens"] == "900"
    assert 1 <= int(refused["Retry-After"]) <= 60
    assert DURATION.match(refused["x-ratelimit-reset-requests"])
    assert DURATION.match(refused["x-ratelimit-reset-tokens"])


@pytest.mark.parametrize("ms, text", [
    (0, "0s"), (120, "120ms"), (999, "999ms"), (1000, "1s"), (1500, "1.5s"), (59_990, "59.99s"),
    (60_000, "1m0s"), (360_000, "6m0s"), (3_723_004, "1h2m3.004s"),
])
def test_reset_durations_use_openais_format(ms, text):
    assert format_duration(ms) == text and DURATION.match(text)


def test_every_key_expires(key_prefix):
    api_key = make_api_key(requests_per_minute=3, max_concurrent_requests=2)
    run(burst_of(api_key, key_prefix, ONE_TOKEN * 10))
    with redis_client() as client:
        keys = list(client.scan_iter(f"{key_prefix}:*"))
        assert len(keys) == 7  # five of the per-minute logs and concurrency, two of sequences in flight
        assert all(0 < client.pttl(key) <= 15 * 60_000 for key in keys)
