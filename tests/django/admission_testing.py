"""What the rate-limit and quota tests share: a real Redis under a key prefix of the test's own,
async scenarios that may touch the test's database, API keys with generous defaults, and a
burst of concurrent admissions."""
import asyncio
from dataclasses import dataclass
from uuid import uuid4

import pytest
import redis
from asgiref.sync import async_to_sync
from django.conf import settings
from redis.asyncio import Redis

from tenants.admission import Admission, AdmissionRefused, admit
from tenants.models import ApiKey
from tenants.services import create_api_key, create_tenant

# Limits high enough never to refuse, so a test can tighten only the one it is about.
GENEROUS = {
    "requests_per_minute": 100_000,
    "tokens_per_minute": 10**9,
    "max_concurrent_requests": 100_000,
}


@pytest.fixture
def key_prefix() -> str:
    """A Redis key prefix no other test uses; its keys are deleted afterwards."""
    prefix = f"test-{uuid4().hex}"
    yield prefix
    with redis_client() as client:
        for key in client.scan_iter(f"{prefix}:*"):
            client.delete(key)


def redis_client() -> redis.Redis:
    """A plain client, for looking at what the scripts left in Redis."""
    return redis.Redis.from_url(settings.REDIS_URL, decode_responses=True)


def async_redis_client() -> Redis:
    """A client with a connection for each of 200 concurrent calls (redis-py's default is 100)."""
    return Redis.from_url(settings.REDIS_URL, max_connections=256)


def run(scenario):
    """`await scenario(redis)` with a client of its own, returning what it returns.

    async_to_sync, not asyncio.run: the quota's sync_to_async seed query then runs on this
    thread, inside the test's transaction.
    """

    async def main():
        async with async_redis_client() as client:
            return await scenario(client)

    return async_to_sync(main)()


def make_api_key(*, key_limits: dict | None = None, **tenant_limits) -> ApiKey:
    """A key of a new tenant; the tenant's limits are GENEROUS except those given."""
    tenant = create_tenant(name=f"t-{uuid4().hex[:12]}", **{**GENEROUS, **tenant_limits})
    api_key, _ = create_api_key(tenant=tenant, **(key_limits or {}))
    return api_key


@dataclass
class Burst:
    """Outcomes of concurrent admissions, in the order of their (prompt, max_tokens) sizes."""

    sizes: list[tuple[int, int]]
    results: list[Admission | AdmissionRefused]

    @property
    def admitted(self) -> list[Admission]:
        return [r for r in self.results if isinstance(r, Admission)]

    @property
    def refused(self) -> list[AdmissionRefused]:
        return [r for r in self.results if isinstance(r, AdmissionRefused)]

    def tokens(self, *, admitted: bool) -> list[int]:
        """prompt + max_tokens of each admitted (or refused) request."""
        return [
            sum(size) for size, r in zip(self.sizes, self.results)
            if isinstance(r, Admission) == admitted
        ]


async def admit_many(
    redis_: Redis, api_key: ApiKey, key_prefix: str, sizes: list[tuple[int, int]]
) -> Burst:
    """Admit one request per (prompt_tokens, max_tokens) in `sizes`, all at once.

    Anything other than an admission or a refusal fails the test.
    """
    results = await asyncio.gather(
        *(
            admit(
                redis=redis_, api_key=api_key, request_id=f"req-{i}-{uuid4().hex}",
                prompt_tokens=prompt, max_tokens=completion, key_prefix=key_prefix,
            )
            for i, (prompt, completion) in enumerate(sizes)
        ),
        return_exceptions=True,
    )
    for result in results:
        if not isinstance(result, (Admission, AdmissionRefused)):
            raise result
    return Burst(sizes=sizes, results=results)


def burst_of(api_key: ApiKey, key_prefix: str, sizes: list[tuple[int, int]]):
    """A scenario for run(): admit_many with these arguments."""
    return lambda redis_: admit_many(redis_, api_key, key_prefix, sizes)
