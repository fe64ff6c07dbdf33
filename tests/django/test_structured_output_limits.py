"""Hostile constraints are 400s naming the field, checked before anything is queued (fast: no stack).

A schema sent as text nested 100k deep made json.loads raise RecursionError (a 500); one nested a
few hundred deep overflowed the encoders on the way (json.dumps of the grammar key, Jinja's tojson
of a tool's parameters). Both are refused by depth now, with the limit in the message.
"""
import json

import pytest

from engine.structured_outputs.params import MAX_CHOICES, MAX_SCHEMA_DEPTH, MAX_SPEC_CHARS, StructuredOutputsParams
from inference.errors import OpenAIError
from inference.serializers import ChatCompletionRequestSerializer, CompletionRequestSerializer, validated
from inference.structured_outputs import checked_constraint

MSG = [{"role": "user", "content": "Hi"}]


def nested_schema(levels: int) -> dict:
    """An object schema `levels` objects deep (two JSON levels each: the schema and its properties)."""
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


def error_of(call) -> OpenAIError:
    with pytest.raises(OpenAIError) as caught:
        call()
    assert caught.value.status == 400
    return caught.value


@pytest.mark.parametrize("spec, words", [
    ({"json": "[" * 100_000 + "]" * 100_000}, f"nested deeper than {MAX_SCHEMA_DEPTH}"),
    ({"json": nested_schema(MAX_SCHEMA_DEPTH)}, f"nested deeper than {MAX_SCHEMA_DEPTH}"),
    ({"json": json.dumps(nested_schema(MAX_SCHEMA_DEPTH))}, f"nested deeper than {MAX_SCHEMA_DEPTH}"),
    ({"json": {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(4000)}}},
     f"longer than {MAX_SPEC_CHARS}"),
    ({"regex": "a" * (MAX_SPEC_CHARS + 1)}, f"longer than {MAX_SPEC_CHARS}"),
    ({"choice": [str(i) for i in range(MAX_CHOICES + 1)]}, f"1 to {MAX_CHOICES}"),
    ({"json": "{not json"}, "not valid JSON"),
    ({"regex": "(unclosed"}, "cannot be compiled"),
    ({"grammar": "start: undefined_rule"}, "cannot be compiled"),
    ({"json": {"type": "no-such-type"}}, "cannot be compiled"),
])
def test_a_hostile_constraint_is_a_400_naming_the_problem(spec, words):
    error = error_of(lambda: checked_constraint("structured_outputs", spec))
    assert error.param == "structured_outputs" and words in error.message


def test_a_schema_within_the_limits_compiles():
    """A schema of 60 objects in one another (near llguidance's own limit: its JSON parser stops at 128 levels)
    and a wide one are accepted."""
    checked_constraint("structured_outputs", {"json": nested_schema(60)})
    wide = {"type": "object", "properties": {f"p{i}": {"type": "integer"} for i in range(1500)}}
    assert checked_constraint("structured_outputs", {"json": wide}).json == wide


@pytest.mark.parametrize("field, value", [
    ("response_format", {"type": "json_schema", "json_schema": {"name": "deep", "schema": nested_schema(400)}}),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": nested_schema(400)}}]),
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": "[" * 100_000 + "]" * 100_000}}]),
    ("guided_json", "[" * 100_000 + "]" * 100_000),
])
def test_deep_schemas_in_any_chat_field_are_refused_by_the_serializer(field, value):
    error = error_of(lambda: validated(ChatCompletionRequestSerializer,
                                       {"model": "m", "messages": MSG, field: value}))
    assert f"nested deeper than {MAX_SCHEMA_DEPTH}" in error.message


def test_a_deep_guided_json_on_completions_is_refused():
    error = error_of(lambda: validated(CompletionRequestSerializer,
                                       {"model": "m", "prompt": "Hi", "guided_json": nested_schema(400)}))
    assert f"nested deeper than {MAX_SCHEMA_DEPTH}" in error.message


def test_params_built_offline_refuse_depth_with_a_value_error():
    with pytest.raises(ValueError, match="nested deeper"):
        StructuredOutputsParams(json=nested_schema(MAX_SCHEMA_DEPTH))
