"""Input serializers of vLLM's `/tokenize` and `/detokenize`: its request shapes, strict as the rest of the API.

`/tokenize` takes either a text prompt or chat messages (validated as chat completions validates
them); which one a body is decides which serializer reads it, so each refuses the other's fields.
"""
from __future__ import annotations

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from inference.fields import MAX_TOKEN_ID, StrictBooleanField, StrictCharField, _are_token_ids
from inference.serializers import MessageSerializer, StrictSerializer


class TokenizeTextSerializer(StrictSerializer):
    model = StrictCharField(max_length=200)
    prompt = StrictCharField(allow_blank=True, trim_whitespace=False)
    add_special_tokens = StrictBooleanField(required=False, default=True)


class TokenizeChatSerializer(StrictSerializer):
    model = StrictCharField(max_length=200)
    messages = MessageSerializer(many=True, allow_empty=False, max_length=1024)
    add_generation_prompt = StrictBooleanField(required=False, default=True)


def tokenize_serializer(data) -> type[StrictSerializer]:
    """The chat form when the body has `messages`, else the text form (whose errors then name `prompt`)."""
    return TokenizeChatSerializer if isinstance(data, dict) and "messages" in data else TokenizeTextSerializer


@extend_schema_field({"type": "array", "items": {"type": "integer"}})
class TokenIdsField(serializers.Field):
    """A list of token ids (possibly empty), checked without a Python call per id."""

    def to_internal_value(self, data) -> list[int]:
        if not isinstance(data, list) or (data and not _are_token_ids(data)):
            raise serializers.ValidationError(f"Must be a list of token ids (integers from 0 to {MAX_TOKEN_ID}).")
        return data

    def to_representation(self, value):
        return value


class DetokenizeSerializer(StrictSerializer):
    model = StrictCharField(max_length=200)
    tokens = TokenIdsField()
