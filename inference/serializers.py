"""Input serializers of the OpenAI-compatible API: exactly what OpenAI (and vLLM's extras) accept.

Unknown fields are refused as OpenAI refuses them ("Unrecognized request argument supplied"),
types are strict, and ranges are OpenAI's. Output shapes are documented for the OpenAPI schema.
"""
from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.exceptions import ValidationError

from inference.errors import from_drf
from inference.fields import (
    MAX_TOKEN_ID, PromptField, StopField, StrictBooleanField, StrictCharField, StrictFloatField, StrictIntegerField,
    is_text,
)

MAX_N = 128
MAX_LOGPROBS = 20
MAX_NAME_CHARS = 64


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


class MessageSerializer(StrictSerializer):
    role = serializers.ChoiceField(choices=["system", "developer", "user", "assistant", "tool"])
    content = MessageContentField()
    name = StrictCharField(required=False, max_length=64)
    tool_call_id = StrictCharField(required=False, max_length=256)


class ResponseFormatSerializer(StrictSerializer):
    type = serializers.ChoiceField(choices=["text"], error_messages={
        "invalid_choice": "Only response_format type 'text' is supported by this server."})


class ChatCompletionRequestSerializer(SamplingRequestSerializer):
    messages = MessageSerializer(many=True, allow_empty=False, max_length=1024)
    max_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    max_completion_tokens = StrictIntegerField(required=False, allow_null=True, min_value=1)
    logprobs = StrictBooleanField(required=False, allow_null=True, default=False)
    top_logprobs = StrictIntegerField(required=False, allow_null=True, min_value=0, max_value=MAX_LOGPROBS)
    response_format = ResponseFormatSerializer(required=False, allow_null=True)
    tools = serializers.ListField(required=False, allow_null=True, max_length=0, error_messages={
        "max_length": "tools are not supported by this server."})
    tool_choice = serializers.ChoiceField(choices=["none"], required=False, allow_null=True)
    parallel_tool_calls = StrictBooleanField(required=False, allow_null=True)

    def validate(self, data):
        data = super().validate(data)
        if data.get("top_logprobs") is not None and not data.get("logprobs"):
            raise serializers.ValidationError({"top_logprobs": "top_logprobs requires logprobs to be true."})
        return data
