"""Token quotas: reserve `prompt + max_tokens` before a request runs, settle to the real count.

Per tenant and budget period (a UTC day or month), Redis keeps the tokens used and the holds
of requests in flight; one Lua script checks and reserves, so concurrent requests can never
overspend. Holds expire (a dead holder gives its tokens back). If Redis lost the period's
counter, it is seeded from the database: the sum of the period's usage events.
"""
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from asgiref.sync import sync_to_async
from redis.asyncio import Redis

from tenants.db_connection import release_connection_after
from tenants.lua import LuaScript
from tenants.models import BudgetPeriod, Tenant
from tenants.selectors import tokens_used_in_period

HOLD_MS = 15 * 60_000  # as the rate limiter's lease: longer than any request should run

_reserve_script = LuaScript("quota_reserve")
_settle_script = LuaScript("quota_settle")


class QuotaExceeded(Exception):
    """The reservation would take the tenant past its budget for the period."""

    def __init__(
        self, *, period: "QuotaPeriod", budget: int, used: int, reserved: int, amount: int
    ):
        super().__init__(
            f"token budget exceeded: {used} used + {reserved} reserved + {amount} > {budget}"
        )
        self.period, self.budget = period, budget
        self.used, self.reserved, self.amount = used, reserved, amount


def period_bounds(*, budget_period: str, now: datetime) -> tuple[datetime, datetime]:
    """Start and end (UTC) of the day or month that contains `now`."""
    day = now.astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    if budget_period == BudgetPeriod.DAY:
        return day, day + timedelta(days=1)
    start = day.replace(day=1)
    end = (start + timedelta(days=32)).replace(day=1)
    return start, end


@dataclass(frozen=True)
class QuotaPeriod:
    """One tenant's budget period and its Redis keys."""

    tenant: Tenant
    start: datetime
    end: datetime
    used: str
    holds: str
    amounts: str

    @classmethod
    def current(
        cls, *, tenant: Tenant, key_prefix: str, now: datetime | None = None
    ) -> "QuotaPeriod":
        start, end = period_bounds(
            budget_period=tenant.budget_period, now=now or datetime.now(UTC)
        )
        base = f"{key_prefix}:quota:{{t{tenant.pk}}}:{tenant.budget_period}-{start:%Y-%m-%d}"
        return cls(
            tenant=tenant, start=start, end=end,
            used=f"{base}:used", holds=f"{base}:holds", amounts=f"{base}:amounts",
        )

    def keys(self) -> list[str]:
        return [self.used, self.holds, self.amounts]


async def reserve_quota(
    *, redis: Redis, period: QuotaPeriod, budget: int, request_id: str, amount: int,
    hold_ms: int = HOLD_MS,
) -> None:
    """Hold `amount` tokens of the period for `request_id`, or raise QuotaExceeded."""
    # The used counter outlives its period by a day, for requests that settle late.
    expire_at_ms = int((period.end + timedelta(days=1)).timestamp() * 1000)

    async def run(*, seed: int | str) -> list[int]:
        return await _reserve_script(
            redis, keys=period.keys(),
            args=[request_id, amount, budget, hold_ms, seed, expire_at_ms],
        )

    reply = await run(seed="")
    if reply[0] == -1:  # no counter (new period, or Redis lost it): seed it from the database
        # The counter is the truth while it exists; it is missing only at a period's first call
        # or after Redis lost its data. The database lags by the usage events still buffered
        # (tenants.usage_buffer, about USAGE_FLUSH_MS), which a seed misses: a fraction of a
        # second of usage, once a period (after a Redis loss they are lost with it anyway).
        recorded = await sync_to_async(release_connection_after(tokens_used_in_period))(
            tenant=period.tenant, period_start=period.start
        )
        reply = await run(seed=recorded)
    admitted, used, reserved = reply
    if not admitted:
        raise QuotaExceeded(
            period=period, budget=budget, used=used, reserved=reserved, amount=amount
        )


async def settle_quota(
    *, redis: Redis, period: QuotaPeriod, request_id: str, actual_tokens: int
) -> None:
    """Drop the hold of `request_id` (if any) and count the tokens it really used."""
    await _settle_script(redis, keys=period.keys(), args=[request_id, actual_tokens])
