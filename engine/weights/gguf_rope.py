"""llama.cpp's rope metadata as transformers' `rope_parameters`, the form the rotary layer reads.

llama.cpp's converter (convert_hf_to_gguf.py) writes `{arch}.rope.scaling.type` "linear" with a
factor, or "yarn" with a factor, the original context length and, when the checkpoint sets them,
beta_fast, beta_slow and the attention factor (transformers' names, which map back one to one).
Llama 3.1-style ("llama3") scaling leaves no metadata but a `rope_freqs` tensor: one divisor per
frequency, computed from factor, low/high_freq_factor and the original context. Those parameters do
not come back from it (the original context is not stored, and the wavelength thresholds are only
known to lie between two frequencies), so the divisors themselves go to the rotary layer as
`rope_freq_factors`; llama.cpp computes with them the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

SUPPORTED_SCALING = ("none", "linear", "yarn")
_NEUTRAL_VALUES = {"rope.scaling.attn_factor": 1.0, "rope.scaling.alpha": 0.0, "rope.scaling.yarn_ext_factor": 1.0}
_YARN_NAMES = {"yarn_beta_fast": "beta_fast", "yarn_beta_slow": "beta_slow", "yarn_attn_factor": "attention_factor"}


def rope_config(metadata: Callable, head_dim: int, rope_freqs: np.ndarray | None) -> dict:
    """Config kwargs for the file's rope. `metadata(key, default=None)` reads `{arch}.<key>`;
    `rope_freqs`: the values of the `rope_freqs` tensor, None when the file has none."""
    if (rotary_dim := metadata("rope.dimension_count", head_dim)) != head_dim:
        raise ValueError(f"partial rotary embeddings (rope.dimension_count={rotary_dim}, head_dim={head_dim}) "
                         "in GGUF files are not supported")
    params = {"rope_type": "default", "rope_theta": metadata("rope.freq_base", 10000.0)}
    factor = metadata("rope.scaling.factor") or metadata("rope.scale_linear")  # the key older files used
    scaling = metadata("rope.scaling.type", "linear" if factor else "none")  # llama.cpp's default type
    if scaling not in SUPPORTED_SCALING:
        raise ValueError(f"rope scaling type {scaling!r} in GGUF files is not supported; supported: "
                         f"{', '.join(SUPPORTED_SCALING)} and llama3's rope_freqs tensor")
    for key, neutral in _NEUTRAL_VALUES.items():  # what transformers' rope types cannot express
        if (value := metadata(key, neutral)) != neutral:
            raise ValueError(f"{key}={value} in GGUF files is not supported")
    if factor and scaling == "linear":  # llama.cpp reads a missing or zero factor as no scaling
        params |= {"rope_type": "linear", "factor": factor}
    elif factor and scaling == "yarn":
        params |= _yarn_parameters(metadata, factor)
    config = {"rope_parameters": params}
    if rope_freqs is not None:
        if rope_freqs.shape != (head_dim // 2,):
            raise ValueError(f"rope_freqs has shape {rope_freqs.shape}; expected one divisor per frequency "
                             f"({head_dim // 2})")
        config["rope_freq_factors"] = rope_freqs.astype(np.float32).tolist()
    return config


def _yarn_parameters(metadata: Callable, factor: float) -> dict:
    original = metadata("rope.scaling.original_context_length") or metadata("context_length", 2048)
    params = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original}
    params |= {name: value for key, name in _YARN_NAMES.items()
               if (value := metadata(f"rope.scaling.{key}")) is not None}
    if log_multiplier := metadata("rope.scaling.yarn_log_multiplier"):  # transformers' mscale_all_dim
        params |= {"mscale": 1.0, "mscale_all_dim": log_multiplier}
    return params
