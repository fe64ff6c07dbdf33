"""The official `openai` SDK (sync and async) against a live daphne server and a real engine."""
from __future__ import annotations

import asyncio

import pytest

from tenants.models import UsageEvent
from tests.service.conftest import wait_until

from .conftest import MODEL

pytestmark = pytest.mark.timeout(300)
GREEDY = {"temperature": 0, "max_tokens": 12}
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def key(live):
    return live.new_key()


@pytest.fixture(scope="module")
def client(live, key):
    return live.openai(key)


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_completion(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 10
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert "Paris" in choice.message.content


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True,
                                                 stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n2_gives_two_choices(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, temperature=0, max_tokens=6)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content == reply.choices[1].message.content  # greedy twice
    single = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0, max_tokens=6)
    assert reply.choices[0].message.content == single.choices[0].message.content
    assert reply.usage.completion_tokens == 2 * single.usage.completion_tokens
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens


def test_completion_with_stop_sequence(client):
    prompt = "The capital of France is"
    free = client.completions.create(model=MODEL, prompt=prompt, **GREEDY).choices[0].text
    word = free.split()[1]
    stopped = client.completions.create(model=MODEL, prompt=prompt, stop=[word], **GREEDY).choices[0]
    assert stopped.finish_reason == "stop"
    assert stopped.text == free[:free.index(word)]


def test_completion_logprobs_and_echo(client):
    prompt = "The capital of France is"
    reply = client.completions.create(model=MODEL, prompt=prompt, logprobs=2, echo=True, temperature=0, max_tokens=4)
    choice = reply.choices[0]
    assert choice.text.startswith(prompt)
    logprobs = choice.logprobs
    generated = len(logprobs.tokens) - reply.usage.prompt_tokens
    assert generated == reply.usage.completion_tokens == 4
    assert logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [sum(len(t) for t in logprobs.tokens[:i]) for i in range(len(logprobs.tokens))]
    for token, logprob, top in zip(logprobs.tokens[-generated:], logprobs.token_logprobs[-generated:],
                                   logprobs.top_logprobs[-generated:]):
        assert top[token] == logprob and max(top.values()) == logprob  # greedy: the chosen token is the top one


def test_chat_logprobs(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, logprobs=True, top_logprobs=3, **GREEDY)
    content = reply.choices[0].logprobs.content
    assert len(content) in (reply.usage.completion_tokens, reply.usage.completion_tokens - 1)  # minus EOS
    assert "".join(item.token for item in content) == reply.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.top_logprobs[0].logprob == item.logprob  # greedy
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)


def test_async_client_concurrent_calls(live, key):
    async def main():
        client = live.async_openai(key)
        replies = await asyncio.gather(*(client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Count to {i}"}], **GREEDY) for i in range(6)))
        stream = await client.completions.create(model=MODEL, prompt="Hello", stream=True, **GREEDY)
        pieces = [chunk.choices[0].text async for chunk in stream]
        await client.close()
        return replies, pieces

    replies, pieces = asyncio.run(main())
    assert all(r.choices[0].message.content for r in replies)
    assert len({r.id for r in replies}) == 6
    assert "".join(pieces)


def test_usage_is_recorded_per_call(live):
    key = live.new_key()
    reply = live.openai(key).chat.completions.create(model=MODEL, messages=MESSAGES, **GREEDY)
    event = wait_until(lambda: UsageEvent.objects.filter(request_id=reply.id).first(), 30, "the usage event")
    assert (event.prompt_tokens, event.completion_tokens) == (reply.usage.prompt_tokens,
                                                              reply.usage.completion_tokens)
    assert event.status == "ok" and event.endpoint == "chat.completions" and event.model == MODEL


def test_plain_streams_made_into_text_by_the_web_process_read_as_the_engine_writes_them(client):
    """Without stop strings or logprobs the replica sends token ids and the web process makes the
    text (inference/stream_text.py); a stop string that never matches keeps it in the engine. Sampled
    from a seed, so both get the same tokens, odd ones included; streamed and not, n=2."""
    sampled = {"temperature": 1.5, "seed": 11, "max_tokens": 32, "n": 2}
    prompt = "Emoji and accents: 😀 café"
    plain = client.completions.create(model=MODEL, prompt=prompt, **sampled)
    in_engine = client.completions.create(model=MODEL, prompt=prompt, stop=["\u0000\u0001"], **sampled)
    assert [c.text for c in plain.choices] == [c.text for c in in_engine.choices]
    assert all(c.text for c in plain.choices)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True, **sampled))
    streamed = {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk.choices:
            streamed[choice.index] += choice.text
    assert [streamed[0], streamed[1]] == [c.text for c in in_engine.choices]
