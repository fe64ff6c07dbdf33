"""A StructuredOutputsParams as an llguidance grammar, and its validation.

llguidance needs neither torch nor a tokenizer to check a grammar, so the web side refuses a schema,
regex or grammar the engine could not compile with a 400 before anything is queued, using the same
code the engine compiles with. A choice list becomes a Lark alternation of JSON-quoted literals (no
escaping rules of a regex dialect to get wrong); GBNF is converted to Lark by llguidance itself.
"""

from __future__ import annotations

import json
from functools import lru_cache

from engine.structured_outputs.params import StructuredOutputsParams

ANY_JSON_OBJECT = {"type": "object"}
# JSON on one line with `, ` and `: ` (Python's json.dumps): free whitespace lets small models emit
# newlines until max_tokens cuts the object (vLLM's `disable_any_whitespace` for the same reason).
JSON_DEFAULTS = {"whitespace_flexible": False}


def to_grammar(params: StructuredOutputsParams) -> str:
    """llguidance's grammar text for the constraint (cached: equal constraints convert once)."""
    return _grammar_of_key(params.key())


def validate(params: StructuredOutputsParams) -> None:
    """Raise ValueError with llguidance's message when the constraint cannot be compiled."""
    error = _error_of_key(params.key())
    if error:
        raise ValueError(f"structured_outputs.{params.kind} cannot be compiled: {error.strip()}")


@lru_cache(maxsize=1024)
def _error_of_key(key: str) -> str:
    from llguidance import LLMatcher

    try:
        grammar = _grammar_of_key(key)
    except ValueError as error:
        return str(error)
    return LLMatcher.validate_grammar(grammar, None)


@lru_cache(maxsize=1024)
def _grammar_of_key(key: str) -> str:
    from llguidance import LLMatcher
    from llguidance.gbnf_to_lark import any_to_lark

    [(kind, value)] = json.loads(key).items()
    try:
        if kind == "json":
            return LLMatcher.grammar_from_json_schema(value, defaults=JSON_DEFAULTS)
        if kind == "json_object":
            return LLMatcher.grammar_from_json_schema(ANY_JSON_OBJECT, defaults=JSON_DEFAULTS)
        if kind == "regex":
            return LLMatcher.grammar_from_regex(value)
        if kind == "choice":
            return LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
        return LLMatcher.grammar_from_lark(any_to_lark(value))
    except Exception as error:  # llguidance raises ValueError or its own errors on malformed input
        raise ValueError(str(error)) from None
