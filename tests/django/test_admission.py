"""The admission facade the views call: its contract, no database in the hot path, and no hold
left behind when the quota step fails."""
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext

from tenants import admission
from tenants.admission import Admission, AdmissionRefused, admit, release_abandoned
from tests.django.admission_testing import (  # noqa: F401  (key_prefix is a fixture)
    burst_of,
    key_prefix,
    make_api_key,
    run,
)

pytestmark = pytest.mark.usefixtures("db")


def test_admission_and_refusal_carry_what_the_view_needs(key_prefix):
    api_key = make_api_key(requests_per_minute=1)

    async def scenario(redis):
        admitted = await admit(
            redis=redis, api_key=api_key, request_id="req-1", prompt_tokens=3, max_tokens=4,
            key_prefix=key_prefix,
        )
        with pytest.raises(AdmissionRefused) as refused:
            await admit(
                redis=redis, api_key=api_key, request_id="req-2", prompt_tokens=3, max_tokens=4,
                key_prefix=key_prefix,
            )
        await admitted.settle(prompt_tokens=3, completion_tokens=2)
        return admitted, refused.value

    admitted, refused = run(scenario)
    assert isinstance(admitted, Admission) and admitted.request_id == "req-1"
    assert admitted.headers["x-ratelimit-remaining-requests"] == "0"
    assert (refused.status, refused.code, refused.type) == (429, "rate_limit_exceeded", "requests")
    assert str(refused) == refused.message and "Please try again in" in refused.message
    assert refused.headers["Retry-After"].isdigit()


@pytest.mark.parametrize("budget, queries", [(None, 0), (10_000, 1)])
def test_only_a_missing_quota_counter_touches_the_database(key_prefix, budget, queries):
    api_key = make_api_key(token_budget=budget)

    def admit_once():
        with CaptureQueriesContext(connection) as captured:
            burst = run(burst_of(api_key, key_prefix, [(10, 10)]))
        assert len(burst.admitted) == 1
        return len(captured)

    assert admit_once() == queries  # the seed, when there is a budget
    assert admit_once() == 0


def test_a_failing_quota_step_gives_the_rate_limit_hold_back(key_prefix, monkeypatch):
    api_key = make_api_key(max_concurrent_requests=1, token_budget=10_000)

    async def redis_went_away(**kwargs):
        raise ConnectionError("redis went away")

    def admit_one():
        return run(burst_of(api_key, key_prefix, [(1, 1)]))

    with monkeypatch.context() as patch:
        patch.setattr(admission, "reserve_quota", redis_went_away)
        with pytest.raises(ConnectionError):
            admit_one()
    assert len(admit_one().admitted) == 1  # the only concurrency slot was given back


def test_the_holds_of_an_abandoned_request_are_given_back_once(key_prefix):
    """A batch worker killed mid-line never settles it: whoever resumes gives its holds back. A
    request that did settle is left alone, so its real token counts stand."""
    api_key = make_api_key(max_concurrent_requests=1, token_budget=10_000)

    async def scenario(redis):
        await admit(redis=redis, api_key=api_key, request_id="killed", prompt_tokens=3, max_tokens=4,
                    key_prefix=key_prefix)
        with pytest.raises(AdmissionRefused):  # its slot is taken
            await admit(redis=redis, api_key=api_key, request_id="next", prompt_tokens=3, max_tokens=4,
                        key_prefix=key_prefix)
        await release_abandoned(redis=redis, api_key=api_key, request_id="killed", key_prefix=key_prefix)
        settled = await admit(redis=redis, api_key=api_key, request_id="next", prompt_tokens=3, max_tokens=4,
                              key_prefix=key_prefix)
        await settled.settle(prompt_tokens=3, completion_tokens=4)
        counts = await redis.hgetall(settled.rate_limit_keys.token_counts)
        await release_abandoned(redis=redis, api_key=api_key, request_id="next", key_prefix=key_prefix)
        return counts, await redis.hgetall(settled.rate_limit_keys.token_counts)

    counts_before, counts_after = run(scenario)
    assert counts_before[b"next"] == b"7" and counts_after == counts_before
