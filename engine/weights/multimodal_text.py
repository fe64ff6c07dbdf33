"""The language model of a multimodal checkpoint, served for text (Gemma 3 at 4B, 12B and 27B ships
only as `Gemma3ForConditionalGeneration`: a SigLIP vision tower and a projector around the same
decoder as the 1B text model).

Its config's `text_config` becomes the model config (with the text architecture's name), and the
checkpoint's language-model weights are read under the names the text model has; the vision tower's
are never read. Prompts are text (or token ids); images are refused as for any text model.
"""

from __future__ import annotations

import copy

# Multimodal architecture -> (its text-only architecture, that model's class in engine/models).
TEXT_ARCHITECTURES = {"Gemma3ForConditionalGeneration": "Gemma3ForCausalLM"}
# Where checkpoints keep the language model: transformers' Hub layout, then its in-memory one (v5).
_PREFIXES = (("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."),
             ("model.language_model.", "model."), ("lm_head.", "lm_head."))


def text_config_of(config):
    """The text model's config if `config` is a multimodal one this module knows, else `config`."""
    architectures = getattr(config, "architectures", None) or []
    text_architecture = next((TEXT_ARCHITECTURES[a] for a in architectures if a in TEXT_ARCHITECTURES), None)
    if text_architecture is None:
        return config
    text = copy.deepcopy(config.get_text_config())
    text.architectures = [text_architecture]
    text.tie_word_embeddings = getattr(config, "tie_word_embeddings", text.tie_word_embeddings)
    if getattr(text, "dtype", None) is None:
        text.dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    text.language_model_only = True  # the weights need text_weight_name
    # transformers' Gemma3ForConditionalGeneration never soft-caps its logits (Gemma 3's configs have
    # no cap anyway; a text config that names one is obeyed only by Gemma3ForCausalLM).
    text.final_logit_softcapping = None
    return text


def text_weight_name(name: str) -> str | None:
    """A multimodal checkpoint's tensor name under the text model, or None (vision tower, projector)."""
    for prefix, replacement in _PREFIXES:
        if name.startswith(prefix):
            return replacement + name[len(prefix):]
    return None
