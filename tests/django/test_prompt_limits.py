"""What is checked before a prompt is tokenized, and that tokenizing leaves the event loop free
(issue 15, findings 1 and 4). A real model card (the bundled model's tokenizer and template) is
published in Redis as an engine publishes it; no engine runs, so every call here is refused
before it would reach one."""
from __future__ import annotations

import asyncio
import json
import time
import uuid

import pytest
import redis
from django.conf import settings

from engine.service.protocol import ModelCard, encode
from engine.service.transport import Keys
from engine.tokenization import load_tokenizer
from engine.weights.source import ModelSource, bundled_model_path
from inference import services
from inference.engine_client import get_engine_client, prompt_tokenizers
from inference.errors import OpenAIError
from inference.serializers import ChatCompletionRequestSerializer, validated
from tenants.services import create_api_key, create_tenant

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "Hi"}]


@pytest.fixture(scope="module")
def model():
    """A model name whose card is in Redis (the bundled model's tokenizer, template and context)."""
    tokenizer = load_tokenizer(ModelSource("gguf", path=bundled_model_path()))
    name = f"card-only-{uuid.uuid4().hex[:8]}"
    card = ModelCard(name, 8192, tokenizer.backend_tokenizer.to_str(), tokenizer.chat_template,
                     {"bos_token": tokenizer.bos_token, "eos_token": tokenizer.eos_token})
    connection = redis.Redis.from_url(settings.REDIS_URL)
    key = Keys(settings.ENGINE_KEY_PREFIX).model_card(name)
    connection.set(key, encode(card))
    yield name
    connection.delete(key)


def new_key(**limits) -> str:
    tenant = create_tenant(name=f"limits-{uuid.uuid4().hex[:8]}", **{"requests_per_minute": 10_000, **limits})
    forget_rate_limits(tenant.pk)
    return create_api_key(tenant=tenant)[1]


def forget_rate_limits(tenant_id: int) -> None:
    """Rolled-back tests reuse tenant ids: a new tenant must not inherit an old one's counters."""
    connection = redis.Redis.from_url(settings.REDIS_URL)
    for key in connection.scan_iter(match=f"{settings.ENGINE_KEY_PREFIX}:ratelimit:{{t{tenant_id}}}:*"):
        connection.delete(key)


def post(client, key: str, path: str, body: dict):
    return client.post(path, data=json.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {key}")


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.content[:500]
    return response.json()["error"]


def test_token_ids_top_k_and_stop_ids_are_checked_against_the_vocabulary(client, db, model):
    key = new_key()
    vocab = 49152  # SmolLM2's
    cases = [(COMPLETIONS, {"prompt": [1, vocab], "echo": True}, "prompt"),
             (COMPLETIONS, {"prompt": [[1], [2, 2**31 - 1]]}, "prompt"),
             (CHAT, {"messages": MSG, "top_k": vocab + 1}, "top_k"),
             (CHAT, {"messages": MSG, "stop_token_ids": [0, vocab]}, "stop_token_ids")]
    for path, body, param in cases:
        error = error_of(post(client, key, path, {"model": model, **body}), 400)
        assert error["param"] == param and str(vocab) in error["message"], error


def test_too_much_text_is_refused_before_it_is_tokenized(client, db, model):
    key = new_key(max_prompt_tokens=100)  # the longest SmolLM2 token is 81 characters: 8,100 at most
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": "x" * 4000}] * 3}),
                       (COMPLETIONS, {"prompt": ["ok", "y" * 8101]})):
        error = error_of(post(client, key, path, {"model": model, **body}), 400)
        assert error["code"] == "prompt_too_long" and "characters" in error["message"], error
    error = error_of(post(client, key, COMPLETIONS, {"model": model, "prompt": [7] * 101}), 400)
    assert error["code"] == "prompt_too_long" and "101 tokens" in error["message"]
    # Within the character bound, the token count decides (after tokenizing): 8,100 '#' fit in 100 tokens.
    error = error_of(post(client, key, COMPLETIONS, {"model": model, "prompt": "# " * 4000}), 400)
    assert error["code"] == "prompt_too_long" and "tokens" in error["message"]


def test_refusals_after_tokenizing_count_and_a_tenant_at_its_limit_is_refused_first(client, db, model):
    key = new_key(requests_per_minute=2, max_prompt_tokens=10)
    for _ in range(2):
        assert error_of(post(client, key, COMPLETIONS, {"model": model, "prompt": "word " * 50}), 400)["code"] == \
            "prompt_too_long"
    error = error_of(post(client, key, COMPLETIONS, {"model": model, "prompt": "word " * 50}), 429)
    assert error["code"] == "rate_limit_exceeded" and "(RPM)" in error["message"]


def test_tokenizing_a_long_chat_leaves_the_event_loop_free(db, model):
    """A ~180k-token chat is tokenized (then refused: longer than the context) while a ticker on the
    same loop keeps ticking: the loop never stalls for as long as the tokenizing takes."""
    from tenants.models import ApiKey

    raw = new_key(max_prompt_tokens=1_000_000)
    api_key = ApiKey.objects.select_related("tenant").get(prefix=raw.split(".")[0])
    data = validated(ChatCompletionRequestSerializer, {"model": model, "messages": [
        {"role": "user", "content": "lorem ipsum dolor sit amet " * 9000}] * 4, "max_tokens": 4})

    async def main():
        gaps, stop = [], asyncio.Event()

        async def tick():
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.002)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        await prompt_tokenizers.get(get_engine_client(), model)  # built once per model card, not per call
        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.02)
        started = time.monotonic()
        with pytest.raises(OpenAIError) as refused:
            await services.start_chat(api_key=api_key, data=data)
        took = time.monotonic() - started
        stop.set()
        await ticker
        return refused.value, took, max(gaps)

    error, took, worst_gap = asyncio.run(main())
    assert error.code == "context_length_exceeded", error.body()
    print(f"tokenizing took {took:.3f} s, the loop stalled at most {worst_gap:.3f} s")
    assert took > 0.15, f"tokenizing took {took:.3f} s: make the chat longer"
    assert worst_gap < took / 2, f"the loop stalled {worst_gap:.3f} s of {took:.3f} s"
