"""JSON fields that accept only their own JSON type, as OpenAI does ("5" is not an integer here).

DRF's stock fields coerce ("5" -> 5, "true" -> True); an API that must reject what OpenAI rejects
needs fields that do not.
"""
from __future__ import annotations

import math
import re

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_TOKEN_ID = 2**31 - 1  # a vocabulary fits in int32; the model's own size is checked with its tokenizer
MAX_STOP_SEQUENCES = 4  # OpenAI's documented bound (the engine allows 16): clients written for OpenAI fit
MAX_STOP_CHARS = 1024  # each stop string is matched against the text after every token
_SURROGATE = re.compile("[\ud800-\udfff]")


def is_text(value: str) -> bool:
    """False for strings holding lone surrogates ("\\ud800" in JSON): no encoder can write them
    (UTF-8, msgpack, the database), so they would fail far from here."""
    return _SURROGATE.search(value) is None


class StrictIntegerField(serializers.IntegerField):
    """An integer, and one that fits in 64 bits (numpy, torch, msgpack and the database all stop
    there: a bigger one would fail inside the engine or the error path instead of here)."""

    default_error_messages = {"out_of_range": "Must be an integer between -2^63 and 2^63-1."}

    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        if not INT64_MIN <= data <= INT64_MAX:
            self.fail("out_of_range")
        return super().to_internal_value(data)


class StrictFloatField(serializers.FloatField):
    def to_internal_value(self, data):
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            self.fail("invalid")
        try:
            if not math.isfinite(float(data)):
                self.fail("invalid")
        except OverflowError:  # an integer beyond a double (10**400: the stdlib parser keeps it)
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    default_error_messages = {"invalid": "Must be true or false."}

    def to_internal_value(self, data):
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class StrictCharField(serializers.CharField):
    default_error_messages = {"invalid": "Must be a string.", "surrogates": "Must be valid Unicode text (it holds "
                                                                            "a lone surrogate)."}

    def to_internal_value(self, data):
        if not isinstance(data, str):
            self.fail("invalid")
        if not is_text(data):
            self.fail("surrogates")
        return super().to_internal_value(data)


@extend_schema_field({"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]})
class StopField(serializers.Field):
    """`stop`: one string or a list of up to `max_items` non-empty strings of at most `max_chars`."""

    def __init__(self, max_items: int = MAX_STOP_SEQUENCES, max_chars: int = MAX_STOP_CHARS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.max_items, self.max_chars = max_items, max_chars

    def to_internal_value(self, data) -> list[str]:
        items = [data] if isinstance(data, str) else data
        if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
            raise serializers.ValidationError("Must be a non-empty string or a list of non-empty strings.")
        if len(items) > self.max_items:
            raise serializers.ValidationError(f"At most {self.max_items} stop sequences are allowed.")
        if any(len(s) > self.max_chars for s in items):
            raise serializers.ValidationError(f"Each stop sequence may have at most {self.max_chars} characters.")
        if not all(is_text(s) for s in items):
            raise serializers.ValidationError("Stop sequences must be valid Unicode text (one holds a lone surrogate).")
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
        elif isinstance(data, list) and data and _are_token_ids(data):
            prompts = [data]
        elif isinstance(data, list) and data:
            prompts = data
        else:
            raise serializers.ValidationError("Must be a string, a list of strings or token ids, and not empty.")
        if len(prompts) > self.max_prompts:
            raise serializers.ValidationError(f"At most {self.max_prompts} prompts per request.")
        for prompt in prompts:
            is_tokens = isinstance(prompt, list) and prompt and (prompt is data or _are_token_ids(prompt))
            if not (isinstance(prompt, str) or is_tokens):
                raise serializers.ValidationError("Each prompt must be a string or a non-empty list of token ids "
                                                  f"(integers from 0 to {MAX_TOKEN_ID}).")
            if isinstance(prompt, str) and not is_text(prompt):
                raise serializers.ValidationError("Prompts must be valid Unicode text (one holds a lone surrogate).")
        return prompts

    def to_representation(self, value):
        return value


def _are_token_ids(values: list) -> bool:
    """Whether every value is an int (not a bool) from 0 to MAX_TOKEN_ID: 64 prompts of 8k ids are
    half a million values, so this avoids a Python call per value."""
    return all(type(value) is int for value in values) and 0 <= min(values) and max(values) <= MAX_TOKEN_ID
