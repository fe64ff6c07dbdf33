"""Input serializers of the OpenAI-compatible API: exactly what OpenAI (and vLLM's extras) accept.

Unknown fields are refused as OpenAI refuses them ("Unrecognized request argument supplied"),
types are strict, and ranges are OpenAI's. Output shapes are documented for the OpenAPI schema.
"""
from __future__ import annotations

import re

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ValidationError

from engine.structured_outputs.params import MAX_CHOICES, MAX_SPEC_CHARS, check_schema_depth, schema_from_text
from inference.errors import from_drf
from inference.fields import (
    MAX_TOKEN_ID, PromptField, StopField, StrictBooleanField, StrictCharField, StrictFloatField, StrictIntegerField,
    is_text,
)

MAX_N = 128
MAX_LOGPROBS = 20
MAX_NAME_CHARS = 64
MAX_TOOLS = 128
NAME_PATTERN = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for function and schema names


def validated(serializer_class, data) -> dict:
    """The serializer's validated data, or an OpenAIError naming the first bad field: one rule for
    HTTP views, websocket frames and batch lines."""
    serializer = serializer_class(data=data)
    if not serializer.is_valid():
        raise from_drf(ValidationError(serializer.errors))
    return serializer.validated_data


class StrictSerializer(serializers.Serializer):
    """Refuses fields it does not declare."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            unknown = sorted(set(data) - set(self.fields))
            if unknown:
                name = unknown[0][:MAX_NAME_CHARS]  # the error quotes it: a megabyte-long key stays out
                raise serializers.ValidationError({name: f"Unrecognized request argument supplied: {name}"})
        return super().to_internal_value(data)


class StreamOptionsSerializer(StrictSerializer):
    include_usage = StrictBooleanField(required=False, default=False)


@extend_schema_field({"type": "object", "additionalProperties": True})
class JsonSchemaField(serializers.Field):
    """A JSON Schema: an object (or, as vLLM takes it, the text of one)."""

    def to_internal_value(self, data):
        try:
            if isinstance(data, str):
                data = schema_from_text(data, "The schema")
            if not isinstance(data, dict):
                raise serializers.ValidationError("Must be a JSON Schema object.")
            check_schema_depth(data, "The schema")
        except ValueError as error:
            raise serializers.ValidationError(str(error)) from None
        return data

    def to_representation(self, value):
        return value


class NameField(StrictCharField):
    """A function's or a schema's name, by OpenAI's rule."""

    def __init__(self, **kwargs) -> None:
        super().__init__(max_length=64, **kwargs)

    def to_internal_value(self, data):
        value = super().to_internal_value(data)
        if not NAME_PATTERN.fullmatch(value):
            raise serializers.ValidationError("Must be letters, digits, underscores and dashes (at most 64).")
        return value


class JsonSchemaFormatSerializer(StrictSerializer):
    name = NameField()
    description = StrictCharField(required=False, allow_blank=True, max_length=MAX_SPEC_CHARS)
    schema = JsonSchemaField(required=False, allow_null=True)
    strict = StrictBooleanField(required=False, allow_null=True)


class ResponseFormatSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["text", "json_object", "json_schema"])
    json_schema = JsonSchemaFormatSerializer(required=False)

    def validate(self, data):
        if data["type"] == "json_schema" and "json_schema" not in data:
            raise serializers.ValidationError({"json_schema": "response_format of type json_schema needs json_schema."})
        return data


class StructuredOutputsSerializer(StrictSerializer):
    """vLLM's `structured_outputs`: exactly one constraint (checked with the grammar library later)."""

    json = JsonSchemaField(required=False)
    regex = StrictCharField(required=False, max_length=MAX_SPEC_CHARS)
    choice = serializers.ListField(child=StrictCharField(max_length=MAX_SPEC_CHARS), required=False,
                                   allow_empty=False, max_length=MAX_CHOICES)
    grammar = StrictCharField(required=False, max_length=MAX_SPEC_CHARS)
    json_object = StrictBooleanField(required=False)


