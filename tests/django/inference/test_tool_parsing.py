"""Tool calling's pure parts, fast: the parsers of each model family, the per-choice streams that turn
output into content and tool-call deltas, what templates are given, and the grammars that enforce
`required` and named choices."""
from __future__ import annotations

import json

import pytest

from inference.structured_outputs import checked_constraint, requested_constraint
from inference.errors import OpenAIError
from inference.tool_call_streams import AutoToolStream, NamedToolStream, RequiredToolStream
from inference.tool_parsers import parse_tool_calls, parser_for_template
from inference.tools import ToolPlan

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
NAMES = {"get_weather"}


def plan(**data) -> ToolPlan:
    return ToolPlan.of({"tools": [WEATHER], **data}, None)


@pytest.mark.parametrize("parser, text, content", [
    ("hermes", 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', "Sure."),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}', ""),
    ("llama3_json", ' {"name": "get_weather", "parameters": {"city": "Oslo"}}', ""),
    ("mistral", 'Ok [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Oslo"}}]', "Ok"),
])
def test_each_family_parser_reads_its_calls(parser, text, content):
    found_content, calls = parse_tool_calls(parser, text, NAMES)
    assert found_content == content
    [call] = calls
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Oslo"}


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not a declared tool
    '<tool_call>{"name": "get_weather", "arguments": {"city": </tool_call>',  # not JSON
    'Just words about {"name": "get_weather"}.',
])
def test_what_is_not_a_valid_call_stays_content(text):
    assert parse_tool_calls("hermes", text, NAMES) == (text, [])


def test_the_family_is_read_from_the_template():
    assert parser_for_template("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert parser_for_template("{{ '<|python_tag|>' }}") == "llama3_json"
    assert parser_for_template("<|im_start|>") == parser_for_template(None) == "hermes"


def test_auto_stream_sends_content_holds_back_a_possible_marker_and_sends_the_call_at_the_end():
    stream = AutoToolStream(plan())
    pieces = ["Let me ", "check.<tool", "_call>\n{\"name\": \"get_weather\", ", "\"arguments\": {\"city\": \"Rome\"}}",
              "\n</tool_call>"]
    sent = [stream.feed(piece) for piece in pieces]
    assert "".join(content for content, _ in sent) == "Let me check."
    assert all(calls == [] for _, calls in sent)
    assert sent[1] == ("check.", [])  # "<tool" could start the marker: held back
    content, calls = stream.finish()
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_weather"] and calls[0]["index"] == 0
    assert stream.content == "Let me check." and len(stream.calls) == 1


def test_auto_stream_without_a_call_releases_what_it_held_back():
    stream = AutoToolStream(plan())
    assert stream.feed("a < b and <tool") == ("a < b and ", [])
    assert stream.finish() == ("<tool", [])
    assert stream.calls == [] and stream.content == "a < b and <tool"


def test_auto_stream_keeps_one_call_when_parallel_calls_are_off():
    stream = AutoToolStream(plan(parallel_tool_calls=False))
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "X"}}</tool_call>'
    stream.feed(call + call)
    assert len(stream.finish()[1]) == 1


def test_named_stream_names_the_call_once_then_streams_arguments():
    stream = NamedToolStream(plan(tool_choice={"type": "function", "function": {"name": "get_weather"}}))
    first, second = stream.feed('{"city": '), stream.feed('"Oslo"}')
    assert first[1][0]["function"] == {"name": "get_weather", "arguments": '{"city": '} and first[1][0]["id"]
    assert second[1] == [{"index": 0, "function": {"arguments": '"Oslo"}'}}]
    assert stream.finish() == ("", []) and stream.calls[0]["function"]["arguments"] == '{"city": "Oslo"}'


def test_required_stream_reads_the_list_when_complete():
    stream = RequiredToolStream(plan(tool_choice="required"))
    stream.feed('[{"name": "get_weather", "arguments": {"city": "Oslo"}}]')
    _, calls = stream.finish()
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [{"city": "Oslo"}]


def test_required_and_named_choices_are_grammars_that_compile():
    required = plan(tool_choice="required", parallel_tool_calls=False).constraint()
    schema = required.json
    assert schema["maxItems"] == 1 and schema["items"]["anyOf"][0]["properties"]["name"] == {"const": "get_weather"}
    checked_constraint("tools", required.as_dict())
    named = plan(tool_choice={"type": "function", "function": {"name": "get_weather"}}).constraint()
    assert named.json == WEATHER["function"]["parameters"]
    assert plan().constraint() is None and plan(tool_choice="none").constraint() is None


def test_a_template_without_tools_gets_them_the_hermes_way():
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "A"}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    rendered, tools = plan().template_inputs(messages, "{{ messages }}")
    assert tools is None and rendered[0]["role"] == "system" and "<tools>" in rendered[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>' == rendered[2]["content"]
    assert rendered[3]["content"] == "<tool_response>\nsunny\n</tool_response>"
    native, tools = plan().template_inputs(messages, "{% for t in tools %}{% endfor %}")
    assert tools == [WEATHER] and native[1]["tool_calls"][0]["function"]["arguments"] == {"city": "A"}
    assert native[1]["content"] == ""


def test_one_constraint_per_call():
    assert requested_constraint({"response_format": {"type": "json_object"}}) == ("response_format", {"json_object": True})
    assert requested_constraint({"guided_choice": ["a"]}) == ("guided_choice", {"choice": ["a"]})
    with pytest.raises(OpenAIError) as refused:
        requested_constraint({"response_format": {"type": "json_object"}, "guided_regex": "a"})
    assert refused.value.param == "guided_regex"
    with pytest.raises(OpenAIError, match="cannot be compiled"):
        checked_constraint("structured_outputs", {"json": {"type": "objectx"}})
