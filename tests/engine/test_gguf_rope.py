"""GGUF files with rope scaling against transformers.

A tiny random Llama per variant is written to a GGUF file the way llama.cpp's convert_hf_to_gguf.py
writes it: q/k permuted, linear and YaRN scaling as `llama.rope.scaling.*` metadata, Llama 3.1-style
("llama3") scaling as the `rope_freqs` tensor of per-frequency divisors. The engine's full-vocabulary
logprobs (prompt and generated) must equal transformers' on the same weights under the Hugging Face
rope config the file came from, within 1e-4, and its greedy tokens must equal `generate`; prompts run
to three times the original context, and a guard checks that the scaling changes those logprobs.
What the engine cannot express is refused by name.
"""

import math

import gguf
import numpy as np
import pytest
import torch

from engine import LLM, SamplingParams
from engine.weights.gguf_weights import _GLOBAL_NAMES, _LAYER_NAMES, load_gguf_config
from tests.engine.conftest import (
    TINY_VOCAB, assert_greedy_matches_transformers, build_tiny_hf_model, hf_log_softmax)
from tests.engine.test_models_vs_hf import as_matrix

ORIGINAL_CONTEXT = 32
ROPE_VARIANTS = {
    "linear": {"rope_type": "linear", "factor": 4.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": ORIGINAL_CONTEXT,
             "beta_fast": 1.0, "beta_slow": 0.25},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.25,
                              "original_max_position_embeddings": ORIGINAL_CONTEXT},
    # Mistral's converter writes mscale_all_dim (with mscale 1) as yarn_log_multiplier
    "yarn-mscale-all-dim": {"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.5,
                            "original_max_position_embeddings": ORIGINAL_CONTEXT},
    # head_dim 16: wavelengths 6.3, 19.9, 62.8, ... so one frequency keeps its speed, one is smoothed,
    # the other six are divided by the factor.
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": ORIGINAL_CONTEXT},
}
PROMPT_LENGTHS = [20, 50, 90]
ENGINE = dict(dtype="float32", block_size=4, num_gpu_blocks_override=128, seed=0, skip_tokenizer_init=True)


def prompts():
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=generator).tolist() for n in PROMPT_LENGTHS]


def base_writer(path, config, rotary_dim=None) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_rope_dimension_count(rotary_dim or config.head_dim)
    return writer


