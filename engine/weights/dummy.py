"""`dummy:<preset>`: real model shapes with random weights, for benchmarks (as vLLM's
`--load-format dummy`). Values are small and uniform so activations stay finite."""

from __future__ import annotations

import torch
from torch import nn

# Configs whose class is not named after the architecture (Gemma 3's text model: Gemma3Config is the multimodal one).
_CONFIG_CLASSES = {"Gemma3ForCausalLM": "Gemma3TextConfig"}

_LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

PRESETS = {
    "smollm2-135m": ("LlamaForCausalLM", dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, bos_token_id=1, eos_token_id=2)),
    "llama-3.2-1b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_parameters={**_LLAMA3_ROPE, "factor": 32.0},
        bos_token_id=128000, eos_token_id=128009)),
    "llama-3.1-8b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=_LLAMA3_ROPE, bos_token_id=128000, eos_token_id=128009)),
    "llama-3.1-70b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters=_LLAMA3_ROPE, bos_token_id=128000, eos_token_id=128009)),
    "mistral-7b": ("MistralForCausalLM", dict(
        vocab_size=32768, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=32768, rms_norm_eps=1e-5,
        tie_word_embeddings=False, sliding_window=None, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=1, eos_token_id=2)),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=151643, eos_token_id=151645)),
    "qwen3-0.6b": ("Qwen3ForCausalLM", dict(
        vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
        num_key_value_heads=8, head_dim=128, max_position_embeddings=40960, rms_norm_eps=1e-6,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=151643, eos_token_id=151645)),
    # microsoft/Phi-3-mini-4k-instruct (its 2047-token sliding window left out, as Mistral's).
    "phi-3-mini-4k": ("Phi3ForCausalLM", dict(
        vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, max_position_embeddings=4096, original_max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=1, eos_token_id=32000,
        pad_token_id=32000)),
    # allenai/OLMo-2-0425-1B
    "olmo-2-1b": ("Olmo2ForCausalLM", dict(
        vocab_size=100352, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=16,
        num_key_value_heads=16, max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0}, eos_token_id=100257,
        pad_token_id=100277)),
    # ibm-granite/granite-3.0-2b-instruct
    "granite-3-2b": ("GraniteForCausalLM", dict(
        vocab_size=49155, hidden_size=2048, intermediate_size=8192, num_hidden_layers=40, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, embedding_multiplier=12.0,
        attention_multiplier=0.015625, residual_multiplier=0.22, logits_scaling=8.0, bos_token_id=0,
        eos_token_id=0, pad_token_id=0)),
    # google/gemma-2-9b, its config.json (as recalled; the Hub is out of reach here): 42 layers alternating
    # local (a 4096-token window) and global, head_dim 256 (not 3584 / 16 = 224), attention scaled by
    # query_pre_attn_scalar 256, soft-caps 50 (attention logits) and 30 (final logits); 9.24B parameters,
    # 18.5 GB in bf16.
    "gemma-2-9b": ("Gemma2ForCausalLM", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=8192,
        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, bos_token_id=2, eos_token_id=1,
        pad_token_id=0)),
    # google/gemma-3-12b-pt, the text model of its config.json (as recalled). From text_config: hidden 3840,
    # MLP 15360, 48 layers, 16 heads, 8 KV heads, a 1024-token window, linear rope scaling 8 on the global
    # layers; the fields text_config leaves out take Gemma3TextConfig's defaults of that release
    # (transformers 4.50): head_dim and query_pre_attn_scalar 256, rope_theta 1e6 (global layers),
    # rope_local_base_freq 1e4, every 6th layer global, 131072 positions, vocabulary 262208; eos 1 and 106
    # (<end_of_turn>). Without its vision tower (Gemma3ForCausalLM): 11.8B parameters, 23.5 GB in bf16.
    "gemma-3-12b": ("Gemma3ForCausalLM", dict(
        vocab_size=262208, hidden_size=3840, intermediate_size=15360, num_hidden_layers=48, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
        rms_norm_eps=1e-6, tie_word_embeddings=True, query_pre_attn_scalar=256, sliding_window=1024,
        sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=10000.0,
        rope_scaling={"rope_type": "linear", "factor": 8.0}, bos_token_id=2, eos_token_id=[1, 106], pad_token_id=0)),
    # mistralai/Mixtral-8x7B-v0.1 (config.json): 8 experts of 14336, top-2; 46.7B parameters, ~93 GB in bf16.
    "mixtral-8x7b": ("MixtralForCausalLM", dict(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768,
        rms_norm_eps=1e-5, tie_word_embeddings=False, sliding_window=None,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=1, eos_token_id=2)),
    # Qwen/Qwen3-30B-A3B (config.json): 128 experts of 768, top-8, renormalised, every layer sparse;
    # 30.5B parameters (3.3B active per token), ~61 GB in bf16.
    "qwen3-30b-a3b": ("Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, max_position_embeddings=40960,
        rms_norm_eps=1e-6, tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        bos_token_id=151643, eos_token_id=151645)),
}


def dummy_config(preset: str):
    import transformers

    if preset not in PRESETS:
        raise ValueError(f"unknown dummy preset {preset!r}; known: {', '.join(sorted(PRESETS))}")
    architecture, kwargs = PRESETS[preset]
    config_name = _CONFIG_CLASSES.get(architecture, architecture.replace("ForCausalLM", "Config"))
    config_class = getattr(transformers, config_name)
    return config_class(architectures=[architecture], **kwargs)


@torch.no_grad()
def initialize_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Writes every parameter (the model is built without torch's default init, so none may be left),
    in place on its own device and in its own dtype: no host copy, one kernel per parameter (a MoE
    layer's experts are one stacked tensor), the same values for the same seed."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            param.uniform_(-0.02, 0.02, generator=generator)
