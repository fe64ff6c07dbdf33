"""Reads about the world around the web process (HackSoft style: selectors read, services write)."""
import redis
from django.conf import settings
from redis.exceptions import RedisError

from engine.service.client import EngineClient
from engine.service.protocol import Heartbeat
from tenants.lora_cache import OwnedAdapter
from tenants.lora_selectors import callable_lora_adapters
from tenants.models import ApiKey
from tenants.selectors import model_allowed


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


async def live_replicas(*, client: EngineClient) -> dict[str, list[Heartbeat]]:
    """Every model that has a card or a live replica, with its live replicas (maybe none)."""
    try:
        replicas = await client.models()
        for model in await client.known_models():
            replicas.setdefault(model, [])
    except (RedisError, OSError):
        return {}
    return replicas


async def served_models(*, client: EngineClient, api_key: ApiKey) -> dict[str, list[Heartbeat]]:
    """Models with at least one live replica that `api_key` may call."""
    return {model: beats for model, beats in (await client.models()).items()
            if model_allowed(api_key=api_key, model=model)}


async def served_lora_adapters(*, client: EngineClient, api_key: ApiKey) -> list[tuple[OwnedAdapter, list[Heartbeat]]]:
    """The adapters of `api_key`'s tenant that it may call and whose base model has a live replica,
    each with those replicas (never another tenant's adapters)."""
    models = await client.models()
    return [(adapter, models[adapter.base_model])
            for adapter in await callable_lora_adapters(redis_client=client.redis, api_key=api_key)
            if models.get(adapter.base_model)]
