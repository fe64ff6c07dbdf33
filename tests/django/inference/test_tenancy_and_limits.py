"""Keys, model allowlists, and limits enforced through the live API under 200 concurrent calls."""
from __future__ import annotations

import asyncio
from datetime import timedelta

import openai
import pytest
from django.core import serializers
from django.db.models import Sum
from django.utils import timezone

from tenants.models import ApiKey, UsageEvent
from tenants.services import revoke_api_key
from tests.service.conftest import wait_until

from .conftest import MODEL

pytestmark = pytest.mark.timeout(300)
TINY = {"model": MODEL, "prompt": "Hello", "max_tokens": 1}


def status_of(call) -> int:
    try:
        call()
        return 200
    except openai.APIStatusError as error:
        return error.status_code


def test_missing_wrong_expired_and_revoked_keys_are_401(live):
    good = live.new_key()
    expired = live.new_key()
    ApiKey.objects.filter(prefix=expired.split(".")[0]).update(expires_at=timezone.now() - timedelta(seconds=1))
    revoked = live.new_key()
    revoke_api_key(api_key=ApiKey.objects.get(prefix=revoked.split(".")[0]))
    tampered = good[:-4] + ("aaaa" if not good.endswith("aaaa") else "bbbb")
    for key in ("sk-wrong.key", tampered, expired, revoked):
        with pytest.raises(openai.AuthenticationError) as info:
            live.openai(key).completions.create(**TINY)
        assert info.value.body["code"] == "invalid_api_key"
    with live.http() as http:
        response = http.post("/v1/completions", json=TINY)
        assert response.status_code == 401 and response.json()["error"]["code"] == "missing_api_key"
    assert status_of(lambda: live.openai(good).completions.create(**TINY)) == 200


def test_model_allowlist(live):
    other_only = live.openai(live.new_key(models=["some-other-model"]))
    with pytest.raises(openai.PermissionDeniedError) as info:
        other_only.completions.create(**TINY)
    assert info.value.body["code"] == "model_not_allowed"
    assert other_only.models.list().data == []
    allowed = live.openai(live.new_key(models=[MODEL]))
    assert [m.id for m in allowed.models.list().data] == [MODEL]


def test_keys_are_never_stored_in_clear(live):
    key = live.new_key()
    live.openai(key).completions.create(**TINY)
    secret = key.split(".", 1)[1]
    dump = serializers.serialize("json", [*ApiKey.objects.all(), *UsageEvent.objects.all()])
    assert secret not in dump and key not in dump


async def burst(live, key: str, count: int, body: dict) -> list:
    client = live.async_openai(key)
    try:
        return await asyncio.gather(*(client.completions.with_raw_response.create(**body) for _ in range(count)),
                                    return_exceptions=True)
    finally:
        await client.close()


def unexpected_errors(results: list) -> set[str]:
    """The failures other than 429s, for an assertion's message."""
    return {f"{type(r).__name__}: {str(r)[:300]}" for r in results
            if isinstance(r, Exception) and not isinstance(r, openai.RateLimitError)}


def test_requests_per_minute_is_exact_under_200_concurrent_calls(live):
    key = live.new_key(requests_per_minute=50)
    results = asyncio.run(burst(live, key, 200, TINY))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert (len(admitted), len(refused)) == (50, 150), unexpected_errors(results)
    error = refused[0]
    assert error.body["code"] == "rate_limit_exceeded"
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-ratelimit-limit-requests"] == "50"
    assert admitted[0].headers["x-ratelimit-limit-requests"] == "50"


def test_concurrent_requests_limit_is_exact(live):
    """200 streams at once: the admitted ones stay open (long generations) until every call is
    decided, so exactly the limit is admitted whatever the machine's speed."""
    key = live.new_key(max_concurrent_requests=5)
    body = {**TINY, "max_tokens": 2000, "stream": True, "extra_body": {"ignore_eos": True}}

    async def main():
        client = live.async_openai(key)
        results = await asyncio.gather(*(client.completions.create(**body) for _ in range(200)),
                                       return_exceptions=True)
        for stream in results:
            if not isinstance(stream, Exception):
                await stream.close()  # disconnects: the engine requests are aborted
        await client.close()
        return results

    results = asyncio.run(main())
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert len(admitted) == 5, {repr(r)[:200] for r in results if not isinstance(r, openai.RateLimitError)}
    assert all(isinstance(r, openai.RateLimitError) for r in results if isinstance(r, Exception))


def test_quota_is_never_overspent_under_200_concurrent_calls(live):
    budget = 400  # ~45 calls admitted: a slow CPU engine answers them well within the client timeout
    key = live.new_key(token_budget=budget)
    body = {**TINY, "max_tokens": 8}
    results = asyncio.run(burst(live, key, 200, body))
    refused = [r for r in results if isinstance(r, openai.RateLimitError)]
    admitted = [r for r in results if not isinstance(r, Exception)]
    assert admitted and refused and len(admitted) + len(refused) == 200, unexpected_errors(results)
    assert all(r.body["code"] == "insufficient_quota" for r in refused)
    tenant = live.tenant_of(key)
    events = UsageEvent.objects.filter(tenant=tenant)
    wait_until(lambda: events.count() >= len(admitted), 30, "the buffered usage events")
    assert events.count() == len(admitted)
    assert events.aggregate(total=Sum("prompt_tokens") + Sum("completion_tokens"))["total"] <= budget
