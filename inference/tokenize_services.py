"""vLLM's `/tokenize` and `/detokenize`: a prompt's token ids as the completions and chat endpoints
would send them to the engine, and token ids back to text, with no engine work.

They go through the same gates as a completion before it reaches the tokenizer (the key may use
the model, the model is served, text within the character bound, ids within the vocabulary and
the key's prompt cap), so they cost a tenant no more than a refused completion; rate-limit
admission is skipped on purpose: nothing is queued, reserved or generated.
"""
from __future__ import annotations

from inference.errors import OpenAIError, invalid
from inference.prompt_limits import chat_chars, check_text_length, vocab_size
from inference.prompt_tokenizer import PromptError, PromptTokenizer
from inference.model_targets import resolve_model
from inference.tokenizing import off_loop
from tenants.models import ApiKey
from tenants.selectors import effective_limits


async def tokenize(*, api_key: ApiKey, data: dict) -> dict:
    tokenizer = (await resolve_model(api_key=api_key, model=data["model"])).tokenizer  # an adapter's: its base's
    limits = effective_limits(api_key=api_key)
    if "messages" in data:
        messages = [dict(m) for m in data["messages"]]  # as start_chat renders them: guarded content
        check_text_length(tokenizer, limits, chat_chars(messages), "messages")
        tokens = await _encoded("messages", tokenizer.encode_chat, messages, data["add_generation_prompt"])
    else:
        check_text_length(tokenizer, limits, len(data["prompt"]), "prompt")
        tokens = await _encoded("prompt", tokenizer.encode, data["prompt"], data["add_special_tokens"])
    return {"count": len(tokens), "max_model_len": tokenizer.card.max_model_len, "tokens": tokens}


async def detokenize(*, api_key: ApiKey, data: dict) -> dict:
    tokenizer = (await resolve_model(api_key=api_key, model=data["model"])).tokenizer
    tokens, limits, vocab = data["tokens"], effective_limits(api_key=api_key), vocab_size(tokenizer)
    if len(tokens) > limits.max_prompt_tokens:
        raise OpenAIError(f"There are {len(tokens)} tokens; this API key allows at most {limits.max_prompt_tokens} "
                          "in a prompt.", param="tokens", code="prompt_too_long")
    if tokens and vocab is not None and max(tokens) >= vocab:
        raise invalid("tokens", f"Token id {max(tokens)} is out of range: the model's vocabulary has {vocab} tokens.",
                      code="invalid_token_id")
    return {"prompt": await _encoded("tokens", tokenizer.decode, tokens)}


async def _encoded(param: str, function, *args):
    """`function(*args)` in the tokenizer pool; a model that cannot do it (no tokenizer, no chat
    template, a template that refuses the messages) is a 400 naming `param`."""
    try:
        return await off_loop(function, *args)
    except PromptError as error:
        raise OpenAIError(str(error), param=param) from None
