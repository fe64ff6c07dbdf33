"""Writes of tenants' LoRA adapters: register one for a tenant, remove it.

Each writes its row and audit entry and sends the engine replicas their load or unload message (the
adapter hash of engine.service.lora_control, which every replica of the base model follows) in one
transaction: if Redis refuses, nothing is saved. An adapter is checked before anything is written
(engine.lora.peft_config reads its folder without torch), so a bad one is a LoRAAdapterRefused here,
with the reason, instead of a load error on every replica later.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import redis
from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction
from django.utils import timezone

from engine.lora.peft_config import LoRAAdapterError, PeftAdapterConfig, read_peft_adapter
from engine.service.lora_control import register_adapter, unregister_adapter
from engine.service.transport import Keys
from tenants.audit import Actor, created, record_audit
from tenants.errors import LoRAAdapterRefused
from tenants.lora_selectors import live_replicas_by_model
from tenants.models import LoRAAdapter, Tenant, validate_model_name

AUDITED_FIELDS = ("name", "base_model", "path", "rank", "alpha")


def check_lora_adapter(*, name: str, base_model: str, path: str) -> PeftAdapterConfig:
    """The adapter's PEFT config when `name` may be registered on `base_model` from `path`, else
    LoRAAdapterRefused: a bad or taken name, a base model no replica ever served, a missing or
    malformed folder, or a rank above what the base model's live replicas load."""
    try:
        validate_model_name(name)
    except ValidationError as error:
        raise LoRAAdapterRefused(f"adapter name {name!r}: {' '.join(error.messages)}") from None
    if len(name) > LoRAAdapter._meta.get_field("name").max_length:
        raise LoRAAdapterRefused(f"adapter name {name!r} is longer than 200 characters")
    if LoRAAdapter.objects.filter(name=name).exists():
        raise LoRAAdapterRefused(f"the name {name!r} is taken by another LoRA adapter")
    with _redis() as client:
        keys = Keys(settings.ENGINE_KEY_PREFIX)
        if client.exists(keys.model_card(name)):
            raise LoRAAdapterRefused(f"the name {name!r} is a base model's; calls could not tell them apart")
        if not client.exists(keys.model_card(base_model)):
            raise LoRAAdapterRefused(f"no engine replica has served the base model {base_model!r}")
    try:
        config = read_peft_adapter(path)
    except LoRAAdapterError as error:
        raise LoRAAdapterRefused(str(error)) from None
    _check_rank(config, base_model)
    return config


def _check_rank(config: PeftAdapterConfig, base_model: str) -> None:
    """Against the live replicas of `base_model` (with none live, each replica checks as it loads)."""
    replicas = live_replicas_by_model().get(base_model, [])
    if not replicas:
        return
    max_rank = min(beat.max_lora_rank for beat in replicas)
    if max_rank == 0:
        raise LoRAAdapterRefused(f"replicas of {base_model!r} run without LoRA (engine serve --enable-lora)")
    if config.rank > max_rank:
        raise LoRAAdapterRefused(f"the adapter at {str(config.path)!r} has rank {config.rank}, but the replicas of "
                                 f"{base_model!r} load ranks up to {max_rank} (--max-lora-rank)")


def register_lora_adapter(*, tenant: Tenant, name: str, base_model: str, path: str,
                          actor: Actor = None) -> LoRAAdapter:
    """Check the adapter, save it for `tenant` and have the base model's replicas load it; only
    `tenant`'s keys can call it, as `model=name`. The path is stored absolute (replicas have other cwds)."""
    path = os.path.abspath(path)
    config = check_lora_adapter(name=name, base_model=base_model, path=path)
    adapter = LoRAAdapter(tenant=tenant, name=name, base_model=base_model, path=path, rank=config.rank,
                          alpha=config.lora_alpha)
    try:
        adapter.full_clean()  # lengths the database enforces (a path over 1,000 characters, say)
    except ValidationError as error:
        raise LoRAAdapterRefused("; ".join(f"{field}: {' '.join(messages)}"
                                           for field, messages in error.message_dict.items())) from None
    try:
        with transaction.atomic():
            adapter.save()
            record_audit(actor=actor, action="lora_adapter.register", target=adapter,
                         changes=created(adapter, AUDITED_FIELDS))
            with _redis() as client:
                register_adapter(client, base_model, name, path, key_prefix=settings.ENGINE_KEY_PREFIX)
    except IntegrityError as error:  # a concurrent registration won the name
        raise LoRAAdapterRefused(f"the name {name!r} is taken by another LoRA adapter") from error
    return adapter


@transaction.atomic
def remove_lora_adapter(*, adapter: LoRAAdapter, actor: Actor = None) -> LoRAAdapter:
    """Stop serving `adapter` (replicas unload it once no running request uses it); its name stays
    taken, since usage rows name it. Removing twice keeps the first time and logs only the first."""
    if adapter.disabled_at is not None:
        return adapter
    adapter.disabled_at = timezone.now()
    adapter.save(update_fields=["disabled_at"])
    record_audit(actor=actor, action="lora_adapter.remove", target=adapter,
                 changes={"disabled_at": [None, adapter.disabled_at]})
    with _redis() as client:
        unregister_adapter(client, adapter.base_model, adapter.name, key_prefix=settings.ENGINE_KEY_PREFIX)
    return adapter


@contextmanager
def _redis():
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2, socket_timeout=5)
    try:
        yield client
    finally:
        client.close()
