"""Hugging Face checkpoints: config.json plus one or many *.safetensors files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch


def load_hf_config(path: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the model config in {path}: {error}") from error


def iterate_safetensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    yield name, handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"corrupt safetensors file {file}: {error}") from error
