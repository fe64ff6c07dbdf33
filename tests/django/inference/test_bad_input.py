"""Malformed requests, table-driven: each gets a 4xx in OpenAI's error shape, never a 5xx."""
from __future__ import annotations

import json

import pytest

from .conftest import MODEL

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "Hi"}]


def chat(**fields):
    return {"model": MODEL, "messages": MSG, "max_tokens": 2, **fields}


def completion(**fields):
    return {"model": MODEL, "prompt": "Hi", "max_tokens": 2, **fields}


CASES = [  # (id, path, body: dict or raw bytes, status, param expected in the error or None)
    ("broken json", CHAT, b'{"model": ', 400, None),
    ("json array body", CHAT, b"[1, 2]", 400, None),
    ("json string body", COMPLETIONS, b'"hello"', 400, None),
    ("empty body", CHAT, b"", 400, None),
    ("not utf-8", CHAT, b"\xff\xfe{}", 400, None),
    ("NaN literal", CHAT, b'{"model": "m", "messages": [], "temperature": NaN}', 400, None),
    ("missing model", CHAT, {"messages": MSG}, 400, "model"),
    ("model not a string", CHAT, chat(model=5), 400, "model"),
    ("unknown model", CHAT, chat(model="no-such-model"), 404, "model"),
    ("missing messages", CHAT, {"model": MODEL}, 400, "messages"),
    ("messages empty", CHAT, chat(messages=[]), 400, "messages"),
    ("messages not a list", CHAT, chat(messages="hi"), 400, "messages"),
    ("message without role", CHAT, chat(messages=[{"content": "hi"}]), 400, "messages[0].role"),
    ("message bad role", CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), 400, "messages[0].role"),
    ("message content number", CHAT, chat(messages=[{"role": "user", "content": 5}]), 400, "messages[0].content"),
    ("message content part image", CHAT, chat(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]), 400, "messages[0].content[0].image_url"),
    ("message unknown field", CHAT, chat(messages=[{"role": "user", "content": "hi", "mood": "x"}]), 400,
     "messages[0].mood"),
    ("unknown top-level field", CHAT, chat(frobnicate=True), 400, "frobnicate"),
    ("temperature string", CHAT, chat(temperature="0.5"), 400, "temperature"),
    ("temperature too high", CHAT, chat(temperature=2.5), 400, "temperature"),
    ("temperature negative", CHAT, chat(temperature=-0.1), 400, "temperature"),
    ("top_p zero", CHAT, chat(top_p=0), 400, "top_p"),
    ("top_p above one", CHAT, chat(top_p=1.5), 400, "top_p"),
    ("n zero", CHAT, chat(n=0), 400, "n"),
    ("n too large", CHAT, chat(n=1000), 400, "n"),
    ("n float", CHAT, chat(n=1.5), 400, "n"),
    ("n bool", CHAT, chat(n=True), 400, "n"),
    ("max_tokens zero", CHAT, chat(max_tokens=0), 400, "max_tokens"),
    ("max_tokens negative", CHAT, chat(max_tokens=-5), 400, "max_tokens"),
    ("max_tokens string", CHAT, chat(max_tokens="10"), 400, "max_tokens"),
    ("max_tokens over the key's cap", CHAT, chat(max_tokens=100_000), 400, "max_tokens"),
    ("max_completion_tokens zero", CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    ("stream not bool", CHAT, chat(stream="yes"), 400, "stream"),
    ("stream_options without stream", CHAT, chat(stream_options={"include_usage": True}), 400, "stream_options"),
    ("stream_options unknown key", CHAT, chat(stream=True, stream_options={"x": 1}), 400, "stream_options.x"),
    ("stop not string", CHAT, chat(stop=5), 400, "stop"),
    ("stop empty string", CHAT, chat(stop=[""]), 400, "stop"),
    ("stop too many", CHAT, chat(stop=[str(i) for i in range(20)]), 400, "stop"),
    ("presence_penalty range", CHAT, chat(presence_penalty=3), 400, "presence_penalty"),
    ("frequency_penalty range", CHAT, chat(frequency_penalty=-3), 400, "frequency_penalty"),
    ("seed string", CHAT, chat(seed="42"), 400, "seed"),
    ("top_logprobs without logprobs", CHAT, chat(top_logprobs=2), 400, "top_logprobs"),
    ("top_logprobs too many", CHAT, chat(logprobs=True, top_logprobs=50), 400, "top_logprobs"),
    ("logprobs int on chat", CHAT, chat(logprobs=3), 400, "logprobs"),
    ("tool name with a space", CHAT, chat(tools=[{"type": "function", "function": {"name": "f g"}}]), 400,
     "tools[0].function.name"),
    ("tool_choice of an undeclared tool", CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}],
                                                    tool_choice={"type": "function", "function": {"name": "g"}}),
     400, "tool_choice"),
    ("tool_choice without tools", CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    ("response_format xml", CHAT, chat(response_format={"type": "xml"}), 400, "response_format.type"),
    ("json_schema that does not compile", CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "objectx"}}}), 400, "response_format"),
    ("regex that does not compile", COMPLETIONS, completion(structured_outputs={"regex": "a(b"}), 400, "structured_outputs"),
    ("two structured outputs", COMPLETIONS, completion(guided_regex="a+", guided_choice=["a"]), 400, "guided_choice"),
    ("structured_outputs with two kinds", COMPLETIONS, completion(structured_outputs={"regex": "a", "choice": ["a"]}), 400,
     "structured_outputs"),
    ("logit_bias given", CHAT, chat(logit_bias={"50256": -100}), 400, "logit_bias"),
    ("top_k below -1", CHAT, chat(top_k=-2), 400, "top_k"),
    ("min_p above one", CHAT, chat(min_p=1.5), 400, "min_p"),
    ("repetition_penalty zero", CHAT, chat(repetition_penalty=0), 400, "repetition_penalty"),
    ("min_tokens above max_tokens", CHAT, chat(min_tokens=5, max_tokens=2), 400, "min_tokens"),
    ("user not a string", CHAT, chat(user=123), 400, "user"),
    ("huge prompt", CHAT, chat(messages=[{"role": "user", "content": "word " * 20_000}]), 400, "prompt"),
    ("completion prompt missing", COMPLETIONS, {"model": MODEL}, 400, "prompt"),
    ("completion prompt number", COMPLETIONS, completion(prompt=5), 400, "prompt"),
    ("completion prompt empty list", COMPLETIONS, completion(prompt=[]), 400, "prompt"),
    ("completion prompt mixed list", COMPLETIONS, completion(prompt=["a", 5]), 400, "prompt"),
    ("completion negative token id", COMPLETIONS, completion(prompt=[1, -2]), 400, "prompt"),
    ("completion token id beyond vocab", COMPLETIONS, completion(prompt=[1, 10**9]), 400, None),
    ("completion logprobs too many", COMPLETIONS, completion(logprobs=50), 400, "logprobs"),
    ("completion logprobs bool", COMPLETIONS, completion(logprobs=True), 400, "logprobs"),
    ("completion echo string", COMPLETIONS, completion(echo="true"), 400, "echo"),
    ("completion suffix", COMPLETIONS, completion(suffix="end"), 400, "suffix"),
    ("completion best_of", COMPLETIONS, completion(best_of=3), 400, "best_of"),
    ("completion prompt too long for context", COMPLETIONS, completion(prompt=[1] * 8000, max_tokens=1000), 400,
     "max_tokens"),
]


@pytest.fixture(scope="module")
def http(live):
    client = live.http()
    client.headers["Authorization"] = f"Bearer {live.new_key(max_tokens_cap=1000)}"
    yield client
    client.close()


@pytest.mark.parametrize("name, path, body, status, param", CASES, ids=[c[0] for c in CASES])
def test_malformed_request_is_a_4xx_in_openai_shape(http, name, path, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = http.post(path, content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == ("invalid_request_error" if status == 400 else error["type"])
    if param is not None:
        assert error["param"] == param, error


def test_wrong_content_type_and_method_and_url(http):
    assert http.post(CHAT, content=b"model=x", headers={"Content-Type": "application/x-www-form-urlencoded"}
                     ).status_code == 415
    for response, status in ((http.get(CHAT), 405), (http.get("/v1/nothing-here"), 404)):
        assert response.status_code == status and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_there_are_at_least_forty_cases():
    assert len(CASES) >= 40
