"""JSON fields that accept only their own JSON type, as OpenAI does ("5" is not an integer here).

DRF's stock fields coerce ("5" -> 5, "true" -> True); an API that must reject what OpenAI rejects
needs fields that do not.
"""
from __future__ import annotations

import math

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)) or not math.isfinite(data):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictCharField(serializers.CharField):
    default_error_messages = {"invalid": "Must be a string."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})
class StopField(serializers.Field):
    """`stop`: one string or a list of up to `max_items` non-empty strings."""

    def __init__(self, max_items: int = 16, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_items = max_items

    def to_internal_value(self, data) -> list[str]:
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise serializers.ValidationError("Must be a non-empty string or a list of non-empty strings.")
        if len(items) > self.max_items:
            raise serializers.ValidationError(f"At most {self.max_items} stop sequences are allowed.")
        return items

    def to_representation(self, value):
        return value


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}},
                               {"type": "array", "items": {"type": "integer"}},
                               {"type": "array", "items": {"type": "array", "items": {"type": "integer"}}}]})
class PromptField(serializers.Field):
    """Completions' `prompt`: a string, a list of strings, a list of token ids, or a list of those.

    Returns a list of prompts, each a str or a list of token ids.
    """

    def __init__(self, max_prompts: int = 64, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_prompts = max_prompts

    def to_internal_value(self, data) -> list[str | list[int]]:
        if isinstance(data, str):
            prompts = [data]
        elif isinstance(data, list) and data and all(_is_token_id(t) for t in data):
            prompts = [data]
        elif isinstance(data, list) and data:
            prompts = data
        else:
            raise serializers.ValidationError("Must be a string, a list of strings or token ids, and not empty.")
        for prompt in prompts:
            is_tokens = isinstance(prompt, list) and prompt and all(_is_token_id(t) for t in prompt)
            if not (isinstance(prompt, str) or is_tokens):
                raise serializers.ValidationError("Each prompt must be a string or a non-empty list of token ids.")
        if len(prompts) > self.max_prompts:
            raise serializers.ValidationError(f"At most {self.max_prompts} prompts per request.")
        return prompts

    def to_representation(self, value):
        return value


def _is_token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
