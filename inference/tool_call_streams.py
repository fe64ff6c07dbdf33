"""A chat choice's output as content and tool-call deltas, as it streams (one object per choice).

- `AutoToolStream` streams content until the parser's start marker shows (a possible start at the
  end of the text is held back, never sent as content), then holds the rest and parses it at the
  end, sending each call as one tool-call delta.
- `NamedToolStream`: the grammar makes the whole output the named function's arguments: the first
  delta names the call, every later text is an `arguments` delta (OpenAI's streaming shape).
- `RequiredToolStream`: the output is a JSON list of calls, read when it is complete.

`finish()` ends the stream; `content` and `calls` are the whole message for a non-streamed answer.
"""
from __future__ import annotations

import json

from inference.tool_parsers import START_MARKERS, new_call, parse_tool_calls
from inference.tools import ToolPlan


class AutoToolStream:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.names = {t["function"]["name"] for t in plan.tools}
        self.marker = START_MARKERS[plan.parser]
        self.text = ""
        self.sent = 0  # characters of text sent as content
        self.holding = False  # a start marker showed: the rest waits for the end
        self.content, self.calls = "", []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        if self.holding:
            return "", []
        start = self._start()
        if start is not None:
            self.holding = True
            return self._send(start), []
        return self._send(len(self.text) - _partial_marker(self.text, self.marker)), []

    def finish(self) -> tuple[str, list[dict]]:
        content, calls = parse_tool_calls(self.plan.parser, self.text, self.names)
        if not self.plan.parallel:
            calls = calls[:1]
        self.calls = calls
        if not calls:  # nothing parsed: what was held back is content after all
            return self._send(len(self.text)), []
        self.content = content  # what the parser left, trimmed as it trims it
        return "", [dict(call, index=i) for i, call in enumerate(calls)]

    def _start(self) -> int | None:
        if self.plan.parser == "llama3_json":  # the whole output is the call: it starts with `{`
            stripped = self.text.lstrip()
            if stripped.startswith(("{", self.marker)):
                return len(self.text) - len(stripped)
            return None
        position = self.text.find(self.marker, self.sent)
        return None if position < 0 else position

    def _send(self, end: int) -> str:
        piece, self.sent = self.text[self.sent:end], max(self.sent, end)
        self.content += piece
        return piece


class NamedToolStream:
    def __init__(self, plan: ToolPlan) -> None:
        self.call = new_call(plan.named, "")
        self.calls = [self.call]
        self.content = None
        self.announced = False  # the delta that names the call went out

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.call["function"]["arguments"] += text
        if not self.announced:
            self.announced = True
            return "", [{"index": 0, "id": self.call["id"], "type": "function",
                         "function": {"name": self.call["function"]["name"], "arguments": text}}]
        return "", ([{"index": 0, "function": {"arguments": text}}] if text else [])

    def finish(self) -> tuple[str, list[dict]]:
        return self.feed("") if not self.announced else ("", [])


class RequiredToolStream:
    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.text = ""
        self.content, self.calls = None, []

    def feed(self, text: str) -> tuple[str, list[dict]]:
        self.text += text
        return "", []

    def finish(self) -> tuple[str, list[dict]]:
        try:
            items = json.loads(self.text)
        except ValueError:  # cut by max_tokens: no call is complete
            self.content = self.text
            return self.text, []
        self.calls = [new_call(item["name"], item["arguments"]) for item in items]
        return "", [dict(call, index=i) for i, call in enumerate(self.calls)]


STREAMS = {"auto": AutoToolStream, "named": NamedToolStream, "required": RequiredToolStream}


def _partial_marker(text: str, marker: str) -> int:
    """How many characters at the end of `text` could begin `marker`."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
