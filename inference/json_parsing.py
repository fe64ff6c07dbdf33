"""JSON parsing for every door of the API (HTTP bodies, websocket frames, batch lines), with orjson.

The stdlib parser that DRF uses by default accepts what the rest of the stack cannot handle: JSON
nested 100k deep raises RecursionError (a 500, or a websocket that never answers) and lone
surrogates ("\\ud800") parse into strings that no encoder can write back. orjson refuses both by
itself (depth over 1024, invalid UTF-16 escapes), is ~10x faster on large bodies, and turns integers
beyond 64 bits into floats, which the strict integer fields then refuse by name.
"""
from __future__ import annotations

import orjson
from rest_framework.exceptions import ParseError
from rest_framework.parsers import BaseParser


class InvalidJson(ValueError):
    """The text is not JSON the API accepts (syntax, NaN, nesting deeper than 1024, lone surrogates)."""


def loads(data: bytes | str):
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError as error:
        raise InvalidJson(str(error)) from None


class OrjsonParser(BaseParser):
    """DRF's parser for `application/json`: a ParseError (OpenAI's 400 `invalid_json`) for anything
    `loads` refuses, whatever the reason."""

    media_type = "application/json"

    def parse(self, stream, media_type=None, parser_context=None):
        try:
            return loads(stream.read())
        except InvalidJson as error:
            raise ParseError(f"JSON parse error - {error}") from None
