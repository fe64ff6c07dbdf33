"""Cached API keys die when a key or tenant changes, however it changed (services, admin, dashboard, shell)."""
import logging

from django.db import transaction
from django.db.models.signals import post_delete, post_save
from django.dispatch import receiver
from redis.exceptions import RedisError

from tenants.key_cache import invalidate_api_keys
from tenants.models import ApiKey, Tenant

logger = logging.getLogger(__name__)


@receiver([post_save, post_delete], sender=ApiKey)
@receiver([post_save, post_delete], sender=Tenant)
def drop_cached_api_keys(*, created: bool = False, **kwargs) -> None:
    """Invalidate now, for this transaction's own reads, and again at commit: a process that
    reloaded a key in between read the row as it was before the change. A new row is in no cache."""
    if created:
        return
    _invalidate()
    transaction.on_commit(_invalidate)


def _invalidate() -> None:
    try:
        invalidate_api_keys()
    except RedisError as error:  # the change stands; caches catch up within API_KEY_CACHE_S
        logger.warning("could not invalidate cached API keys: %s", error)
