"""A model's generation_config.json supplies the sampling defaults of calls that leave a field unset."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.llm import LLM
from engine.sampling_params import SamplingParams
from engine.weights.generation_defaults import load_sampling_defaults
from engine.weights.source import ModelSource


def hf_folder(tmp_path, config) -> ModelSource:
    (tmp_path / "generation_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return ModelSource("hf", path=tmp_path)


def test_the_sampling_fields_are_read_and_the_rest_ignored(tmp_path):
    source = hf_folder(tmp_path, {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0,
                                  "repetition_penalty": 1.05, "do_sample": True, "bos_token_id": 1,
                                  "eos_token_id": [2, 3], "max_new_tokens": 99})
    assert load_sampling_defaults(source) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0,
                                              "repetition_penalty": 1.05}


@pytest.mark.parametrize("field, value", [("temperature", -1), ("top_p", 0), ("top_p", 1.5), ("top_k", 2.5),
                                          ("top_k", -2), ("min_p", 2), ("repetition_penalty", 0),
                                          ("temperature", "0.7"), ("temperature", True), ("temperature", None)])
def test_a_value_out_of_range_is_skipped_not_inherited(tmp_path, field, value):
    assert load_sampling_defaults(hf_folder(tmp_path, {field: value, "top_k": 5} if field != "top_k"
                                            else {field: value, "top_p": 0.5})) in ({"top_k": 5}, {"top_p": 0.5})


@pytest.mark.parametrize("config", ["{not json", "[0.5]", "NaN"])
def test_an_unreadable_file_gives_no_defaults(tmp_path, config):
    assert load_sampling_defaults(hf_folder(tmp_path, config)) == {}


def test_models_without_a_folder_or_a_file_have_none(tmp_path):
    assert load_sampling_defaults(ModelSource("hf", path=tmp_path)) == {}
    assert load_sampling_defaults(ModelSource("dummy", preset="llama-tiny")) == {}
    assert load_sampling_defaults(ModelSource("gguf", path=tmp_path / "m.gguf")) == {}


def test_generate_without_params_uses_the_models_defaults(tiny_hf_checkpoint, tmp_path):
    folder, _ = tiny_hf_checkpoint("llama")
    model = tmp_path / "model"
    shutil.copytree(folder, model)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "top_k": 7}))
    llm = LLM(model=str(model), dtype="float32", block_size=4, num_gpu_blocks_override=64, seed=0)
    defaults = llm.get_default_sampling_params()
    assert (defaults.temperature, defaults.top_k, defaults.top_p) == (0.0, 7, 1.0)
    prompt = {"prompt_token_ids": [5, 9, 23, 41]}
    implicit = llm.generate([prompt] * 3, use_tqdm=False)
    greedy = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in implicit] == [greedy[0].outputs[0].token_ids] * 3  # greedy, not sampled
