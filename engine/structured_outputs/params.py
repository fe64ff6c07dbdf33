"""What a request constrains its output to, with vLLM's names (`SamplingParams(structured_outputs=...)`).

Pure Python, like SamplingParams: the web side builds and validates it before anything is queued,
and it travels over the wire as a plain dict. Exactly one kind is set.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

MAX_SPEC_CHARS = 64 * 1024  # a schema, regex or grammar: compiled per request, so kept small
MAX_CHOICES = 1024
# Objects and arrays in a schema: real ones nest a few dozen deep; far deeper ones overflow the
# recursive encoders and parsers on the way (json, Jinja's tojson for tool definitions, llguidance),
# which raise RecursionError instead of an error a client can read.
MAX_SCHEMA_DEPTH = 128
KINDS = ("json", "regex", "choice", "grammar", "json_object")


def schema_from_text(text: str, what: str):
    """json.loads for a schema sent as text; ValueError (never RecursionError) when it is not JSON or
    nests too deep."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError(f"{what} is nested deeper than {MAX_SCHEMA_DEPTH} levels") from None
    except ValueError as error:
        raise ValueError(f"{what} is not valid JSON: {error}") from None


def check_schema_depth(value, what: str) -> None:
    """ValueError when objects and arrays nest deeper than MAX_SCHEMA_DEPTH (walked without recursion)."""
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        if depth > MAX_SCHEMA_DEPTH:
            raise ValueError(f"{what} is nested deeper than {MAX_SCHEMA_DEPTH} levels")
        pending.extend((child, depth + 1) for child in children)


@dataclass(frozen=True)
class StructuredOutputsParams:
    json: dict | str | None = None  # a JSON Schema (a dict, or its JSON text)
    regex: str | None = None
    choice: tuple[str, ...] | None = None  # the output is exactly one of these strings
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF/EBNF (`root ::= ...`)
    json_object: bool | None = None  # any JSON object (OpenAI's response_format json_object)

    def __post_init__(self) -> None:
        if isinstance(self.json, str):
            object.__setattr__(self, "json", schema_from_text(self.json, "structured_outputs.json"))
        if self.choice is not None:
            if not isinstance(self.choice, (list, tuple)) or not all(isinstance(c, str) for c in self.choice):
                raise ValueError("structured_outputs.choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        self._validate()

    @classmethod
    def coerce(cls, value) -> "StructuredOutputsParams | None":
        """From the wire's dict (or an instance, or None)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise ValueError("structured_outputs must be an object naming one of " + ", ".join(KINDS))
        unknown = sorted(set(value) - set(KINDS))
        if unknown:
            raise ValueError(f"structured_outputs has unknown field(s): {', '.join(unknown)}")
        return cls(**value)

    @property
    def kind(self) -> str:
        return next(name for name in KINDS if getattr(self, name) not in (None, False))

    def key(self) -> str:
        """A canonical text of the constraint: equal constraints share one compiled grammar."""
        return json.dumps({self.kind: getattr(self, self.kind)}, sort_keys=True, separators=(",", ":"))

    def as_dict(self) -> dict:
        return {name: value for name, value in asdict(self).items() if value is not None}

    def _validate(self) -> None:
        set_kinds = [name for name in KINDS if getattr(self, name) not in (None, False)]
        if len(set_kinds) != 1:
            raise ValueError("structured_outputs must set exactly one of " + ", ".join(KINDS)
                             + (f" (got {', '.join(set_kinds)})" if set_kinds else ""))
        if self.json is not None and not isinstance(self.json, dict):
            raise ValueError("structured_outputs.json must be a JSON Schema object")
        check_schema_depth(self.json, "structured_outputs.json")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"structured_outputs.{name} must be a non-empty string")
        if self.choice is not None and not 1 <= len(self.choice) <= MAX_CHOICES:
            raise ValueError(f"structured_outputs.choice must hold 1 to {MAX_CHOICES} strings")
        if self.json_object not in (None, True):
            raise ValueError("structured_outputs.json_object must be true when set")
        if len(self.key()) > MAX_SPEC_CHARS:
            raise ValueError(f"structured_outputs is longer than {MAX_SPEC_CHARS} characters")
