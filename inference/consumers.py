"""Websocket streaming at /v1/ws: the same calls and chunk objects as SSE, multiplexed by id.

Frames from the client (JSON):
  {"type": "auth", "api_key": "sk-..."}                  (unless an Authorization header was sent)
  {"type": "request", "id": "r1", "endpoint": "chat.completions" | "completions", "body": {...}}
  {"type": "cancel", "id": "r1"}
Frames to the client: {"type": "chunk", "id", "data": <chunk>}, {"type": "done", "id"},
{"type": "cancelled", "id"}, {"type": "error", "id", "error": {message, type, param, code}}.
"""
from __future__ import annotations

import asyncio

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer

from inference import json_parsing, services
from inference.authentication import api_key_from_header, authenticate
from inference.errors import OpenAIError, openai_error_or_raise
from inference.serializers import ChatCompletionRequestSerializer, CompletionRequestSerializer, validated

ENDPOINTS = {"chat.completions": (ChatCompletionRequestSerializer, services.start_chat),
             "completions": (CompletionRequestSerializer, services.start_completion)}
MAX_ID_LENGTH = 128


class InferenceConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        self.api_key = None
        self.calls: dict[str, asyncio.Task] = {}
        await self.accept()
        header = dict(self.scope.get("headers", [])).get(b"authorization")
        if header is not None:
            await self._authenticate(lambda: api_key_from_header(header.decode("latin-1")))

    async def disconnect(self, code) -> None:
        for task in self.calls.values():
            task.cancel()
        await asyncio.gather(*self.calls.values(), return_exceptions=True)

    async def receive(self, text_data=None, bytes_data=None, **kwargs) -> None:
        try:
            content = json_parsing.loads(text_data if text_data is not None else bytes_data)  # no RecursionError
        except (ValueError, TypeError):
            return await self._error(None, OpenAIError("Each frame must be a JSON object.", code="invalid_json"))
        return await self.receive_json(content)

    async def receive_json(self, content, **kwargs) -> None:
        if not isinstance(content, dict):
            return await self._error(None, OpenAIError("Each frame must be a JSON object."))
        kind, call_id = content.get("type"), content.get("id")
        if kind == "auth":
            return await self._authenticate(lambda: _string(content.get("api_key")))
        if self.api_key is None:
            return await self._error(call_id, OpenAIError("Authenticate first: send {\"type\": \"auth\", "
                                                          "\"api_key\": ...} or an Authorization header.",
                                                          status=401, code="missing_api_key"))
        if not isinstance(call_id, str) or not 0 < len(call_id) <= MAX_ID_LENGTH:
            return await self._error(None, OpenAIError(f"'id' must be a string of 1 to {MAX_ID_LENGTH} characters.",
                                                       param="id"))
        if kind == "cancel":
            task = self.calls.get(call_id)
            if task is not None:
                task.cancel()
            return None
        if kind != "request":
            return await self._error(call_id, OpenAIError("'type' must be auth, request or cancel.", param="type"))
        if call_id in self.calls:
            return await self._error(call_id, OpenAIError(f"a request with id {call_id!r} is running", param="id"))
        self.calls[call_id] = asyncio.create_task(self._run(call_id, content.get("endpoint"), content.get("body")))
        return None

    async def _authenticate(self, read_key) -> None:
        try:
            self.api_key = await database_sync_to_async(authenticate)(read_key())
            await self.send_json({"type": "authenticated"})
        except Exception as exc:
            error = openai_error_or_raise(exc)
            await self._error(None, error)
            await self.close(code=4401 if error.status == 401 else 1013)  # 1013: try again later

    async def _run(self, call_id: str, endpoint, body) -> None:
        call = None
        try:
            if endpoint not in ENDPOINTS:
                raise OpenAIError("'endpoint' must be chat.completions or completions.", param="endpoint")
            if not isinstance(body, dict):
                raise OpenAIError("'body' must be a JSON object.", param="body")
            serializer_class, start = ENDPOINTS[endpoint]
            call = await start(api_key=self.api_key, data=validated(serializer_class, {**body, "stream": True}))
            async for chunk in call.chunks():
                await self.send_json({"type": "chunk", "id": call_id, "data": chunk})
            await self.send_json({"type": "done", "id": call_id})
        except asyncio.CancelledError:
            await asyncio.shield(self._send_quietly({"type": "cancelled", "id": call_id}))
        except Exception as exc:
            await self._error(call_id, openai_error_or_raise(exc))
        finally:
            if call is not None:
                await call.close()
            self.calls.pop(call_id, None)

    async def _error(self, call_id, error: OpenAIError) -> None:
        await self._send_quietly({"type": "error", "id": call_id, **error.body()})

    async def _send_quietly(self, frame: dict) -> None:
        try:
            await self.send_json(frame)
        except Exception:  # the socket is gone; nothing left to tell
            pass


def _string(value) -> str:
    if not isinstance(value, str):
        raise OpenAIError("'api_key' must be a string.", status=401, code="missing_api_key")
    return value
