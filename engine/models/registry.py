"""Architecture name (config.json's `architectures[0]`) -> model class."""

from __future__ import annotations

from engine.models.gemma import Gemma2ForCausalLM, Gemma3ForCausalLM, GemmaForCausalLM
from engine.models.llama import LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM
from engine.models.moe import MixtralForCausalLM, Qwen3MoeForCausalLM
from engine.models.olmo2 import Olmo2ForCausalLM
from engine.models.phi3 import Phi3ForCausalLM

MODEL_REGISTRY = {
    "GemmaForCausalLM": GemmaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    # Also the decoder of a multimodal Gemma3ForConditionalGeneration (engine/weights/multimodal_text.py).
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "GraniteForCausalLM": LlamaForCausalLM,  # its multipliers are read from the config
    "Olmo2ForCausalLM": Olmo2ForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "Qwen2MoeForCausalLM": MixtralForCausalLM,  # q/k/v bias and shared expert read from its config
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def architecture_of(config) -> str:
    architectures = getattr(config, "architectures", None) or []
    for name in architectures:
        if name in MODEL_REGISTRY:
            return name
    raise ValueError(f"unsupported model architecture {architectures or config.model_type!r}; "
                     f"supported: {', '.join(sorted(MODEL_REGISTRY))}")


def get_model_class(config):
    return MODEL_REGISTRY[architecture_of(config)]
