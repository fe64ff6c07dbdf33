"""At most N holders of one thing across every process (a Redis semaphore of leases).

Used for a tenant's running batches (so two big batches of one tenant cannot hold every Celery
worker) and a tenant's open websockets. A holder is a sorted-set member scored by its lease's
expiry: one that dies without releasing frees its place within its lease; live holders renew.
"""
from __future__ import annotations

import time

from redis.asyncio import Redis

# KEYS[1] holders (zset member -> expiry ms); ARGV: member, cap, now ms, lease ms. 1 when held.
_ACQUIRE = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
if redis.call('ZSCORE', KEYS[1], ARGV[1]) or redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[1], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
  return 1
end
return 0
"""


class LeaseSemaphore:
    """`member`'s claim on one of `cap` places under `key`."""

    def __init__(self, redis: Redis, *, key: str, member: str, cap: int, lease_s: float) -> None:
        self.redis, self.key, self.member, self.cap = redis, key, member, cap
        self.lease_ms = int(lease_s * 1000)

    async def acquire(self) -> bool:
        """Take (or renew) the place; False when `cap` others hold every place."""
        held = await self.redis.eval(_ACQUIRE, 1, self.key, self.member, self.cap, int(time.time() * 1000),
                                     self.lease_ms)
        return bool(held)

    async def release(self) -> None:
        await self.redis.zrem(self.key, self.member)
