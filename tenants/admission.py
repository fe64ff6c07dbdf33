"""Admission of one API request: rate limits, then the token quota; settled when it ends.

What a view does:

    admission = await admit(redis=redis, api_key=api_key, request_id=request_id,
                            prompt_tokens=prompt_tokens, max_tokens=max_tokens)
    try:
        ...  # run the request; send admission.headers with the response
    finally:
        await admission.settle(prompt_tokens=..., completion_tokens=...)

A refusal is AdmissionRefused, which carries everything for OpenAI's 429 response. Nothing
here touches the database except seeding a lost quota counter.
"""
import dataclasses
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from tenants.models import ApiKey, BudgetPeriod
from tenants.quota import QuotaExceeded, QuotaPeriod, reserve_quota, settle_quota
from tenants.ratelimit import (
    RateLimitDecision,
    RateLimitKeys,
    check_rate_limits,
    release_rate_limits,
)
from tenants.selectors import effective_limits

# The ApiKey field behind each limit the rate-limit script can name (sequences: the tenant's only).
_LIMIT_FIELDS = {
    "requests": "requests_per_minute",
    "tokens": "tokens_per_minute",
    "concurrency": "max_concurrent_requests",
    "sequences": "max_sequences_in_flight",
}


class AdmissionRefused(Exception):
    """A refused request, with what OpenAI's error body and headers need."""

    status = 429

    def __init__(self, *, code: str, type: str, message: str, headers: dict[str, str]):
        super().__init__(message)
        self.code, self.type, self.message, self.headers = code, type, message, headers


@dataclass
class Admission:
    """An admitted request: its x-ratelimit-* headers, and the holds that settle() gives back."""

    request_id: str
    headers: dict[str, str]
    redis: Redis = field(repr=False)
    rate_limit_keys: RateLimitKeys = field(repr=False)
    quota_period: QuotaPeriod = field(repr=False)
    settled: bool = field(default=False, repr=False)
    # Awaited once the holds are given back (the process's call registry forgets the call then).
    on_settle: Callable[[], Awaitable] | None = field(default=None, repr=False)

    async def settle(self, *, prompt_tokens: int, completion_tokens: int) -> None:
        """Idempotent: releases the concurrency slot, settles TPM and quota to the real counts."""
        if self.settled:
            return
        self.settled = True  # before any await, so a concurrent second call is a no-op
        actual = prompt_tokens + completion_tokens
        await release_rate_limits(
            redis=self.redis, keys=self.rate_limit_keys, request_id=self.request_id,
            actual_tokens=actual,
        )
        await settle_quota(
            redis=self.redis, period=self.quota_period, request_id=self.request_id,
            actual_tokens=actual,
        )
        if self.on_settle is not None:
            await self.on_settle()


async def admit(
    *,
    redis: Redis,
    api_key: ApiKey,
    request_id: str,
    prompt_tokens: int,
    max_tokens: int,
    sequences: int = 1,
    key_prefix: str = "llm",
) -> Admission:
    """Rate limits first (one Lua call), then the quota (one Lua call).

    `sequences` is what the call makes the engine run (n x prompts); it is held until settled.

    A quota refusal gives back the rate-limit hold. Tenants without a budget skip the quota.
    """
    limits = effective_limits(api_key=api_key)
    keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
    tokens = prompt_tokens + max_tokens
    decision = await check_rate_limits(
        redis=redis, keys=keys, limits=limits, request_id=request_id, tokens=tokens,
        sequences=sequences,
    )
    if not decision.admitted:
        raise _rate_limited(decision, api_key=api_key)
    period = QuotaPeriod.current(tenant=api_key.tenant, key_prefix=key_prefix)
    if limits.token_budget is not None:
        try:
            await reserve_quota(
                redis=redis, period=period, budget=limits.token_budget,
                request_id=request_id, amount=tokens,
            )
        except BaseException as exc:  # refused, or failed: either way the request never runs
            await release_rate_limits(
                redis=redis, keys=keys, request_id=request_id, actual_tokens=0, refund=True
            )
            if isinstance(exc, QuotaExceeded):
                given_back = dataclasses.replace(
                    decision,
                    requests_used=decision.requests_used - 1,
                    tokens_used=decision.tokens_used - tokens,
                )
                raise _out_of_quota(exc, headers=given_back.headers()) from None
            raise
    return Admission(
        request_id=request_id, headers=decision.headers(), redis=redis,
        rate_limit_keys=keys, quota_period=period,
    )


