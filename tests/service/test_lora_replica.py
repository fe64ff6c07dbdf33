"""A replica serving LoRA adapters by name (protocol 5): adapters given with `--lora-modules` at start
and registered in Redis while it runs (engine/service/lora_control.py) are loaded, advertised in
the heartbeat and served with the tokens the offline engine gives; unknown or removed names get
the `lora_not_found` error delta; an adapter that cannot load is reported with the reason."""

from __future__ import annotations

import asyncio
import json

import pytest
import torch
from safetensors.torch import save_file

from engine import LLM, SamplingParams
from engine.lora.request import LoRARequest
from engine.service.lora_control import register_adapter, unregister_adapter
from tests.service.conftest import MODEL

PROMPT = "The capital of France is"
# The bundled SmolLM2-135M: 30 layers, hidden 576, 9 query heads and 3 KV heads of 64.
LAYERS, HIDDEN, KV_SIZE, RANK = 30, 576, 192, 8


def write_adapter(folder, seed: int):
    """A random rank-8 PEFT adapter on q_proj and v_proj of every layer, strong enough to change
    greedy tokens."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(LAYERS):
        for module, rows in (("q_proj", HIDDEN), ("v_proj", KV_SIZE)):
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(RANK, HIDDEN, generator=generator) / HIDDEN ** 0.5
            tensors[f"{key}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator) * 0.3
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": RANK, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none"}))
    return folder


@pytest.fixture(scope="module")
def lora_setup(tmp_path_factory):
    """Two adapters and the tokens the offline engine gives for PROMPT under each (and the base)."""
    root = tmp_path_factory.mktemp("adapters")
    folders = {name: write_adapter(root / name, seed) for seed, name in enumerate(("first", "second"))}
    llm = LLM(model=MODEL, dtype="float32", kv_cache_memory_bytes=300_000_000, max_num_seqs=16, enable_lora=True,
              max_loras=2, max_lora_rank=8)
    params = SamplingParams(temperature=0.0, max_tokens=8)
    expected = {name: llm.generate(PROMPT, params, use_tqdm=False,
                                   lora_request=LoRARequest(name, i, str(folder)))[0].outputs[0].token_ids
                for i, (name, folder) in enumerate(folders.items(), start=1)}
    expected[None] = llm.generate(PROMPT, params, use_tqdm=False)[0].outputs[0].token_ids
    llm.llm_engine.shutdown()
    del llm
    assert len({tuple(tokens) for tokens in expected.values()}) == 3, "the adapters must change the tokens"
    return folders, expected


def test_adapters_are_served_by_name_registered_and_unregistered_live(service, lora_setup, tmp_path):
    folders, expected = lora_setup
    replica = service.start_replica("lora", "--enable-lora", "--max-loras", "2", "--max-lora-rank", "8",
                                    "--lora-modules", f"first={folders['first']}")

    def adapters_are(names, errors=()):
        beat = replica.heartbeat()
        return beat and beat.lora_adapters == sorted(names) and set(errors) <= set(beat.lora_errors) and beat

    def ask(lora_name):
        request = service.request(PROMPT)
        request.lora_name = lora_name

        async def main():
            async with service.client() as client:
                return await service.run(client, request)

        return asyncio.run(main())

    service.wait_until(lambda: adapters_are(["first"]), 30, "the --lora-modules adapter in the heartbeat")
    deltas = ask("first")
    service.assert_completed(deltas)
    assert service.token_ids_of(deltas) == expected["first"]
    base = ask(None)
    assert service.token_ids_of(base) == expected[None]

    unknown = ask("nobody")
    assert service.error_code(unknown) == "lora_not_found" and "nobody" in unknown[-1].error["message"]

    client = service.sync_redis()
    register_adapter(client, MODEL, "second", str(folders["second"]), key_prefix=service.prefix)
    register_adapter(client, MODEL, "broken", str(tmp_path / "missing"), key_prefix=service.prefix)
    beat = service.wait_until(lambda: adapters_are(["first", "second"], ["broken"]), 30,
                              "the registered adapter in the heartbeat")
    assert "does not exist" in beat.lora_errors["broken"]
    assert service.token_ids_of(ask("second")) == expected["second"]
    broken = ask("broken")
    assert service.error_code(broken) == "lora_not_found" and "does not exist" in broken[-1].error["message"]

    unregister_adapter(client, MODEL, "first", key_prefix=service.prefix)
    client.close()
    service.wait_until(lambda: adapters_are(["second"]), 30, "the unregistered adapter gone from the heartbeat")
    assert service.error_code(ask("first")) == "lora_not_found"
    assert service.token_ids_of(ask("second")) == expected["second"]
