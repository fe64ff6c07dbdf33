"""Token quotas on a real Redis: never overspent by 200 concurrent requests, settled to the real
count, expired holds released, a lost counter seeded from the database."""
import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from tenants.models import UsageEvent
from tenants.quota import QuotaExceeded, QuotaPeriod, period_bounds, reserve_quota
from tenants.services import record_usage
from tests.django.admission_testing import (  # noqa: F401  (key_prefix is a fixture)
    admit_many,
    burst_of,
    key_prefix,
    make_api_key,
    redis_client,
    run,
)

pytestmark = pytest.mark.usefixtures("db")


def used_tokens(api_key, key_prefix) -> int | None:
    """The period's used counter in Redis (None when there is none)."""
    period = QuotaPeriod.current(tenant=api_key.tenant, key_prefix=key_prefix)
    with redis_client() as client:
        value = client.get(period.used)
        assert client.hlen(period.amounts) == 0, "a settled request still holds tokens"
    return None if value is None else int(value)


def test_200_concurrent_requests_never_overspend(key_prefix):
    api_key = make_api_key(token_budget=10_000)
    rng = random.Random(7)
    sizes = [(rng.randint(1, 100), rng.randint(1, 200)) for _ in range(200)]

    async def scenario(redis):
        burst = await admit_many(redis, api_key, key_prefix, sizes)
        reserved = burst.tokens(admitted=True)
        actual = [rng.randint(0, tokens) for tokens in reserved]
        await asyncio.gather(*(
            admission.settle(prompt_tokens=tokens, completion_tokens=0)
            for admission, tokens in zip(burst.admitted, actual)
        ))
        return burst, actual

    burst, actual = run(scenario)
    reserved = sum(burst.tokens(admitted=True))
    assert reserved <= 10_000 and burst.refused
    # Nothing settled during the burst, so a refused request did not fit even at its end.
    assert all(reserved + tokens > 10_000 for tokens in burst.tokens(admitted=False))
    assert {(e.status, e.code, e.type) for e in burst.refused} == {
        (429, "insufficient_quota", "insufficient_quota")
    }
    assert used_tokens(api_key, key_prefix) == sum(actual)


def test_exactly_what_fits_is_admitted_and_settling_gives_the_rest_back(key_prefix):
    api_key = make_api_key(token_budget=1000, budget_period="day")

    async def scenario(redis):
        first = await admit_many(redis, api_key, key_prefix, [(10, 20)] * 200)
        for admission in first.admitted:
            await admission.settle(prompt_tokens=10, completion_tokens=5)  # 15 of the 30
        second = await admit_many(redis, api_key, key_prefix, [(10, 20)] * 200)
        return first, second

    first, second = run(scenario)
    assert len(first.admitted) == 33  # 33 * 30 = 990 <= 1000 < 34 * 30
    assert len(second.admitted) == (1000 - 33 * 15) // 30  # 16
    message = first.refused[0].message
    assert "daily budget of 1000 tokens" in message and "needs up to 30" in message


def test_settle_is_idempotent(key_prefix):
    api_key = make_api_key(token_budget=1000)

    async def scenario(redis):
        burst = await admit_many(redis, api_key, key_prefix, [(10, 90)])
        for _ in range(3):
            await burst.admitted[0].settle(prompt_tokens=10, completion_tokens=40)

    run(scenario)
    assert used_tokens(api_key, key_prefix) == 50


def test_a_quota_refusal_gives_the_rate_limit_hold_back(key_prefix):
    api_key = make_api_key(requests_per_minute=5, max_concurrent_requests=1, token_budget=100)

    async def scenario(redis):
        refused = await admit_many(redis, api_key, key_prefix, [(60, 60)])
        # Neither the request count nor the only concurrency slot stayed taken.
        fitting = await admit_many(redis, api_key, key_prefix, [(10, 10)])
        return refused.refused[0], fitting.admitted[0]

    refusal, admission = run(scenario)
    assert refusal.code == "insufficient_quota" and "Retry-After" not in refusal.headers
    assert refusal.headers["x-ratelimit-remaining-requests"] == "5"
    assert admission.headers["x-ratelimit-remaining-requests"] == "4"


def test_tenants_without_a_budget_skip_the_quota(key_prefix):
    api_key = make_api_key(token_budget=None)

    async def scenario(redis):
        burst = await admit_many(redis, api_key, key_prefix, [(10**6, 1)] * 3)
        for admission in burst.admitted:
            await admission.settle(prompt_tokens=5, completion_tokens=5)
        return burst

    assert len(run(scenario).admitted) == 3
    assert used_tokens(api_key, key_prefix) is None  # no counter was ever made


def test_holds_of_dead_requests_expire(key_prefix):
    api_key = make_api_key(token_budget=1000)
    period = QuotaPeriod.current(tenant=api_key.tenant, key_prefix=key_prefix)

    async def scenario(redis):
        async def reserve(request_id):
            await reserve_quota(
                redis=redis, period=period, budget=1000, request_id=request_id, amount=600,
                hold_ms=200,
            )

        await reserve("dies-before-settling")
        with pytest.raises(QuotaExceeded) as refused:
            await reserve("too-early")
        assert (refused.value.used, refused.value.reserved) == (0, 600)
        await asyncio.sleep(0.25)
        await reserve("after-the-hold-lapsed")

    run(scenario)


def test_a_lost_counter_is_seeded_from_the_database_once(key_prefix):
    api_key = make_api_key(token_budget=1000)
    other = make_api_key(token_budget=1000)
    start, _ = period_bounds(budget_period="month", now=datetime.now(UTC))
    history = [(api_key, 400), (api_key, 300), (api_key, 500), (other, 900)]
    for i, (key, tokens) in enumerate(history):
        record_usage(
            api_key=key, request_id=f"{key_prefix}-{i}", model="m", endpoint="chat.completions",
            prompt_tokens=tokens - 100, completion_tokens=100,
        )
    # The 500 tokens belong to the previous period.
    UsageEvent.objects.filter(request_id=f"{key_prefix}-2").update(
        created_at=start - timedelta(seconds=1)
    )

    # 20 racing seeders: the counter starts at 700 once, not 20 times.
    burst = run(burst_of(api_key, key_prefix, [(20, 10)] * 20))
    assert len(burst.admitted) == 10  # (1000 - 700) / 30
    assert "has used 700" in burst.refused[0].message
    period = QuotaPeriod.current(tenant=api_key.tenant, key_prefix=key_prefix)
    with redis_client() as client:
        assert int(client.get(period.used)) == 700
        lifetime = period.end + timedelta(days=1) - start  # a day past the period
        assert 0 < client.pttl(period.used) <= lifetime.total_seconds() * 1000


@pytest.mark.parametrize("period, now, start, end", [
    ("day", datetime(2026, 11, 28, 23, 59, tzinfo=UTC),
     datetime(2026, 11, 28, tzinfo=UTC), datetime(2026, 11, 29, tzinfo=UTC)),
    ("month", datetime(2026, 12, 31, 12, tzinfo=UTC),
     datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC)),
    ("month", datetime(2027, 2, 1, tzinfo=UTC),
     datetime(2027, 2, 1, tzinfo=UTC), datetime(2027, 3, 1, tzinfo=UTC)),
])
def test_budget_periods_are_utc_days_and_months(period, now, start, end):
    assert period_bounds(budget_period=period, now=now) == (start, end)
