"""Which LoRA adapters a model's replicas serve, kept in Redis (no torch: Django imports this).

`{prefix}:loras:{model}` is a hash: adapter name -> JSON `{"path": str, "int_id": int}`. Staff
register an adapter there; each replica reads the hash with its heartbeat, loads what is new, drops
what is gone, and says in its heartbeat which ones it holds (`lora_adapters`) and which failed
(`lora_errors`). The int id (the engine's `LoRARequest.lora_int_id`, which keys the prefix cache) comes
from the counter `{prefix}:lora-ids:{model}` and stays with the name and path for as long as they are
registered, so every replica agrees on it; a name pointed at a new path gets a new id (its weights,
and so its prefix-cache entries, are new).
"""

from __future__ import annotations

import json

from engine.service.transport import DEFAULT_PREFIX, Keys


def register_adapter(client, model: str, name: str, path: str, *, key_prefix: str = DEFAULT_PREFIX) -> int:
    """Register (or re-point) adapter `name` of `model` at `path`; returns its int id (kept when the
    name is already registered at this path, a new one from the counter otherwise)."""
    if not name or not isinstance(name, str):
        raise ValueError("an adapter needs a non-empty name")
    if not path or not isinstance(path, str):
        raise ValueError(f"adapter {name!r} needs a path")
    keys = Keys(key_prefix)
    existing = _entry(client.hget(keys.loras(model), name))
    if existing is not None and existing[0] == path:
        return existing[1]
    int_id = int(client.hincrby(keys.lora_ids(model), "next", 1))
    client.hset(keys.loras(model), name, json.dumps({"path": path, "int_id": int_id}))
    return int_id


def unregister_adapter(client, model: str, name: str, *, key_prefix: str = DEFAULT_PREFIX) -> bool:
    """Remove adapter `name`; True when it was registered. Replicas drop it once no running request uses it."""
    return bool(client.hdel(Keys(key_prefix).loras(model), name))


def registered_adapters(client, model: str, *, key_prefix: str = DEFAULT_PREFIX) -> dict[str, tuple[str, int]]:
    """Adapter name -> (path, int id) for `model`; entries that do not parse are left out."""
    adapters = {}
    for raw_name, raw_entry in client.hgetall(Keys(key_prefix).loras(model)).items():
        entry = _entry(raw_entry)
        if entry is not None:
            adapters[raw_name.decode() if isinstance(raw_name, bytes) else raw_name] = entry
    return adapters


def _entry(raw) -> tuple[str, int] | None:
    if raw is None:
        return None
    try:
        entry = json.loads(raw)
        path, int_id = entry["path"], entry["int_id"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(path, str) or not isinstance(int_id, int) or isinstance(int_id, bool) or int_id < 1:
        return None
    return path, int_id
