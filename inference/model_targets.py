"""What serves the `model` a call names: a base model, or a LoRA adapter of the caller's tenant on one.

Resolved once per call, where its limits are computed: the engine request then goes to the base
model's stream with the adapter's name (`EngineRequest.lora_name`), while responses and usage keep
the name the caller sent. A base model's name wins (registration refuses adapters that clash), so
calls of base models cost no adapter lookup; an adapter lookup is the process cache's (no query).
"""
from __future__ import annotations

from dataclasses import dataclass

from inference.engine_client import get_engine_client, prompt_tokenizers
from inference.errors import OpenAIError, model_not_found
from inference.prompt_tokenizer import PromptTokenizer
from tenants.lora_selectors import owned_lora_adapter
from tenants.models import ApiKey
from tenants.selectors import model_allowed


@dataclass(frozen=True)
class ModelTarget:
    model: str  # as the call named it: its responses and usage events carry this name
    base_model: str  # whose replicas run the call (its request stream, its tokenizer)
    lora_name: str | None  # the adapter the replicas apply, None for the base model itself
    tokenizer: PromptTokenizer  # the base model's, from the card its replicas publish


async def resolve_model(*, api_key: ApiKey, model: str) -> ModelTarget:
    """403 when the key's allowlist leaves `model` out, 404 when it is neither a served base model nor an
    active adapter of the key's tenant on one (the same 404 whichever: other tenants' adapters stay unseen)."""
    if not model_allowed(api_key=api_key, model=model):
        raise OpenAIError(f"This API key may not use the model `{model}`.", status=403, param="model",
                          code="model_not_allowed")
    client = get_engine_client()
    tokenizer = await prompt_tokenizers.get(client, model)
    if tokenizer is not None:
        return ModelTarget(model, model, None, tokenizer)
    adapter = await owned_lora_adapter(redis_client=client.redis, api_key=api_key, name=model)
    if adapter is not None and (tokenizer := await prompt_tokenizers.get(client, adapter.base_model)) is not None:
        return ModelTarget(model, adapter.base_model, model, tokenizer)
    raise model_not_found(model)
