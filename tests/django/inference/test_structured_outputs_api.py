"""Structured outputs and tool calling through the official `openai` SDK, against the live stack
(daphne, Redis, a real engine with the bundled model)."""
from __future__ import annotations

import asyncio
import json
import re
from typing import Literal

import jsonschema
import pytest
from pydantic import BaseModel, Field

from .conftest import MODEL

pytestmark = pytest.mark.timeout(600)

ADDRESS = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
           "required": ["city", "zip"], "additionalProperties": False}
SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 130}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"title": {"type": "string", "maxLength": 24},
                                      "genre": {"enum": ["fantasy", "crime", "poetry"]},
                                      "year": {"type": "integer", "minimum": 1500, "maximum": 2030}},
     "required": ["title", "genre", "year"], "additionalProperties": False},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "first": {"type": "string", "maxLength": 12}, "last": {"type": "string", "maxLength": 12}},
        "required": ["first", "last"], "additionalProperties": False}, "address": ADDRESS},
     "required": ["person", "address"], "additionalProperties": False},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]},
                                               "minItems": 1, "maxItems": 3},
                                      "count": {"type": "integer", "minimum": 1, "maximum": 9}},
     "required": ["tags", "count"], "additionalProperties": False},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 3, "items": {
        "type": "object", "properties": {"sku": {"type": "string", "maxLength": 8},
                                         "qty": {"type": "integer", "minimum": 1, "maximum": 99}},
        "required": ["sku", "qty"], "additionalProperties": False}},
        "paid": {"type": "boolean"}}, "required": ["items", "paid"], "additionalProperties": False},
]
TOPICS = ["a person", "a book", "a customer", "some colours", "an order", "a friend", "a novel", "a client",
          "a palette", "a purchase"]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The local time in a time zone.",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}


@pytest.fixture(scope="module")
def key(live):
    return live.new_key()


@pytest.fixture(scope="module")
def client(live, key):
    return live.openai(key)


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_fifty_json_schema_requests_validate_streamed_and_not(live, key):
    async def one(client, i: int):
        schema = SCHEMAS[i % len(SCHEMAS)]
        args = dict(model=MODEL, messages=user(f"Describe {TOPICS[i % len(TOPICS)]} as JSON."), max_tokens=200,
                    temperature=0.7, seed=i, response_format={
                        "type": "json_schema", "json_schema": {"name": f"s{i % len(SCHEMAS)}", "schema": schema}})
        if i % 2:
            stream = await client.chat.completions.create(stream=True, **args)
            text, finish = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                    finish = chunk.choices[0].finish_reason or finish
        else:
            reply = await client.chat.completions.create(**args)
            text, finish = reply.choices[0].message.content, reply.choices[0].finish_reason
        return schema, text, finish

    async def main():
        client = live.async_openai(key)
        return await asyncio.gather(*(one(client, i) for i in range(50)))

    for schema, text, finish in asyncio.run(main()):
        assert finish == "stop", text
        jsonschema.validate(json.loads(text), schema)


def test_json_object_mode(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("Give me a JSON object about cats."),
                                           response_format={"type": "json_object"}, max_tokens=150, temperature=0)
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_regex_and_choice_on_both_endpoints(client):
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    completion = client.completions.create(model=MODEL, prompt="Call me at", max_tokens=30, temperature=1.0, seed=1,
                                           extra_body={"structured_outputs": {"regex": phone}})
    assert re.fullmatch(phone, completion.choices[0].text), completion.choices[0].text
    chat = client.chat.completions.create(model=MODEL, messages=user("Is the sky blue?"), max_tokens=10,
                                          extra_body={"guided_choice": ["yes", "no"]})
    assert chat.choices[0].message.content in {"yes", "no"}
    streamed = client.completions.create(model=MODEL, prompt="Pick one:", max_tokens=10, stream=True,
                                         extra_body={"structured_outputs": {"choice": ["alpha", "beta", "gamma"]}})
    assert "".join(c.choices[0].text for c in streamed if c.choices) in {"alpha", "beta", "gamma"}
    lark = client.completions.create(model=MODEL, prompt="Count:", max_tokens=20, temperature=0,
                                     extra_body={"guided_grammar": 'start: "[" NUM ("," NUM)? ("," NUM)? "]"\nNUM: /[0-9]/'})
    assert re.fullmatch(r"\[\d(,\d){0,2}\]", lark.choices[0].text), lark.choices[0].text


