"""Limits checked before a prompt is tokenized: what a call may ask of the model, in O(input) time.

Tokenizing and rendering a chat template cost far more than reading the input, so everything
that can refuse a call without them runs first: text too long for the key's prompt cap, token ids
and other numbers beyond the model's vocabulary. The character bound is sound, never a guess: no
token covers more characters than the longest entry of the vocabulary (byte-level vocabularies
spell each byte as one character, and a text has no more characters than bytes), so a text longer
than `max_prompt_tokens` times that length cannot fit in `max_prompt_tokens` tokens.
"""
from __future__ import annotations

import json

import weakref

from inference.errors import OpenAIError, invalid
from inference.prompt_tokenizer import PromptTokenizer
from tenants.limits import EffectiveLimits

_longest_token: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def vocab_size(tokenizer: PromptTokenizer) -> int | None:
    """Token ids the model's tokenizer knows (None when the engine runs without one)."""
    return None if tokenizer.tokenizer is None else tokenizer.tokenizer.get_vocab_size(with_added_tokens=True)


def longest_token_chars(tokenizer: PromptTokenizer) -> int:
    """The most characters one token stands for (computed once per tokenizer)."""
    cached = _longest_token.get(tokenizer)
    if cached is None:
        vocab = tokenizer.tokenizer.get_vocab(with_added_tokens=True)
        cached = _longest_token[tokenizer] = max(map(len, vocab), default=1)
    return cached


def check_text_length(tokenizer: PromptTokenizer, limits: EffectiveLimits, chars: int, param: str) -> None:
    if tokenizer.tokenizer is None:
        return  # the engine has no tokenizer: text is refused when it is encoded
    bound = limits.max_prompt_tokens * longest_token_chars(tokenizer)
    if chars > bound:
        raise OpenAIError(f"The prompt has {chars} characters: more than this API key's limit of "
                          f"{limits.max_prompt_tokens} tokens can hold.", param=param, code="prompt_too_long")


def check_token_ids(tokenizer: PromptTokenizer, limits: EffectiveLimits, prompts: list, data: dict) -> None:
    """Token-id prompts within the prompt cap and the vocabulary; top_k and stop_token_ids too."""
    vocab = vocab_size(tokenizer)
    for prompt in prompts:
        if isinstance(prompt, list) and len(prompt) > limits.max_prompt_tokens:
            raise OpenAIError(f"The prompt has {len(prompt)} tokens; this API key allows at most "
                              f"{limits.max_prompt_tokens}.", param="prompt", code="prompt_too_long")
    if vocab is None:
        return  # the engine checks ids against its model at its door
    for prompt in prompts:
        if isinstance(prompt, list) and max(prompt) >= vocab:
            raise invalid("prompt", f"Token id {max(prompt)} is out of range: the model's vocabulary has {vocab} "
                                    "tokens.", code="invalid_token_id")
    if (data.get("top_k") or 0) > vocab:
        raise invalid("top_k", f"top_k is {data['top_k']}; the model's vocabulary has {vocab} tokens.")
    if any(t >= vocab for t in data.get("stop_token_ids") or []):
        raise invalid("stop_token_ids", f"Stop token ids must be below the vocabulary size {vocab}.",
                      code="invalid_token_id")


def chat_chars(messages: list[dict], tools: list[dict] = ()) -> int:
    """Characters the template will render from the caller: contents, names, tool calls and tools."""
    calls = [call["function"] for m in messages for call in m.get("tool_calls") or ()]
    return (sum(len(m.get("content") or "") + len(m.get("name") or "") for m in messages)
            + sum(len(c["name"]) + len(c["arguments"]) for c in calls) + len(json.dumps(list(tools))))
