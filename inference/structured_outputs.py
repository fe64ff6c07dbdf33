"""A call's output constraint, from whichever field the client used to ask for one.

OpenAI's `response_format` (json_object, json_schema), vLLM's `structured_outputs` and its older
`guided_json` / `guided_regex` / `guided_choice` / `guided_grammar` all become one
StructuredOutputsParams, checked here with the grammar library the engine compiles with: a schema,
regex or grammar it cannot compile is a 400 naming the field, before anything is queued.
"""
from __future__ import annotations

from engine.structured_outputs.grammar import validate
from engine.structured_outputs.params import StructuredOutputsParams
from inference.errors import invalid

_GUIDED = (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
           ("guided_grammar", "grammar"))


def requested_constraint(data: dict) -> tuple[str, dict] | None:
    """(the field that asked, its constraint as StructuredOutputsParams fields), or None; a 400 when
    more than one field asks."""
    asked = []
    response_format = data.get("response_format") or {}
    if response_format.get("type") == "json_object":
        asked.append(("response_format", {"json_object": True}))
    elif response_format.get("type") == "json_schema":
        schema = response_format["json_schema"].get("schema")
        asked.append(("response_format", {"json": schema} if schema is not None else {"json_object": True}))
    if data.get("structured_outputs"):
        asked.append(("structured_outputs", dict(data["structured_outputs"])))
    asked += [(name, {kind: data[name]}) for name, kind in _GUIDED if data.get(name) is not None]
    if len(asked) > 1:
        raise invalid(asked[1][0], f"{asked[0][0]} and {asked[1][0]} both constrain the output; use one.")
    return asked[0] if asked else None


def checked_constraint(param: str, spec: dict) -> StructuredOutputsParams:
    """The constraint, compiled once by llguidance to check it (milliseconds; run it off the loop)."""
    try:
        params = StructuredOutputsParams.coerce(spec)
        validate(params)
    except ValueError as error:
        raise invalid(param, str(error), code="invalid_structured_output") from None
    return params
