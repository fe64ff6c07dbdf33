"""The Lua scripts of the tenants app: each check or settle is one atomic script run in Redis."""
import hashlib
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import NoScriptError


class LuaScript:
    """A script from this folder, run by its sha and loaded into Redis on the first miss. Redis
    scripts cannot import, so shared functions come as `preludes`, files put before the script."""

    def __init__(self, name: str, *, preludes: tuple[str, ...] = ()):
        folder = Path(__file__).parent
        self.source = "".join((folder / f"{part}.lua").read_text() for part in (*preludes, name))
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    async def __call__(self, redis: Redis, *, keys: list[str], args: list) -> list:
        try:
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a fresh or restarted Redis
            await redis.script_load(self.source)
            return await redis.evalsha(self.sha, len(keys), *keys, *args)
