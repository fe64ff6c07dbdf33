"""Sequences in flight (n x prompts of each admitted call) on a real Redis: exact under 200
concurrent admissions, the tenant's across its keys, given back on settle, refund, abandonment
and lease expiry (issue 15, finding 5)."""
import asyncio
import random
from uuid import uuid4

import pytest

from tenants.admission import Admission, AdmissionRefused, admit, release_abandoned
from tenants.ratelimit import RateLimitKeys, check_rate_limits
from tenants.selectors import effective_limits
from tenants.services import create_api_key
from tests.django.admission_testing import (  # noqa: F401  (key_prefix is a fixture)
    key_prefix,
    make_api_key,
    redis_client,
    run,
)

pytestmark = pytest.mark.usefixtures("db")


async def admit_sequences(redis, api_key, key_prefix, sizes: list[int]) -> list[Admission | AdmissionRefused]:
    """One admission per entry of `sizes` (its sequences), all at once."""
    results = await asyncio.gather(*(
        admit(redis=redis, api_key=api_key, request_id=f"req-{i}-{uuid4().hex}", prompt_tokens=1,
              max_tokens=1, sequences=size, key_prefix=key_prefix)
        for i, size in enumerate(sizes)
    ), return_exceptions=True)
    for result in results:
        if not isinstance(result, (Admission, AdmissionRefused)):
            raise result
    return results


def admitted(results) -> list[Admission]:
    return [r for r in results if isinstance(r, Admission)]


def test_sequences_in_flight_are_exact_under_200_concurrent_calls(key_prefix):
    api_key = make_api_key(max_sequences_in_flight=256)
    sizes = [random.Random(15).randint(1, 64) for _ in range(200)]
    results = run(lambda redis: admit_sequences(redis, api_key, key_prefix, sizes))
    held = sum(size for size, r in zip(sizes, results) if isinstance(r, Admission))
    assert held <= 256
    refused = [(size, r) for size, r in zip(sizes, results) if isinstance(r, AdmissionRefused)]
    # Holds only grow during the burst, so each refused call did not fit even at the end.
    assert refused and all(held + size > 256 for size, _ in refused)
    size, refusal = refused[0]
    assert (refusal.status, refusal.code, refusal.type) == (429, "rate_limit_exceeded", "requests")
    assert refusal.headers["Retry-After"] == "1"
    assert "sequences in flight for tenant" in refusal.message and "Limit 256 (max_sequences_in_flight)" in refusal.message
    assert f"Requested {size} (n x prompts)" in refusal.message


def test_settling_gives_the_sequences_back(key_prefix):
    api_key = make_api_key(max_sequences_in_flight=256)

    async def one_by_one(redis, sizes):
        return [(await admit_sequences(redis, api_key, key_prefix, [size]))[0] for size in sizes]

    async def scenario(redis):
        first = await one_by_one(redis, [128, 128, 1])
        await first[0].settle(prompt_tokens=1, completion_tokens=1)
        await first[0].settle(prompt_tokens=1, completion_tokens=1)  # idempotent: gives back once
        second = await one_by_one(redis, [128, 1])
        return first, second

    first, second = run(scenario)
    assert [isinstance(r, Admission) for r in first] == [True, True, False]
    assert "Running 256, Requested 1" in first[2].message
    assert [isinstance(r, Admission) for r in second] == [True, False]


def test_the_limit_is_the_tenants_whatever_its_keys_override(key_prefix):
    first = make_api_key(max_sequences_in_flight=100)
    own, _ = create_api_key(tenant=first.tenant, max_concurrent_requests=50, requests_per_minute=1000)

    async def scenario(redis):
        return await asyncio.gather(admit_sequences(redis, first, key_prefix, [10] * 20),
                                    admit_sequences(redis, own, key_prefix, [10] * 20))

    a, b = run(scenario)
    assert len(admitted(a)) + len(admitted(b)) == 10
    assert RateLimitKeys.for_api_key(api_key=own, key_prefix=key_prefix).sequence_counts == \
        RateLimitKeys.for_api_key(api_key=first, key_prefix=key_prefix).sequence_counts


def test_a_concurrency_refusal_holds_no_sequences(key_prefix):
    api_key = make_api_key(max_sequences_in_flight=10, max_concurrent_requests=1)

    async def scenario(redis):
        one = await admit_sequences(redis, api_key, key_prefix, [3])
        refused = await admit_sequences(redis, api_key, key_prefix, [3] * 5)
        counts = await redis.hgetall(RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix).sequence_counts)
        await one[0].settle(prompt_tokens=1, completion_tokens=1)
        return refused, counts, await admit_sequences(redis, api_key, key_prefix, [10])

    refused, counts, after = run(scenario)
    assert not admitted(refused) and {r.message.split(":")[0] for r in refused} == {
        f"Too many concurrent requests for tenant {api_key.tenant.name!r}"}
    assert list(counts.values()) == [b"3"] and len(admitted(after)) == 1


def test_a_quota_refusal_gives_the_sequences_back(key_prefix):
    """The rate-limit step held the sequences; the quota refused (2 + 2 tokens > 3), which refunds them."""
    api_key = make_api_key(max_sequences_in_flight=10, token_budget=3)

    async def scenario(redis):
        first = await admit_sequences(redis, api_key, key_prefix, [5])
        second = await admit_sequences(redis, api_key, key_prefix, [5])
        keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
        return first + second, await redis.hgetall(keys.sequence_counts), await redis.zcard(keys.sequence_leases)

    (first, second), counts, leases = run(scenario)
    assert isinstance(first, Admission) and second.code == "insufficient_quota"
    assert counts == {first.request_id.encode(): b"5"} and leases == 1


def test_an_abandoned_calls_sequences_are_given_back(key_prefix):
    api_key = make_api_key(max_sequences_in_flight=8)

    async def scenario(redis):
        await admit(redis=redis, api_key=api_key, request_id="killed", prompt_tokens=1, max_tokens=1, sequences=8,
                    key_prefix=key_prefix)
        blocked = await admit_sequences(redis, api_key, key_prefix, [1])
        await release_abandoned(redis=redis, api_key=api_key, request_id="killed", key_prefix=key_prefix)
        return blocked, await admit_sequences(redis, api_key, key_prefix, [8])

    blocked, after = run(scenario)
    assert not admitted(blocked) and len(admitted(after)) == 1


def test_sequence_holds_of_dead_workers_expire(key_prefix):
    api_key = make_api_key(max_sequences_in_flight=10)
    keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
    limits = effective_limits(api_key=api_key)

    async def scenario(redis):
        async def attempt(request_id, sequences):
            decision = await check_rate_limits(redis=redis, keys=keys, limits=limits, request_id=request_id,
                                               tokens=1, sequences=sequences, lease_ms=200)
            return decision.admitted

        assert [await attempt("dies-1", 6), await attempt("dies-2", 4), await attempt("dies-3", 1)] == \
            [True, True, False]
        await asyncio.sleep(0.25)  # neither holder settled; their leases lapsed
        assert [await attempt("next-1", 10), await attempt("next-2", 1)] == [True, False]
        return await redis.hlen(keys.sequence_counts)

    assert run(scenario) == 1  # the dead holders' counts went with their leases


def test_sequence_keys_expire(key_prefix):
    api_key = make_api_key()
    run(lambda redis: admit_sequences(redis, api_key, key_prefix, [5]))
    with redis_client() as client:
        keys = list(client.scan_iter(f"{key_prefix}:*:sequence*"))
        assert len(keys) == 2 and all(0 < client.pttl(key) <= 15 * 60_000 for key in keys)
