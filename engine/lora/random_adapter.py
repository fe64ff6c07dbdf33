"""A PEFT LoRA adapter with random matrices for any model shape (benchmarks, and tests of shapes
no checkpoint of ours has), written as PEFT saves one: `adapter_config.json` and
`adapter_model.safetensors` with `base_model.model.model.layers.N.<module>.lora_A/B.weight`.

Values are small and uniform so a random adapter changes the base model's outputs without driving
activations out of range (as the dummy weights of engine/weights/dummy.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from engine.lora.peft_config import CONFIG_FILE, WEIGHTS_FILE

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _shapes(model_config) -> dict[str, tuple[str, int, int]]:
    """PEFT leaf name -> (its block, input width, output rows) for a Llama-shaped decoder layer."""
    hidden, heads = model_config.hidden_size, model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    inter = model_config.intermediate_size
    return {"q_proj": ("self_attn", hidden, heads * head_dim), "k_proj": ("self_attn", hidden, kv),
            "v_proj": ("self_attn", hidden, kv), "o_proj": ("self_attn", heads * head_dim, hidden),
            "gate_proj": ("mlp", hidden, inter), "up_proj": ("mlp", hidden, inter), "down_proj": ("mlp", inter, hidden)}


def write_random_adapter(folder: str | Path, model_config, rank: int, *, alpha: float | None = None,
                         targets: tuple[str, ...] = ALL_TARGETS, seed: int = 0,
                         dtype: torch.dtype = torch.bfloat16, scale: float = 0.02) -> Path:
    """Write the adapter into `folder` (created) and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes, tensors = _shapes(model_config), {}
    for layer in range(model_config.num_hidden_layers):
        for leaf in targets:
            block, in_features, out_features = shapes[leaf]
            prefix = f"base_model.model.model.layers.{layer}.{block}.{leaf}"
            for kind, shape in (("lora_A", (rank, in_features)), ("lora_B", (out_features, rank))):
                values = (torch.rand(shape, generator=generator) * 2 - 1) * scale
                tensors[f"{prefix}.{kind}.weight"] = values.to(dtype)
    save_file(tensors, str(folder / WEIGHTS_FILE))
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha or rank,
              "target_modules": list(targets), "bias": "none", "use_rslora": False, "lora_dropout": 0.0}
    (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return folder