class SamplingRequestSerializer(StrictSerializer):
    """Fields common to completions and chat completions."""

    model = StrictCharField(max_length=200)
    n = StrictIntegerField(required=False, min_value=1, max_value=MAX_N, default=1)
    temperature = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=2)
    top_p = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=1)
    stop = StopField(required=False, allow_null=True)
    seed = StrictIntegerField(required=False, allow_null=True, min_value=-(2**63), max_value=2**63 - 1)
    presence_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2, max_value=2)
    frequency_penalty = StrictFloatField(required=False, allow_null=True, min_value=-2, max_value=2)
    stream = StrictBooleanField(required=False, default=False)
    stream_options = StreamOptionsSerializer(required=False, allow_null=True)
    user = StrictCharField(required=False, max_length=256, allow_blank=True)
    logit_bias = serializers.DictField(required=False, allow_null=True, allow_empty=True)
    # vLLM's extra sampling parameters.
    top_k = StrictIntegerField(required=False, allow_null=True, min_value=-1, max_value=MAX_TOKEN_ID)  # vocab: services
    min_p = StrictFloatField(required=False, allow_null=True, min_value=0, max_value=1)
    repetition_penalty = StrictFloatField(required=False, allow_null=True, min_value=0.01, max_value=10)
    min_tokens = StrictIntegerField(required=False, min_value=0, default=0)
    ignore_eos = StrictBooleanField(required=False, default=False)
    skip_special_tokens = StrictBooleanField(required=False, default=True)
    include_stop_str_in_output = StrictBooleanField(required=False, default=False)
    stop_token_ids = serializers.ListField(child=StrictIntegerField(min_value=0, max_value=MAX_TOKEN_ID),
                                           required=False, allow_null=True, max_length=64)
    # Structured outputs: OpenAI's response_format, vLLM's structured_outputs and its older guided_* names.
    response_format = ResponseFormatSerializer(required=False, allow_null=True)
    structured_outputs = StructuredOutputsSerializer(required=False, allow_null=True)
    guided_json = JsonSchemaField(required=False, allow_null=True)
    guided_regex = StrictCharField(required=False, allow_null=True, max_length=MAX_SPEC_CHARS)
    guided_choice = serializers.ListField(child=StrictCharField(max_length=MAX_SPEC_CHARS), required=False,
                                          allow_null=True, allow_empty=False, max_length=MAX_CHOICES)
    guided_grammar = StrictCharField(required=False, allow_null=True, max_length=MAX_SPEC_CHARS)

    def validate_top_p(self, value):
        if value is not None and value <= 0:
            raise serializers.ValidationError("Must be greater than 0.")
        return value

    def validate_logit_bias(self, value):
        if value:
            raise serializers.ValidationError("logit_bias is not supported by this server.")
        return value

    def validate(self, data):
        if data.get("stream_options") and not data.get("stream"):
            raise serializers.ValidationError({"stream_options": "stream_options is only allowed when stream is true."})
        return data


class CompletionRequestSerializer(SamplingRequestSerializer):
    prompt = PromptField()
    max_tokens = StrictIntegerField(required=False, allow_null=True, min_value=0)  # 0: score the prompt
    logprobs = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=MAX_LOGPROBS)
    echo = StrictBooleanField(required=False, default=False)
    best_of = StrictIntegerField(required=False, allow_null=True, min_value=1, max_value=MAX_N)
    suffix = StrictCharField(required=False, allow_null=True, allow_blank=True, trim_whitespace=False)

    def validate_suffix(self, value):
        if value:
            raise serializers.ValidationError("suffix is not supported by this server.")
        return value

    def validate(self, data):
        data = super().validate(data)
        if data.get("best_of") not in (None, data.get("n", 1)):
            raise serializers.ValidationError({"best_of": "best_of other than n is not supported by this server."})
        if data.get("max_tokens") == 0 and not data["echo"]:
            raise serializers.ValidationError({"max_tokens": "max_tokens 0 returns nothing without echo; set echo "
                                                             "(and logprobs) to score the prompt."})
        return data


class ContentPartSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["text"])
    text = StrictCharField(allow_blank=True, trim_whitespace=False)


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "array", "items": {
    "type": "object", "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}}]})
class MessageContentField(serializers.Field):
    """A message's `content`: a string, or a list of text parts (joined)."""

    def to_internal_value(self, data) -> str:
        if isinstance(data, str):
            if not is_text(data):
                raise serializers.ValidationError("Must be valid Unicode text (it holds a lone surrogate).")
            return data
        if isinstance(data, list):
            parts = ContentPartSerializer(data=data, many=True)
            parts.is_valid(raise_exception=True)
            return "".join(part["text"] for part in parts.validated_data)
        raise serializers.ValidationError("Must be a string or a list of text content parts.")

    def to_representation(self, value):
        return value


class FunctionCallSerializer(StrictSerializer):
    name = StrictCharField(max_length=64)
    arguments = StrictCharField(allow_blank=True, trim_whitespace=False)  # JSON text, as the model wrote it


class ToolCallSerializer(StrictSerializer):
    id = StrictCharField(max_length=256)
    type = serializers.ChoiceField(choices=["function"])
    function = FunctionCallSerializer()


class MessageSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=["system", "developer", "user", "assistant", "tool"])
    content = MessageContentField(required=False, allow_null=True)
    name = StrictCharField(required=False, max_length=64)
    tool_call_id = StrictCharField(required=False, max_length=256)
    tool_calls = ToolCallSerializer(many=True, required=False, max_length=MAX_TOOLS)
    refusal = StrictCharField(required=False, allow_null=True)

    def validate(self, data):
        if data.get("tool_calls") and data["role"] != "assistant":
            raise serializers.ValidationError({"tool_calls": "Only assistant messages carry tool_calls."})
        if data["role"] == "tool" and not data.get("tool_call_id"):
            raise serializers.ValidationError({"tool_call_id": "A tool message needs the tool_call_id it answers."})
        if data.get("content") is None and not (data["role"] == "assistant" and data.get("tool_calls")):
            raise serializers.ValidationError({"content": "This field is required (it may be null only in an "
                                                          "assistant message with tool_calls)."})
        return data


class FunctionDefinitionSerializer(StrictSerializer):
    name = NameField()
    description = StrictCharField(required=False, allow_blank=True, max_length=MAX_SPEC_CHARS)
    parameters = JsonSchemaField(required=False, allow_null=True)
    strict = StrictBooleanField(required=False, allow_null=True)


class ToolSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["function"])
    function = FunctionDefinitionSerializer()


class NamedFunctionSerializer(StrictSerializer):
    name = StrictCharField(max_length=64)


class NamedToolChoiceSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["function"])
    function = NamedFunctionSerializer()


@extend_schema_field({"oneOf": [{"enum": ["none", "auto", "required"]}, {"type": "object"}]})
class ToolChoiceField(serializers.Field):
    """`none`, `auto`, `required`, or {"type": "function", "function": {"name": ...}}."""

    def to_internal_value(self, data):
        if data in ("none", "auto", "required"):
            return data
        if isinstance(data, dict):
            named = NamedToolChoiceSerializer(data=data)
            named.is_valid(raise_exception=True)
            return named.validated_data
        raise serializers.ValidationError("Must be 'none', 'auto', 'required' or a named function choice.")

    def to_representation(self, value):
        return value


class ChatCompletionRequestSerializer(SamplingRequestSerializer):
    messages = MessageSerializer(many=True, allow_empty=False, max_length=1024)
    max_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    logprobs = StrictBooleanField(required=False, allow_null=True, default=False)
    top_logprobs = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=MAX_LOGPROBS)
    tools = ToolSerializer(many=True, required=False, allow_null=True, max_length=MAX_TOOLS)
    tool_choice = ToolChoiceField(required=False, allow_null=True)
    parallel_tool_calls = StrictBooleanField(required=False, allow_null=True)

    def validate(self, data):
        data = super().validate(data)
        if data.get("top_logprobs") is not None and not data.get("logprobs"):
            raise serializers.ValidationError({"top_logprobs": "top_logprobs requires logprobs to be true."})
        names = [tool["function"]["name"] for tool in data.get("tools") or []]
        if len(set(names)) != len(names):
            raise serializers.ValidationError({"tools": "Function names must be unique."})
        choice = data.get("tool_choice")
        if choice not in (None, "none") and not names:
            raise serializers.ValidationError({"tool_choice": "tool_choice needs tools."})
        if isinstance(choice, dict) and choice["function"]["name"] not in names:
            raise serializers.ValidationError({"tool_choice": f"No tool named {choice['function']['name']!r}."})
        return data
