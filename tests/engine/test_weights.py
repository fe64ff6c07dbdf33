"""Model sources and their failures: clear errors for missing paths, unsupported architectures,
corrupt files and unknown dummy presets; dummy weights that really run."""

import json
import shutil

import pytest

from engine import LLM, SamplingParams
from engine.weights import load_model_config, resolve_model
from engine.weights.source import ModelSource, bundled_model_path

TINY = dict(dtype="float32", block_size=4, num_gpu_blocks_override=32)


def test_missing_path_raises_file_not_found_with_a_clear_message(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="not found") as error:
        resolve_model(str(missing))
    assert str(missing) in str(error.value)
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(model=str(missing), **TINY)


def test_folder_without_config_or_gguf_is_rejected(tmp_path):
    (tmp_path / "README.md").write_text("not a model")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_file_that_is_not_gguf_is_rejected(tmp_path):
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 64)
    with pytest.raises(ValueError, match="gguf"):
        resolve_model(str(path))


def test_sources_resolve_to_the_right_kind(tiny_hf_checkpoint):
    folder, _ = tiny_hf_checkpoint("llama")
    assert resolve_model(str(folder)) == ModelSource("hf", path=folder)
    assert resolve_model("dummy:llama-3.1-8b") == ModelSource("dummy", preset="llama-3.1-8b")
    bundled = resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert bundled.kind == "gguf" and bundled.path == bundled_model_path() and bundled.path.exists()
    assert resolve_model(str(bundled.path.parent)) == bundled, "a folder holding one .gguf file"


def test_unsupported_architecture_is_reported(tmp_path, bundled_tokenizer):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 256, "n_embd": 64,
              "n_layer": 2, "n_head": 4, "n_positions": 128}
    (tmp_path / "config.json").write_text(json.dumps(config))
    bundled_tokenizer.save_pretrained(str(tmp_path))  # a complete folder: only the architecture is wrong
    with pytest.raises(ValueError, match="unsupported") as error:
        LLM(model=str(tmp_path), **TINY)
    assert "GPT2LMHeadModel" in str(error.value)


def test_unreadable_config_is_a_value_error(tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    with pytest.raises(ValueError):
        load_model_config(resolve_model(str(tmp_path)))


def copy_checkpoint(source, destination):
    shutil.copytree(source, destination)
    return destination


def test_corrupt_safetensors_file_is_reported(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint("llama")[0], tmp_path / "garbage")
    (folder / "model.safetensors").write_bytes(b"\x13\x37" * 500)
    with pytest.raises(ValueError, match="corrupt"):
        LLM(model=str(folder), **TINY)


def test_truncated_safetensors_file_is_reported(tiny_hf_checkpoint, tmp_path):
    folder = copy_checkpoint(tiny_hf_checkpoint("llama")[0], tmp_path / "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt"):
        LLM(model=str(folder), **TINY)


def test_checkpoint_missing_tensors_is_reported(tiny_hf_checkpoint, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = copy_checkpoint(tiny_hf_checkpoint("llama")[0], tmp_path / "partial")
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lacks"):
        LLM(model=str(folder), **TINY)


def test_corrupt_gguf_file_is_reported(tmp_path):
    path = tmp_path / "broken.gguf"
    path.write_bytes(b"GGUF" + b"\xff" * 2000)
    with pytest.raises(ValueError, match="corrupt"):
        LLM(model=str(path), **TINY)


def test_truncated_gguf_file_is_reported(tmp_path):
    path = tmp_path / "truncated.gguf"
    with open(bundled_model_path(), "rb") as source:
        path.write_bytes(source.read(4_000_000))
    with pytest.raises(ValueError, match="corrupt"):
        LLM(model=str(path), **TINY)


def test_unknown_dummy_preset_is_rejected():
    with pytest.raises(ValueError, match="no-such-preset"):
        LLM(model="dummy:no-such-preset", **TINY)


@pytest.mark.parametrize("preset", ["smollm2-135m", "llama-3.1-8b", "llama-3.1-70b", "qwen2.5-0.5b"])
def test_issue_presets_exist(preset):
    config = load_model_config(resolve_model(f"dummy:{preset}"))
    assert config.architectures and config.vocab_size > 0


def test_dummy_smollm2_loads_and_generates_on_cpu():
    llm = LLM(model="dummy:smollm2-135m", dtype="float32", num_gpu_blocks_override=16, max_model_len=128,
              device="cpu")
    assert llm.llm_engine.runner.device.type == "cpu"
    outputs = llm.generate([[1, 2, 3, 4, 5]], SamplingParams(max_tokens=4, ignore_eos=True, temperature=0.0),
                           use_tqdm=False)
    token_ids = outputs[0].outputs[0].token_ids
    assert len(token_ids) == 4
    assert all(0 <= t < 49152 for t in token_ids)
    assert outputs[0].outputs[0].finish_reason == "length"
