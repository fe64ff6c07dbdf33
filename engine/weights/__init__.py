"""Model configs and weights from any supported source, through one entry point."""

from __future__ import annotations

from engine.weights.source import ModelSource, resolve_model  # noqa: F401  (light: no torch)


def load_model_config(source: ModelSource):
    if source.kind == "dummy":
        from engine.weights.dummy import dummy_config

        return dummy_config(source.preset)
    if source.kind == "gguf":
        from engine.weights.gguf_weights import load_gguf_config

        return load_gguf_config(source.path)
    from engine.weights.safetensors_weights import load_hf_config

    return load_hf_config(source.path)


def load_weights_into(model, source: ModelSource, seed: int = 0) -> None:
    """Fill `model` from the source; every parameter must be covered by the checkpoint."""
    if source.kind == "dummy":
        from engine.weights.dummy import initialize_dummy_weights

        initialize_dummy_weights(model, seed)
        return
    if source.kind == "gguf":
        from engine.weights.gguf_weights import iterate_gguf

        weights = iterate_gguf(source.path, model.config)
    else:
        from engine.weights.multimodal_text import text_weight_name
        from engine.weights.safetensors_weights import iterate_safetensors

        text_only = getattr(model.config, "language_model_only", False)  # a multimodal checkpoint's decoder
        weights = iterate_safetensors(source.path, text_weight_name if text_only else None)
    loaded = model.load_weights(weights)
    missing = model.expected_weight_names() - loaded
    if missing:
        raise ValueError(f"checkpoint {source.name} lacks {len(missing)} tensors, e.g. {sorted(missing)[:3]}")
