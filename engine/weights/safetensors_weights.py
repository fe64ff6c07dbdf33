"""Hugging Face checkpoints: config.json plus one or many *.safetensors files."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from engine.weights.multimodal_text import text_config_of


def load_hf_config(path: Path):
    """The model config; a multimodal one's text model's (engine/weights/multimodal_text.py)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot read the model config in {path}: {error}") from error
    return text_config_of(config)


def iterate_safetensors(path: Path, rename: Callable[[str], str | None] | None = None
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of every tensor, or with `rename` under its new name, those it does not drop
    (None) being the only ones read."""
    from safetensors import SafetensorError, safe_open

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}")
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    new_name = name if rename is None else rename(name)
                    if new_name is not None:
                        yield new_name, handle.get_tensor(name)
        except (SafetensorError, OSError) as error:
            raise ValueError(f"corrupt safetensors file {file}: {error}") from error