def add_rope_scaling(writer, rope, head_dim) -> None:
    """convert_hf_to_gguf.py's TextModel.set_gguf_parameters and LlamaModel.generate_extra_tensors."""
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope["rope_type"] == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for name, add in (("attention_factor", writer.add_rope_scaling_yarn_attn_factor),
                          ("beta_fast", writer.add_rope_scaling_yarn_beta_fast),
                          ("beta_slow", writer.add_rope_scaling_yarn_beta_slow)):
            if name in rope:
                add(rope[name])
        if "mscale_all_dim" in rope:
            writer.add_rope_scaling_yarn_log_mul(rope["mscale_all_dim"])
    elif rope["rope_type"] == "llama3":
        frequencies = 1.0 / (rope["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        original, factor = rope["original_max_position_embeddings"], rope["factor"]
        low, high = rope["low_freq_factor"], rope["high_freq_factor"]
        divisors = []
        for frequency in frequencies.tolist():
            wavelength = 2 * math.pi / frequency
            if wavelength < original / high:
                divisors.append(1.0)
            elif wavelength > original / low:
                divisors.append(factor)
            else:
                smooth = (original / wavelength - low) / (high - low)
                divisors.append(1 / ((1 - smooth) / factor + smooth))
        writer.add_tensor("rope_freqs.weight", np.array(divisors, dtype=np.float32))


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    shaped = weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
    return shaped.swapaxes(1, 2).reshape(weights.shape)


def write_gguf(path, hf_model) -> None:
    config = hf_model.config
    writer = base_writer(path, config)
    add_rope_scaling(writer, config.rope_parameters, config.head_dim)
    gguf_names = {hf: gguf_name for gguf_name, hf in _GLOBAL_NAMES.items()}
    for name, tensor in hf_model.state_dict().items():
        values = tensor.numpy()
        parts = name.split(".")  # model.layers.<i>.<module>.<projection>.weight
        if parts[1] == "layers":
            layer_names = {hf: gguf_name for gguf_name, hf in _LAYER_NAMES.items()}
            gguf_name = f"blk.{parts[2]}.{layer_names['.'.join(parts[3:-1])]}.{parts[-1]}"
        else:
            gguf_name = f"{gguf_names['.'.join(parts[:-1])]}.{parts[-1]}"
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            values = llama_cpp_permute(values, heads)
        writer.add_tensor(gguf_name, np.ascontiguousarray(values))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def gguf_and_reference(tmp_path_factory):
    """`(variant) -> (LLM on the GGUF file, transformers model under the HF rope config)`."""
    built = {}

    def get(variant):
        if variant not in built:
            rope = ROPE_VARIANTS[variant] | {"rope_theta": 10000.0}
            hf_model = build_tiny_hf_model("llama", rope_parameters=rope, max_position_embeddings=4 * ORIGINAL_CONTEXT)
            path = tmp_path_factory.mktemp(variant) / "model.gguf"
            write_gguf(path, hf_model)
            built[variant] = (LLM(model=str(path), **ENGINE), hf_model)
        return built[variant]

    return get


def unscaled_copy(hf_model):
    plain = build_tiny_hf_model("llama", max_position_embeddings=hf_model.config.max_position_embeddings)
    plain.load_state_dict(hf_model.state_dict())
    return plain


@pytest.mark.parametrize("variant", ROPE_VARIANTS)
def test_logprobs_and_greedy_tokens_match_transformers(gguf_and_reference, variant):
    llm, hf_model = gguf_and_reference(variant)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=TINY_VOCAB,
                            logprobs=TINY_VOCAB)
    plain = unscaled_copy(hf_model)
    for prompt, output in zip(prompts(), llm.generate([{"prompt_token_ids": p} for p in prompts()], params,
                                                      use_tqdm=False)):
        completion = output.outputs[0]
        tokens = prompt + completion.token_ids[:-1]
        reference = hf_log_softmax(hf_model, tokens)
        ours = torch.cat([as_matrix(output.prompt_logprobs[1:]), as_matrix(completion.logprobs)])
        torch.testing.assert_close(ours, reference, atol=1e-4, rtol=0)
        if len(prompt) > ORIGINAL_CONTEXT:  # guard: past the original context the scaling matters
            assert (hf_log_softmax(plain, tokens) - reference)[ORIGINAL_CONTEXT:].abs().max() > 0.05
    assert_greedy_matches_transformers(llm, hf_model, prompts(), [16, 8, 12])


def test_llama3_file_carries_its_divisors_and_no_metadata(gguf_and_reference):
    """The file holds what llama.cpp writes for llama3 (no scaling type), so the divisors are all the
    engine has: they reach the config, and the rotary layer divides by them."""
    llm, hf_model = gguf_and_reference("llama3")
    config = llm.llm_engine.model_config
    assert config.rope_parameters["rope_type"] == "default"
    divisors = torch.tensor(config.rope_freq_factors)
    assert divisors[0] == 1.0 and 1.0 < divisors[1] < 8.0 and (divisors[2:] == 8.0).all()
    from engine.layers.rotary import inverse_frequencies

    inv_freq, attention_factor = inverse_frequencies(config, 16, 128)
    torch.testing.assert_close(inv_freq, hf_model.model.rotary_emb.inv_freq, rtol=1e-6, atol=0)
    assert attention_factor == 1.0


@pytest.mark.parametrize("metadata, error", [
    (lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE), "rope scaling type 'longrope'"),
    (lambda w: (w.add_rope_scaling_type(gguf.RopeScalingType.YARN), w.add_rope_scaling_factor(4.0),
                w.add_rope_scaling_yarn_ext_factor(0.5)), "yarn_ext_factor=0.5"),
    (lambda w: w.add_rope_scaling_attn_factors(0.8), "attn_factor=0.8"),
    (None, r"partial rotary embeddings \(rope.dimension_count=8, head_dim=16\)"),
], ids=["longrope", "yarn-ext-factor", "attn-factor", "partial-rotary"])
def test_unsupported_rope_metadata_is_refused(tmp_path, metadata, error):
    config = build_tiny_hf_model("llama").config
    writer = base_writer(tmp_path / "model.gguf", config, rotary_dim=8 if metadata is None else None)
    if metadata is not None:
        metadata(writer)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    with pytest.raises(ValueError, match=error):
        load_gguf_config(tmp_path / "model.gguf")
