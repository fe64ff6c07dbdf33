"""Models by their Hugging Face Hub id, from a Hugging Face cache (a temporary one, laid out as
huggingface_hub lays it out: refs/<branch> names a commit, snapshots/<commit> holds the files)."""

from __future__ import annotations

import shutil

import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.weights.source import BUNDLED_FILE, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OPTIONS = dict(dtype="float32", block_size=4, num_gpu_blocks_override=64, seed=0)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_hf_checkpoint):
    """acme/tiny-llama at branch main (= COMMIT) in a Hugging Face cache named by HF_HUB_CACHE."""
    folder, _ = tiny_hf_checkpoint("llama")
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    shutil.copytree(folder, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a test never reaches the network
    return folder


def test_a_hub_id_loads_from_the_cache_like_its_folder(hub_cache):
    source = resolve_model("acme/tiny-llama")
    assert source.kind == "hf" and source.path.name == COMMIT
    assert resolve_model("acme/tiny-llama", revision=COMMIT).path == source.path
    prompt, params = {"prompt_token_ids": [5, 9, 23, 41]}, SamplingParams(temperature=0.0, max_tokens=8)
    by_name = LLM(model="acme/tiny-llama", **OPTIONS).generate([prompt], params, use_tqdm=False)
    by_path = LLM(model=str(hub_cache), **OPTIONS).generate([prompt], params, use_tqdm=False)
    assert by_name[0].outputs[0].token_ids == by_path[0].outputs[0].token_ids


def test_a_missing_model_offline_names_the_cache(hub_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"acme/absent.*{tmp_path / 'hub'}.*HF_HUB_OFFLINE"):
        resolve_model("acme/absent")
    with pytest.raises(FileNotFoundError, match="acme/tiny-llama@v9"):
        resolve_model("acme/tiny-llama", revision="v9")


def test_the_bundled_models_name_needs_no_hub(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct").path.name == BUNDLED_FILE
