"""Tool calling for chat completions: what the model is told, what it is held to, how it is read.

- **Told**: a chat template that knows tools (it mentions `tools`) gets them as `tools=`, and the
  conversation's assistant tool calls with their arguments as objects (what templates expect). A
  template that does not (SmolLM2's) gets the Hermes convention in text instead: the tools in a
  system message, earlier calls as `<tool_call>` blocks, tool results as `<tool_response>` blocks.
- **Held to**: `tool_choice` `required` and a named function are grammars (engine structured
  outputs): a JSON list of calls of the declared tools, or the named function's arguments.
- **Read**: `auto` output goes through the model family's parser (inference/tool_parsers.py).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from engine.structured_outputs.params import StructuredOutputsParams
from inference.tool_parsers import parser_for_template

HERMES_SYSTEM = (
    "You are a function calling AI model. You are provided with function signatures within <tools></tools> XML "
    "tags. You may call one or more functions to assist with the user query. Don't make assumptions about what "
    "values to plug into functions. Here are the available tools: <tools>\n{tools}\n</tools>\nFor each function "
    "call, return a json object with function name and arguments within <tool_call></tool_call> XML tags as "
    "follows:\n<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n</tool_call>")
ANY_OBJECT = {"type": "object"}


@dataclass
class ToolPlan:
    tools: list[dict] = field(default_factory=list)  # OpenAI tool objects ({"type": "function", "function": ...})
    choice: str = "none"  # none, auto, required, named
    named: str | None = None  # the function a named choice forces
    parallel: bool = True
    parser: str = "hermes"

    @classmethod
    def of(cls, data: dict, chat_template: str | None) -> "ToolPlan":
        tools = [dict(tool, function=dict(tool["function"])) for tool in data.get("tools") or []]
        choice = data.get("tool_choice") or ("auto" if tools else "none")
        named = None
        if isinstance(choice, dict):
            choice, named = "named", choice["function"]["name"]
        parallel = data.get("parallel_tool_calls") is not False
        return cls(tools if choice != "none" else [], choice, named, parallel, parser_for_template(chat_template))

    @property
    def active(self) -> bool:
        return self.choice != "none"

    def parameters(self, name: str) -> dict:
        function = next(t["function"] for t in self.tools if t["function"]["name"] == name)
        return function.get("parameters") or ANY_OBJECT

    def constraint(self) -> StructuredOutputsParams | None:
        """The grammar that enforces `required` or a named choice (None for auto and none)."""
        if self.choice == "named":
            return StructuredOutputsParams(json=self.parameters(self.named))
        if self.choice != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                                   "arguments": self.parameters(t["function"]["name"])},
                  "required": ["name", "arguments"], "additionalProperties": False} for t in self.tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def template_inputs(self, messages: list[dict], chat_template: str | None) -> tuple[list[dict], list[dict] | None]:
        """The messages (and `tools=`) to render, for a template that knows tools or one that does not."""
        if chat_template and "tools" in chat_template:
            return [_native_message(m) for m in messages], (self.tools or None)
        rendered = [_hermes_message(m) for m in messages]
        if self.tools:
            listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in self.tools)
            system = HERMES_SYSTEM.format(tools=listing)
            if rendered and rendered[0]["role"] in ("system", "developer"):
                rendered[0] = dict(rendered[0], content=rendered[0]["content"] + "\n\n" + system)
            else:
                rendered.insert(0, {"role": "system", "content": system})
        return rendered, None


def _native_message(message: dict) -> dict:
    """Tool calls with their arguments as objects; null content as empty text (templates concatenate)."""
    message = dict(message, content=message.get("content") or "")
    if message.get("tool_calls"):
        message["tool_calls"] = [{"id": call["id"], "type": "function", "function": {
            "name": call["function"]["name"], "arguments": _arguments(call["function"]["arguments"])}}
            for call in message["tool_calls"]]
    return message


def _hermes_message(message: dict) -> dict:
    content = message.get("content") or ""
    if message.get("tool_calls"):
        blocks = [json.dumps({"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])},
                             ensure_ascii=False) for c in message["tool_calls"]]
        content = "\n".join([content] * bool(content) + [f"<tool_call>\n{block}\n</tool_call>" for block in blocks])
    if message["role"] == "tool":
        content = f"<tool_response>\n{content}\n</tool_response>"
    return {"role": message["role"], "content": content, **({"name": message["name"]} if message.get("name") else {})}


def _arguments(text: str):
    """A call's arguments as an object when they are JSON (as the model wrote them otherwise)."""
    try:
        return json.loads(text)
    except ValueError:
        return text
