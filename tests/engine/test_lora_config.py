"""LoRA options, adapter requests and the torch-free PEFT folder check."""

from __future__ import annotations

import json
import struct
import subprocess
import sys

import pytest

from engine.config import EngineConfig
from engine.lora.config import LoRAConfig
from engine.lora.peft_config import LoRAAdapterError, read_peft_adapter
from engine.lora.request import LoRARequest


def test_engine_options_are_validated_with_vllm_defaults():
    config = LoRAConfig.from_engine_config(EngineConfig(enable_lora=True))
    assert (config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (1, 16, 1)
    assert LoRAConfig.from_engine_config(EngineConfig()) is None
    with pytest.raises(ValueError, match="max_lora_rank"):
        EngineConfig(enable_lora=True, max_lora_rank=12)
    with pytest.raises(ValueError, match="max_cpu_loras"):
        EngineConfig(enable_lora=True, max_loras=4, max_cpu_loras=2)
    with pytest.raises(ValueError, match="max_loras"):
        EngineConfig(max_loras=0)


def test_the_cli_exposes_the_options():
    import argparse

    from engine.cli_args import add_engine_args, engine_config_from_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--enable-lora", "--max-loras", "3", "--max-lora-rank", "32", "--max-cpu-loras", "5"])
    config = engine_config_from_args(args)
    assert (config.enable_lora, config.max_loras, config.max_lora_rank, config.max_cpu_loras) == (True, 3, 32, 5)


def test_a_lora_request_needs_an_id_from_one():
    with pytest.raises(ValueError, match="lora_int_id"):
        LoRARequest("a", 0, "/x")
    with pytest.raises(ValueError, match="lora_name"):
        LoRARequest("", 1, "/x")


def write_adapter(folder, config: dict, tensors: dict[str, list[int]]):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4 * shape[0] * shape[1]
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    (folder / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(offset))
    return folder


KEY = "base_model.model.model.layers.{}.self_attn.{}.lora_{}.weight"
GOOD = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "peft_type": "LORA"}


def good_tensors():
    return {KEY.format(0, "q_proj", "A"): [8, 64], KEY.format(0, "q_proj", "B"): [64, 8],
            KEY.format(0, "v_proj", "A"): [8, 64], KEY.format(0, "v_proj", "B"): [32, 8]}


def test_a_good_folder_is_read_from_its_header(tmp_path):
    adapter = read_peft_adapter(write_adapter(tmp_path / "a", GOOD, good_tensors()))
    assert (adapter.rank, adapter.scaling, adapter.target_modules) == (8, 2.0, ("q_proj", "v_proj"))
    rslora = read_peft_adapter(write_adapter(tmp_path / "b", GOOD | {"use_rslora": True}, good_tensors()))
    assert rslora.scaling == pytest.approx(16 / 8 ** 0.5)


@pytest.mark.parametrize("change, words", [
    ({"use_dora": True}, "DoRA"), ({"bias": "all"}, "bias"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
    ({"target_modules": ["q_proj", "lm_head"]}, "lm_head"), ({"r": 0}, "r must be"),
    ({"peft_type": "IA3"}, "IA3")])
def test_what_the_engine_cannot_serve_is_refused_by_name(tmp_path, change, words):
    with pytest.raises(LoRAAdapterError, match=words) as error:
        read_peft_adapter(write_adapter(tmp_path / "a", GOOD | change, good_tensors()))
    assert "adapter_config.json" in str(error.value)


def test_bad_files_are_named(tmp_path):
    with pytest.raises(LoRAAdapterError, match="embed_tokens"):
        read_peft_adapter(write_adapter(tmp_path / "a", GOOD, {
            **good_tensors(), "base_model.model.model.embed_tokens.lora_embedding_A": [8, 256]}))
    with pytest.raises(LoRAAdapterError, match="rank 4, but r is 8"):
        read_peft_adapter(write_adapter(tmp_path / "b", GOOD, {**good_tensors(), KEY.format(1, "k_proj", "A"): [4, 64],
                                                               KEY.format(1, "k_proj", "B"): [32, 4]}))
    folder = write_adapter(tmp_path / "c", GOOD, good_tensors())
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(LoRAAdapterError, match="adapter_model.safetensors"):
        read_peft_adapter(folder)


def test_reading_an_adapter_imports_no_torch(tmp_path):
    folder = write_adapter(tmp_path / "a", GOOD, good_tensors())
    code = ("import sys; from engine.lora.peft_config import read_peft_adapter; "
            f"read_peft_adapter({str(folder)!r}); assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