class Pet(BaseModel):
    name: str = Field(max_length=16)
    species: Literal["cat", "dog", "bird"]
    age: int = Field(ge=0, le=30)


def test_parse_returns_a_pydantic_object(client):
    reply = client.chat.completions.parse(model=MODEL, messages=user("Describe a pet."), response_format=Pet,
                                          max_tokens=100, temperature=0)
    pet = reply.choices[0].message.parsed
    assert isinstance(pet, Pet) and pet.species in ("cat", "dog", "bird")


def test_a_named_tool_choice_calls_it_with_valid_arguments_streamed_and_not(client):
    args = dict(model=MODEL, messages=user("What is the weather in Paris?"), tools=[WEATHER, TIME],
                tool_choice={"type": "function", "function": {"name": "get_weather"}}, max_tokens=80, temperature=0)
    reply = client.chat.completions.create(**args)
    message = reply.choices[0].message
    [call] = message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert reply.choices[0].finish_reason == "stop"

    chunks = list(client.chat.completions.create(stream=True, **args))
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].function.name == "get_weather" and deltas[0].id
    assert len(deltas) > 2  # the arguments arrive piece by piece
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments


def test_required_tool_choice_calls_declared_tools(client):
    reply = client.chat.completions.create(model=MODEL, messages=user("What time is it in Tokyo?"),
                                           tools=[WEATHER, TIME], tool_choice="required", max_tokens=120,
                                           temperature=0, parallel_tool_calls=False)
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    tool = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_auto_tool_calls_are_parsed_from_the_models_text_streamed_and_not(client):
    """The Hermes parser reads `<tool_call>` blocks out of the text; a choice constraint makes the
    small model write one, so the test does not depend on its judgement."""
    written = 'Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}' \
              '\n</tool_call>'
    args = dict(model=MODEL, messages=user("Weather in Oslo?"), tools=[WEATHER], max_tokens=60,
                extra_body={"guided_choice": [written]})
    message = client.chat.completions.create(**args).choices[0].message
    [call] = message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Oslo", "unit": "celsius"}
    assert message.content == "Let me check."

    chunks = list(client.chat.completions.create(stream=True, **args))
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or ()]
    assert content == "Let me check."  # the call's markup never streams as content
    assert [d.function.name for d in calls] == ["get_weather"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]


def test_a_conversation_with_a_tool_result_goes_on(client):
    messages = [*user("What is the weather in Paris?"),
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21, "sky": "sunny"}'}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice="none",
                                           max_tokens=30, temperature=0)
    assert reply.choices[0].message.content and not reply.choices[0].message.tool_calls
    bare = client.chat.completions.create(model=MODEL, messages=messages[:1], max_tokens=30, temperature=0)
    assert reply.usage.prompt_tokens > bare.usage.prompt_tokens + 20  # the call and its result were in the prompt


def test_websocket_requests_carry_response_format_and_tools(live, key):
    from .test_streaming_transports import frames_until, ws_connect

    schema = SCHEMAS[0]
    with ws_connect(live, key) as socket:
        assert json.loads(socket.recv(timeout=30)) == {"type": "authenticated"}
        socket.send(json.dumps({"type": "request", "id": "json", "endpoint": "chat.completions", "body": {
            "model": MODEL, "messages": user("A person as JSON."), "max_tokens": 100, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}}}))
        socket.send(json.dumps({"type": "request", "id": "tool", "endpoint": "chat.completions", "body": {
            "model": MODEL, "messages": user("Weather in Rome?"), "max_tokens": 60, "temperature": 0,
            "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}}))
        frames = frames_until(socket, {"json", "tool"})
    chunks = {name: [f["data"] for f in frames if f["id"] == name and f["type"] == "chunk"] for name in ("json", "tool")}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks["json"] if c["choices"])
    jsonschema.validate(json.loads(text), schema)
    deltas = [d for c in chunks["tool"] if c["choices"] for d in c["choices"][0]["delta"].get("tool_calls") or ()]
    assert deltas[0]["function"]["name"] == "get_weather"
    arguments = json.loads("".join(d["function"]["arguments"] for d in deltas))
    jsonschema.validate(arguments, WEATHER["function"]["parameters"])
