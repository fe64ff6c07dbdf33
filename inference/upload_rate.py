"""Uploads per tenant per hour (FILES_MAX_UPLOADS_PER_HOUR): an exact sliding log in Redis, one
Lua call, so a tenant cannot fill the database with a stream of uploads (deleting as it goes)."""
from __future__ import annotations

import math

from django.conf import settings
from redis.asyncio import Redis

from inference.errors import OpenAIError

WINDOW_MS = 3_600_000

# KEYS[1] log (zset upload id -> ms); ARGV: upload id, limit, window ms. {1, 0} admitted, else {0, wait ms}.
_TAKE = """
local clock = redis.call('TIME')
local now = clock[1] * 1000 + math.floor(clock[2] / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  return {0, #oldest == 0 and tonumber(ARGV[3]) or tonumber(oldest[2]) + tonumber(ARGV[3]) - now}
end
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {1, 0}
"""


async def take_upload(*, redis: Redis, tenant, upload_id: str) -> None:
    """Count one upload of `tenant`, or a 429 (with Retry-After) when its hour is full."""
    limit = settings.FILES_MAX_UPLOADS_PER_HOUR
    key = f"{settings.ENGINE_KEY_PREFIX}:file-uploads:{{t{tenant.pk}}}"
    admitted, wait_ms = await redis.eval(_TAKE, 1, key, upload_id, limit, WINDOW_MS)
    if not admitted:
        retry = max(1, math.ceil(wait_ms / 1000))
        raise OpenAIError(f"Tenant {tenant.name!r} uploaded {limit} files in the last hour, its limit. Please try "
                          f"again in {retry}s.", status=429, type="requests", code="rate_limit_exceeded",
                          headers={"Retry-After": str(retry)})
