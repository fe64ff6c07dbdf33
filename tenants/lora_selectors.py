"""Reads of tenants' LoRA adapters (HackSoft style: selectors read, services write).

The serving path asks the process cache (tenants.lora_cache: no query per call); staff pages and
commands read the table, and what the engine replicas say about each adapter from their heartbeats.
"""
from __future__ import annotations

from dataclasses import dataclass

from django.db.models import QuerySet

from engine.service.protocol import Heartbeat
from tenants.dashboard.selectors import engine_status
from tenants.lora_cache import OwnedAdapter, lora_adapter_cache
from tenants.models import ApiKey, LoRAAdapter, Tenant
from tenants.selectors import model_allowed


async def owned_lora_adapter(*, redis_client, api_key: ApiKey, name: str) -> OwnedAdapter | None:
    """The active adapter `name` when `api_key`'s tenant owns it and the key may call it, else None
    (another tenant's adapter is exactly as absent as a name nobody registered)."""
    adapter = (await lora_adapter_cache.adapters(redis_client=redis_client)).get(name)
    if adapter is None or adapter.tenant_id != api_key.tenant_id or not model_allowed(api_key=api_key, model=name):
        return None
    return adapter


async def callable_lora_adapters(*, redis_client, api_key: ApiKey) -> list[OwnedAdapter]:
    """The active adapters of `api_key`'s tenant that the key may call, by name."""
    adapters = (await lora_adapter_cache.adapters(redis_client=redis_client)).values()
    return sorted((a for a in adapters if a.tenant_id == api_key.tenant_id
                   and model_allowed(api_key=api_key, model=a.name)), key=lambda a: a.name)


def get_tenant_lora_adapters(*, tenant: Tenant) -> QuerySet[LoRAAdapter]:
    """All adapters of `tenant`, removed ones too (their names stay taken), active first."""
    return LoRAAdapter.objects.filter(tenant=tenant).order_by("disabled_at", "name")


def get_lora_adapter_by_name(*, name: str) -> LoRAAdapter | None:
    return LoRAAdapter.objects.select_related("tenant").filter(name=name).first()


@dataclass(frozen=True)
class AdapterLoadStatus:
    """What the live replicas of an adapter's base model say about it."""

    adapter: LoRAAdapter
    replicas: int  # live replicas of its base model
    loaded: int  # of which hold it
    errors: dict[str, str]  # replica id -> why it failed to load there

    @property
    def settled(self) -> bool:
        """Every live replica has loaded it or said why it could not."""
        return self.loaded + len(self.errors) >= self.replicas

    @property
    def summary(self) -> str:
        if not self.adapter.is_active:
            return "removed"
        if not self.replicas:
            return "no live replica of its base model"
        return f"loaded on {self.loaded} of {self.replicas} replicas"


def live_replicas_by_model() -> dict[str, list[Heartbeat]]:
    """The heartbeats of every live replica, by model ({} when Redis does not answer)."""
    return {engine.model: engine.replicas for engine in engine_status() or ()}


def adapter_load_status(*, adapters, replicas_by_model: dict[str, list[Heartbeat]]) -> list[AdapterLoadStatus]:
    """Each adapter with its load state on the live replicas of its base model (from their heartbeats)."""
    statuses = []
    for adapter in adapters:
        beats = replicas_by_model.get(adapter.base_model, []) if adapter.is_active else []
        statuses.append(AdapterLoadStatus(
            adapter, len(beats), sum(adapter.name in beat.lora_adapters for beat in beats),
            {beat.replica_id: beat.lora_errors[adapter.name] for beat in beats if adapter.name in beat.lora_errors}))
    return statuses