async def release_abandoned(*, redis: Redis, api_key: ApiKey, request_id: str, key_prefix: str = "llm") -> None:
    """Give back the holds of an admitted request whose process died before settling it (its
    concurrency slot and quota hold would otherwise last until their leases expire). It counts as
    no tokens: whoever resumes the work runs the request again and is charged for that."""
    keys = RateLimitKeys.for_api_key(api_key=api_key, key_prefix=key_prefix)
    if await redis.zscore(keys.leases, request_id) is None:
        return  # settled after all (or its lease lapsed): settling again would undo its counts
    await release_rate_limits(redis=redis, keys=keys, request_id=request_id, actual_tokens=0)
    period = QuotaPeriod.current(tenant=api_key.tenant, key_prefix=key_prefix)
    await settle_quota(redis=redis, period=period, request_id=request_id, actual_tokens=0)


def _rate_limited(decision: RateLimitDecision, *, api_key: ApiKey) -> AdmissionRefused:
    limits, retry = decision.limits, decision.retry_after
    key_owned = getattr(api_key, _LIMIT_FIELDS[decision.refused_limit], None) is not None
    subject = f"API key {api_key.prefix}" if key_owned else f"tenant {api_key.tenant.name!r}"
    if decision.refused_limit == "sequences":
        message = (
            f"Too many sequences in flight for {subject}: Limit {limits.max_sequences_in_flight} "
            f"(max_sequences_in_flight), Running {decision.sequences_in_flight}, Requested "
            f"{decision.sequences} (n x prompts). Please try again in {retry}s."
        )
    elif decision.refused_limit == "concurrency":
        message = (
            f"Too many concurrent requests for {subject}: Limit {limits.max_concurrent_requests}, "
            f"Running {decision.running}. Please try again in {retry}s."
        )
    elif decision.refused_limit == "tokens" and decision.tokens > limits.tokens_per_minute:
        message = (
            f"Request too large for {subject} on tokens per min (TPM): "
            f"Limit {limits.tokens_per_minute}, Requested {decision.tokens}. "
            "Reduce the prompt or max_tokens."
        )
    elif decision.refused_limit == "tokens":
        message = (
            f"Rate limit reached for {subject} on tokens per min (TPM): "
            f"Limit {limits.tokens_per_minute}, Used {decision.tokens_used}, "
            f"Requested {decision.tokens}. Please try again in {retry}s."
        )
    else:
        message = (
            f"Rate limit reached for {subject} on requests per min (RPM): "
            f"Limit {limits.requests_per_minute}, Used {decision.requests_used}, Requested 1. "
            f"Please try again in {retry}s."
        )
    return AdmissionRefused(
        code="rate_limit_exceeded",
        type="tokens" if decision.refused_limit == "tokens" else "requests",
        message=message,
        headers={**_retry_headers(decision), **decision.headers()},
    )


def _retry_headers(decision: RateLimitDecision) -> dict[str, str]:
    """A request larger than the limit itself can never be admitted: no Retry-After, and
    `x-should-retry: false` (which the openai SDK honours), so clients and batch runners stop."""
    limits = decision.limits
    if (decision.refused_limit == "tokens" and decision.tokens > limits.tokens_per_minute
            or decision.refused_limit == "sequences" and decision.sequences > limits.max_sequences_in_flight):
        return {"x-should-retry": "false"}
    return {"Retry-After": str(decision.retry_after)}


def _out_of_quota(exc: QuotaExceeded, *, headers: dict[str, str]) -> AdmissionRefused:
    period = exc.period
    cadence = "daily" if period.tenant.budget_period == BudgetPeriod.DAY else "monthly"
    message = (
        f"You exceeded your current quota: tenant {period.tenant.name!r} has used {exc.used} "
        f"of its {cadence} budget of {exc.budget} tokens ({exc.reserved} more are reserved by "
        f"requests in flight) and this request needs up to {exc.amount} (prompt + max_tokens). "
        f"The budget renews at {period.end:%Y-%m-%dT%H:%M:%SZ}."
    )
    return AdmissionRefused(
        code="insufficient_quota", type="insufficient_quota", message=message, headers=headers
    )
