"""OpenAI's response objects, built from engine deltas: one class per endpoint.

Each turns (prompt index, delta) pairs into stream chunks (`on_delta`) while accumulating the
non-streaming body (`body`), so both modes share one code path and cannot drift apart.
"""
from __future__ import annotations

import time

from engine.service.protocol import OutputDelta, Usage
from inference.generation import GenerationPlan
from inference.logprobs import CompletionLogprobs, chat_logprobs
from inference.tool_call_streams import STREAMS
from inference.tools import ToolPlan

FINISH_REASONS = {"stop": "stop", "length": "length", "abort": "stop"}


def usage_body(usage: Usage) -> dict:
    return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
            "total_tokens": usage.prompt_tokens + usage.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": usage.cached_tokens}}


def visible_tokens(output) -> tuple[list[int], list[dict]]:
    """Token ids and logprobs of the text the client sees: a final EOS or stop token has no text."""
    token_ids, logprobs = output.token_ids, output.logprobs or []
    if output.finish_reason == "stop" and not isinstance(output.stop_reason, str) and token_ids:
        return token_ids[:-1], logprobs[:len(token_ids) - 1]
    return token_ids, logprobs


class _Format:
    object_name = ""
    chunk_object_name = ""

    def __init__(self, plan: GenerationPlan, *, include_usage: bool = False) -> None:
        self.plan = plan
        self.created = int(time.time())
        self.include_usage = include_usage
        self.choices: dict[int, dict] = {}

    def on_delta(self, prompt_index: int, delta: OutputDelta) -> list[dict]:
        chunks = []
        for output in delta.outputs:
            index = prompt_index * self.plan.n + output.index
            fresh = index not in self.choices
            if fresh:
                self.choices[index] = self._new_choice(prompt_index, delta)
            choice = self.choices[index]
            finish = FINISH_REASONS.get(output.finish_reason) if output.finish_reason else None
            if finish:
                choice["finish_reason"] = finish
            chunks.extend(self._chunks(index, choice, output, finish, fresh))
        return chunks

    def chunk(self, choices: list[dict], usage: Usage | None = None, final_usage: bool = False) -> dict:
        body = {"id": self.plan.request_id, "object": self.chunk_object_name, "created": self.created,
                "model": self.plan.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage_body(usage) if final_usage else None
        return body

    def body(self, usage: Usage) -> dict:
        return {"id": self.plan.request_id, "object": self.object_name, "created": self.created,
                "model": self.plan.model, "choices": [self._final_choice(i, self.choices[i]) for i in sorted(self.choices)],
                "usage": usage_body(usage)}

    def _new_choice(self, prompt_index: int, delta: OutputDelta) -> dict:
        raise NotImplementedError

    def _chunks(self, index, choice, output, finish, fresh) -> list[dict]:
        raise NotImplementedError

    def _final_choice(self, index: int, choice: dict) -> dict:
        raise NotImplementedError


class CompletionFormat(_Format):
    object_name = chunk_object_name = "text_completion"

    def __init__(self, plan: GenerationPlan, *, echo: bool, logprobs: int | None, prompt_token_texts: list[list[str]],
                 include_usage: bool = False) -> None:
        super().__init__(plan, include_usage=include_usage)
        self.echo, self.logprobs = echo, logprobs
        self.prompt_token_texts = prompt_token_texts
        self.prompt_logprobs: dict[int, list] = {}

    def _new_choice(self, prompt_index: int, delta: OutputDelta) -> dict:
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs[prompt_index] = delta.prompt_logprobs
        choice = {"text": "", "finish_reason": None, "prompt_index": prompt_index,
                  "logprobs": CompletionLogprobs(self.logprobs) if self.logprobs is not None else None}
        return choice

    def _chunks(self, index, choice, output, finish, fresh) -> list[dict]:
        text, logprobs = output.text, None
        if fresh and self.echo:
            prompt_index = choice["prompt_index"]
            text = self.plan.prompt_texts[prompt_index] + text
            if choice["logprobs"] is not None:
                echoed = choice["logprobs"].add_prompt(self.prompt_token_texts[prompt_index],
                                                      self.prompt_logprobs.get(prompt_index),
                                                      self.plan.prompts[prompt_index])
                logprobs = _merge(echoed, choice["logprobs"].add(*reversed(visible_tokens(output))))
        if choice["logprobs"] is not None and logprobs is None:
            logprobs = choice["logprobs"].add(*reversed(visible_tokens(output)))
        choice["text"] += text
        return [self.chunk([{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}])]

    def _final_choice(self, index: int, choice: dict) -> dict:
        logprobs = choice["logprobs"].body if choice["logprobs"] is not None else None
        return {"index": index, "text": choice["text"], "logprobs": logprobs, "finish_reason": choice["finish_reason"]}


def _merge(first: dict, second: dict) -> dict:
    return {name: first[name] + second[name] for name in first}


class ChatFormat(_Format):
    object_name, chunk_object_name = "chat.completion", "chat.completion.chunk"

    def __init__(self, plan: GenerationPlan, *, top_logprobs: int | None, include_usage: bool = False,
                 tools: ToolPlan | None = None) -> None:
        super().__init__(plan, include_usage=include_usage)
        self.top_logprobs = top_logprobs  # None: no logprobs asked
        self.tools = tools if tools is not None and tools.active else None

    def _new_choice(self, prompt_index: int, delta: OutputDelta) -> dict:
        return {"content": "", "finish_reason": None, "logprobs": [] if self.top_logprobs is not None else None,
                "tools": STREAMS[self.tools.choice](self.tools) if self.tools else None}

    def _chunks(self, index, choice, output, finish, fresh) -> list[dict]:
        chunks = []
        if fresh:
            chunks.append(self.chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                                       "logprobs": None, "finish_reason": None}]))
        logprobs = None
        if self.top_logprobs is not None:
            token_ids, entries = visible_tokens(output)
            content = chat_logprobs(entries, token_ids, self.top_logprobs)
            choice["logprobs"].extend(content)
            logprobs = {"content": content, "refusal": None}
        text, calls = output.text, []
        if choice["tools"] is not None:
            text, calls = choice["tools"].feed(output.text)
            if finish:
                more_text, more_calls = choice["tools"].finish()
                text, calls = text + more_text, calls + more_calls
                if choice["tools"].calls and finish == "stop" and self.tools.choice != "named":
                    finish = choice["finish_reason"] = "tool_calls"  # OpenAI's reason when the model calls
        choice["content"] += text
        if text or logprobs:
            chunks.append(self.chunk([{"index": index, "delta": {"content": text}, "logprobs": logprobs,
                                       "finish_reason": None}]))
        if calls:
            chunks.append(self.chunk([{"index": index, "delta": {"tool_calls": calls}, "logprobs": None,
                                       "finish_reason": None}]))
        if finish:
            chunks.append(self.chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]))
        return chunks

    def _final_choice(self, index: int, choice: dict) -> dict:
        logprobs = {"content": choice["logprobs"], "refusal": None} if choice["logprobs"] is not None else None
        message = {"role": "assistant", "content": choice["content"], "refusal": None}
        if choice["tools"] is not None and choice["tools"].calls:
            message["content"] = choice["tools"].content or None
            message["tool_calls"] = choice["tools"].calls
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": choice["finish_reason"]}
