"""What the LoRA adapter tests of the web side share: adapter folders in PEFT's format, written by hand
(numpy, no torch: as `peft` saves them), and a base model as its replicas publish it in Redis."""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import redis
from django.conf import settings
from safetensors.numpy import save_file

from engine.service.protocol import Heartbeat, ModelCard, encode
from engine.service.transport import Keys

BASE_MODEL = "acme/base-model"


def write_adapter(folder: Path, *, rank: int = 4, alpha: float = 8, hidden: int = 32, layers: int = 2,
                  config: dict | None = None) -> Path:
    """A LoRA adapter on q_proj and v_proj of `layers` layers; `config` entries override adapter_config.json's."""
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer in range(layers):
        for module in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = np.full((rank, hidden), 0.01, dtype=np.float32)
            tensors[f"{key}.lora_B.weight"] = np.full((hidden, rank), 0.02, dtype=np.float32)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    adapter_config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": ["q_proj", "v_proj"],
                      "bias": "none", "base_model_name_or_path": BASE_MODEL, **(config or {})}
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config))
    return folder


def sync_redis() -> redis.Redis:
    client = redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {settings.REDIS_URL}")
    return client


@contextmanager
def published_model(model: str = BASE_MODEL, *, replicas_max_lora_rank: list[int] = (16,)):
    """`model`'s card (a replica served it) and one live heartbeat per entry of `replicas_max_lora_rank`
    (an empty list: no live replica); its registered adapters are dropped afterwards."""
    client, keys = sync_redis(), Keys(settings.ENGINE_KEY_PREFIX)
    beats = [keys.heartbeat(model, f"replica-{n}") for n in range(len(replicas_max_lora_rank))]
    client.set(keys.model_card(model), encode(ModelCard(model, 2048)), ex=300)
    for n, (key, max_rank) in enumerate(zip(beats, replicas_max_lora_rank)):
        client.set(key, encode(Heartbeat(f"replica-{n}", model, max_lora_rank=max_rank, max_model_len=2048)), ex=300)
    try:
        yield keys
    finally:
        client.delete(keys.model_card(model), keys.loras(model), keys.lora_ids(model), *beats)
        client.close()
