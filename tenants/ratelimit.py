"""Exact rate limits in Redis: requests and tokens per minute, concurrent requests, sequences in flight.

Each per-minute limit is a sliding log (a sorted set of admission times), so in any window no
more than the limit is admitted; concurrency slots and sequence holds (n x prompts of a call,
what the engine actually queues) are leases that lapse if a web worker dies before settling.
One Lua script checks and takes all four at once (tenants/lua).

A limit's counters belong to the tenant when the tenant sets it and to the key when the key
overrides it: a tenant's ten keys share one tenant limit instead of getting ten of them.
Sequences in flight are always the tenant's: they exist to keep one tenant from flooding the engine.
"""
import math
from dataclasses import dataclass

from redis.asyncio import Redis

from tenants.limits import EffectiveLimits
from tenants.lua import LuaScript
from tenants.models import ApiKey

WINDOW_MS = 60_000
LEASE_MS = 15 * 60_000  # longer than any request should run; only matters after a crash

_admit_script = LuaScript("ratelimit_admit", preludes=("ratelimit_window",))
_release_script = LuaScript("ratelimit_release")


@dataclass(frozen=True)
class RateLimitKeys:
    """The Redis keys of one API key's limits, each scoped to the key or to its tenant."""

    requests: str
    tokens_log: str
    token_counts: str
    token_total: str
    leases: str
    sequence_leases: str
    sequence_counts: str

    @classmethod
    def for_api_key(cls, *, api_key: ApiKey, key_prefix: str) -> "RateLimitKeys":
        # The {t<id>} hash tag keeps one tenant's keys in one Redis Cluster slot.
        base = f"{key_prefix}:ratelimit:{{t{api_key.tenant_id}}}"

        def scope(field: str) -> str:
            owner = "tenant" if getattr(api_key, field) is None else f"key{api_key.pk}"
            return f"{base}:{owner}"

        tokens = scope("tokens_per_minute")
        return cls(
            requests=f"{scope('requests_per_minute')}:requests",
            tokens_log=f"{tokens}:tokens",
            token_counts=f"{tokens}:token-counts",
            token_total=f"{tokens}:token-total",
            leases=f"{scope('max_concurrent_requests')}:leases",
            sequence_leases=f"{base}:tenant:sequences",
            sequence_counts=f"{base}:tenant:sequence-counts",
        )

    def as_list(self) -> list[str]:
        """In the order the Lua scripts number them."""
        return [self.requests, self.tokens_log, self.token_counts, self.token_total, self.leases,
                self.sequence_leases, self.sequence_counts]


@dataclass(frozen=True)
class RateLimitDecision:
    """What the admit script saw; `*_used` include this request when it was admitted."""

    admitted: bool
    refused_limit: str  # "requests", "tokens", "concurrency", "sequences" or "" when admitted
    wait_ms: int  # until the refused limit would take this request
    limits: EffectiveLimits
    tokens: int  # what this request asked for
    requests_used: int
    requests_reset_ms: int
    tokens_used: int
    tokens_reset_ms: int
    running: int
    sequences: int = 1  # what this request asked for: n x prompts
    sequences_in_flight: int = 0

    @property
    def retry_after(self) -> int:
        """Whole seconds, at least 1, as the Retry-After header wants."""
        return max(1, math.ceil(self.wait_ms / 1000))

    def headers(self) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers."""
        rpm, tpm = self.limits.requests_per_minute, self.limits.tokens_per_minute
        return {
            "x-ratelimit-limit-requests": str(rpm),
            "x-ratelimit-remaining-requests": str(max(0, rpm - self.requests_used)),
            "x-ratelimit-reset-requests": format_duration(self.requests_reset_ms),
            "x-ratelimit-limit-tokens": str(tpm),
            "x-ratelimit-remaining-tokens": str(max(0, tpm - self.tokens_used)),
            "x-ratelimit-reset-tokens": format_duration(self.tokens_reset_ms),
        }


def format_duration(ms: int) -> str:
    """OpenAI's reset format, which is Go's Duration: "120ms", "1s", "1.5s", "6m0s", "1h0m0s"."""
    if ms <= 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    if hours:
        return f"{hours}h{minutes}m{seconds}"
    return f"{minutes}m{seconds}" if minutes else seconds


async def check_rate_limits(
    *,
    redis: Redis,
    keys: RateLimitKeys,
    limits: EffectiveLimits,
    request_id: str,
    tokens: int,
    sequences: int = 1,
    window_ms: int = WINDOW_MS,
    lease_ms: int = LEASE_MS,
) -> RateLimitDecision:
    """Admit `request_id`, holding `tokens`, a concurrency lease and `sequences`, or say which limit refuses."""
    reply = await _admit_script(
        redis,
        keys=keys.as_list(),
        args=[
            request_id, tokens, limits.requests_per_minute, limits.tokens_per_minute,
            limits.max_concurrent_requests, window_ms, lease_ms, sequences, limits.max_sequences_in_flight,
        ],
    )
    admitted, refused, wait, requests, requests_reset, used, tokens_reset, running, in_flight = reply
    return RateLimitDecision(
        admitted=bool(admitted),
        refused_limit=refused.decode() if isinstance(refused, bytes) else refused,
        wait_ms=wait,
        limits=limits,
        tokens=tokens,
        requests_used=requests,
        requests_reset_ms=requests_reset,
        tokens_used=used,
        tokens_reset_ms=tokens_reset,
        running=running,
        sequences=sequences,
        sequences_in_flight=in_flight,
    )


async def release_rate_limits(
    *, redis: Redis, keys: RateLimitKeys, request_id: str, actual_tokens: int, refund: bool = False
) -> None:
    """Free the lease and the sequences, set the token entry to `actual_tokens`; `refund` un-admits the request."""
    await _release_script(
        redis, keys=keys.as_list(), args=[request_id, actual_tokens, int(refund)]
    )
