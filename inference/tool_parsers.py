"""Tool calls out of a model's text, one parser per model family (vLLM's `--tool-call-parser`):

- `hermes` (Hermes, Qwen, SmolLM2 told in the Hermes way): `<tool_call>{"name", "arguments"}</tool_call>`
  blocks anywhere in the text; the rest is content.
- `llama3_json` (Llama 3.x): the whole output is one JSON object `{"name", "parameters"}` (or several
  separated by `;`), optionally after `<|python_tag|>`.
- `mistral`: `[TOOL_CALLS]` followed by a JSON list of `{"name", "arguments"}`.

The family is read from the chat template (each family's own special strings). A call of a function
the request did not declare, or one that is not valid JSON, stays in the content: the client sees
what the model wrote rather than a call that cannot be right.
"""
from __future__ import annotations

import json
import re
import uuid

_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
START_MARKERS = {"hermes": "<tool_call>", "mistral": "[TOOL_CALLS]", "llama3_json": "<|python_tag|>"}


def parser_for_template(chat_template: str | None) -> str:
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "<|eom_id|>" in template:
        return "llama3_json"
    return "hermes"


def new_call(name: str, arguments) -> dict:
    """A tool call in OpenAI's shape; arguments are JSON text."""
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": {"name": name, "arguments": text}}


def parse_tool_calls(parser: str, text: str, names: set[str]) -> tuple[str, list[dict]]:
    """(content, calls) of a finished output."""
    if parser == "hermes":
        calls, kept = [], []
        position = 0
        for match in _HERMES_CALL.finditer(text):
            call = _call_of(_json(match.group(1)), "arguments", names)
            if call is not None:
                kept.append(text[position:match.start()])
                position = match.end()
                calls.append(call)
        content = "".join(kept) + text[position:]
        return (content.strip() if calls else content), calls
    if parser == "mistral":
        head, marker, tail = text.partition("[TOOL_CALLS]")
        items = _json(tail.strip()) if marker else None
        calls = [_call_of(item, "arguments", names) for item in items] if isinstance(items, list) else []
        return (head.strip(), calls) if calls and all(calls) else (text, [])
    body = text.strip().removeprefix("<|python_tag|>").strip()
    items = [_json(part) for part in body.split(";")] if body.startswith("{") else []
    calls = [_call_of(item, "parameters", names) or _call_of(item, "arguments", names) for item in items]
    return ("", calls) if calls and all(calls) else (text, [])


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def _call_of(item, arguments_key: str, names: set[str]) -> dict | None:
    if not isinstance(item, dict) or item.get("name") not in names or not isinstance(item.get(arguments_key), dict):
        return None
    return new_call(item["name"], item[arguments_key])
