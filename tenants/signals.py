"""Cached API keys die when a key or tenant changes, and cached adapter ownership when an adapter
changes, however it changed (services, admin, dashboard, shell)."""
import logging
from collections.abc import Callable

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from redis.exceptions import RedisError

from tenants.key_cache import invalidate_api_keys
from tenants.lora_cache import invalidate_lora_adapters
from tenants.models import ApiKey, LoRAAdapter, Tenant

logger = logging.getLogger(__name__)


@receiver([post_save, post_delete], sender=ApiKey)
@receiver([post_save, post_delete], sender=Tenant)
def drop_cached_api_keys(*, created: bool = False, **kwargs) -> None:
    """Invalidate now, for this transaction's own reads, and again at commit: a process that
    reloaded a key in between read the row as it was before the change. A new row is in no cache."""
    if created:
        return
    _invalidate_now_and_at_commit(invalidate_api_keys, "API keys")


@receiver([post_save, post_delete], sender=LoRAAdapter)
def drop_cached_lora_adapters(**kwargs) -> None:
    """As for keys, but a new adapter counts too: the cache holds the whole table, so it must learn of it."""
    _invalidate_now_and_at_commit(invalidate_lora_adapters, "LoRA adapters")


def _invalidate_now_and_at_commit(invalidate: Callable[[], None], what: str) -> None:
    def run() -> None:
        try:
            invalidate()
        except (RedisError, OSError) as error:  # the change stands; caches catch up within API_KEY_CACHE_S
            logger.warning("could not invalidate cached %s: %s", what, error)

    run()
    transaction.on_commit(run)
