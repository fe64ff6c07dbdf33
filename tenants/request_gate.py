"""The cheap rate-limit steps around a call's heavy work (tokenizing, template rendering).

`refuse_early` turns a tenant away before that work when one more request cannot fit (one Lua call,
no writes but pruning); admission itself (tenants.admission) still decides exactly, later. A call
refused after authentication for any reason (bad prompt, too long, over quota, ...) is counted
against requests per minute by `count_refused`, as OpenAI counts it, so refused calls are not free.
"""
from __future__ import annotations

from redis.asyncio import Redis

from tenants.admission import _rate_limited
from tenants.lua import LuaScript
from tenants.models import ApiKey
from tenants.ratelimit import WINDOW_MS, RateLimitDecision, RateLimitKeys
from tenants.selectors import effective_limits

_peek_script = LuaScript("ratelimit_peek", preludes=("ratelimit_window",))
_count_refused_script = LuaScript("ratelimit_count_refused")


async def refuse_early(*, redis: Redis, api_key: ApiKey, key_prefix: str) -> None:
    """AdmissionRefused (429, as admission words it) when a request of one token could not be admitted now."""
    limits = effective_limits(api_key=api_key)
    keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
    reply = await _peek_script(redis, keys=keys.as_list(), args=[
        limits.requests_per_minute, limits.tokens_per_minute, limits.max_concurrent_requests, WINDOW_MS])
    admitted, refused, wait, requests, requests_reset, used, tokens_reset, running = reply
    if admitted:
        return
    decision = RateLimitDecision(
        admitted=False, refused_limit=refused.decode() if isinstance(refused, bytes) else refused, wait_ms=wait,
        limits=limits, tokens=1, requests_used=requests, requests_reset_ms=requests_reset, tokens_used=used,
        tokens_reset_ms=tokens_reset, running=running)
    raise _rate_limited(decision, api_key=api_key)


async def count_refused(*, redis: Redis, api_key: ApiKey, request_id: str, key_prefix: str) -> None:
    limits = effective_limits(api_key=api_key)
    keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
    await _count_refused_script(redis, keys=[keys.requests], args=[request_id, limits.requests_per_minute, WINDOW_MS])

