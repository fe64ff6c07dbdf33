"""Reads about the world around the web process (HackSoft style: selectors read, services write)."""
import redis
from django.conf import settings


def redis_is_reachable(*, url: str | None = None, timeout_s: float = 0.5) -> bool:
    """Whether Redis answers PING within `timeout_s`.

    The timeout is short because a health check must answer fast even when
    Redis is down; the default URL is settings.REDIS_URL.
    """
    client = redis.Redis.from_url(
        url or settings.REDIS_URL, socket_connect_timeout=timeout_s, socket_timeout=timeout_s
    )
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()
