"""Websocket streaming at /v1/ws: the same calls and chunk objects as SSE, multiplexed by id.

Frames from the client (JSON):
  {"type": "auth", "api_key": "sk-..."}                  (unless an Authorization header was sent)
  {"type": "request", "id": "r1", "endpoint": "chat.completions" | "completions", "body": {...}}
  {"type": "cancel", "id": "r1"}
Frames to the client: {"type": "chunk", "id", "data": <chunk>}, {"type": "done", "id"},
{"type": "cancelled", "id"}, {"type": "error", "id", "error": {message, type, param, code}}.

A socket costs its process something before it does any work, so: it must authenticate within
WS_AUTH_TIMEOUT_S (else close 4408), a tenant has at most WS_MAX_PER_TENANT open sockets over all
processes and a process at most WS_MAX_PER_PROCESS (else close 4429 or 1013); each refusal sends
an error frame first. The key is checked again before each request (one Redis GET: the key cache),
so a revoked key or deactivated tenant closes the socket (4401) instead of going on serving.
"""
from __future__ import annotations

import asyncio
import uuid

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.conf import settings

from inference import json_parsing, services
from inference.admission_gate import admission_gate
from inference.authentication import api_key_from_header, authenticate
from inference.engine_client import get_engine_client
from inference.errors import OpenAIError, openai_error_or_raise
from inference.lease_semaphore import LeaseSemaphore
from inference.endpoints import BY_NAME
from inference.serializers import validated

MAX_ID_LENGTH = 128
SOCKET_LEASE_S = 60  # a tenant's socket count forgets the sockets of a dead process this late
CLOSE_UNAUTHORIZED, CLOSE_AUTH_TIMEOUT, CLOSE_TOO_MANY, CLOSE_TRY_LATER = 4401, 4408, 4429, 1013
_open_sockets = 0  # in this process (one event loop: a plain counter)


class InferenceConsumer(AsyncJsonWebsocketConsumer):
    async def connect(self) -> None:
        global _open_sockets
        self.api_key = self.raw_key = self.tenant_socket = None
        self.calls: dict[str, asyncio.Task] = {}
        self.chores: list[asyncio.Task] = []
        self.counted = _open_sockets < settings.WS_MAX_PER_PROCESS
        await self.accept()
        if not self.counted:
            return await self._refuse(OpenAIError(
                f"This server has {settings.WS_MAX_PER_PROCESS} websockets open, its limit; retry shortly.",
                status=503, type="server_error", code="too_many_connections"), CLOSE_TRY_LATER)
        _open_sockets += 1
        header = dict(self.scope.get("headers", [])).get(b"authorization")
        if header is not None:
            await self._authenticate(lambda: api_key_from_header(header.decode("latin-1")))
        else:
            self.chores.append(asyncio.create_task(self._auth_deadline()))

    async def disconnect(self, code) -> None:
        global _open_sockets
        if self.counted:
            self.counted, _open_sockets = False, _open_sockets - 1
        for task in [*self.calls.values(), *self.chores]:
            task.cancel()
        await asyncio.gather(*self.calls.values(), *self.chores, return_exceptions=True)
        if self.tenant_socket is not None:
            await self.tenant_socket.release()

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
        if kind == "auth" and self.api_key is None:
            return await self._authenticate(lambda: _string(content.get("api_key")))
        if kind == "auth":
            return await self._error(None, OpenAIError("This socket is authenticated already.", param="type"))
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
        try:  # a revoked key, or a deactivated tenant, takes no new work
            self.api_key = await database_sync_to_async(authenticate)(self.raw_key)
        except Exception as exc:
            return await self._refuse(openai_error_or_raise(exc), CLOSE_UNAUTHORIZED, call_id=call_id)
        self.calls[call_id] = asyncio.create_task(self._run(call_id, content.get("endpoint"), content.get("body")))
        return None

    async def _authenticate(self, read_key) -> None:
        try:
            raw_key = read_key()
            api_key = await database_sync_to_async(authenticate)(raw_key)
        except Exception as exc:
            error = openai_error_or_raise(exc)
            return await self._refuse(error, CLOSE_UNAUTHORIZED if error.status == 401 else CLOSE_TRY_LATER)
        tenant_socket = LeaseSemaphore(
            get_engine_client().redis, key=f"{settings.ENGINE_KEY_PREFIX}:ws-sockets:{{t{api_key.tenant_id}}}",
            member=uuid.uuid4().hex, cap=settings.WS_MAX_PER_TENANT, lease_s=SOCKET_LEASE_S)
        if not await tenant_socket.acquire():
            return await self._refuse(OpenAIError(
                f"Tenant {api_key.tenant.name!r} has {settings.WS_MAX_PER_TENANT} websockets open, its limit; "
                "close one first.", status=429, type="requests", code="too_many_connections"), CLOSE_TOO_MANY)
        self.api_key, self.raw_key, self.tenant_socket = api_key, raw_key, tenant_socket
        self.chores.append(asyncio.create_task(self._renew(tenant_socket)))
        await self.send_json({"type": "authenticated"})

    async def _auth_deadline(self) -> None:
        await asyncio.sleep(settings.WS_AUTH_TIMEOUT_S)
        if self.api_key is None:
            await self._refuse(OpenAIError(f"Authenticate within {settings.WS_AUTH_TIMEOUT_S} s of connecting.",
                                           status=401, code="auth_timeout"), CLOSE_AUTH_TIMEOUT)

    @staticmethod
    async def _renew(tenant_socket: LeaseSemaphore) -> None:
        while True:
            await asyncio.sleep(SOCKET_LEASE_S / 3)
            await tenant_socket.acquire()

    async def _refuse(self, error: OpenAIError, close_code: int, call_id=None) -> None:
        """Say why in an error frame, then close with `close_code`."""
        await self._error(call_id, error)
        try:
            await self.close(code=close_code)
        except Exception:  # already gone
            pass

    async def _run(self, call_id: str, endpoint, body) -> None:
        call = None
        try:
            # As over REST: admitted in turns (inference.admission_gate), and a refused frame is a request.
            async with admission_gate().turn(), services.refusal_counted(self.api_key):
                if not isinstance(endpoint, str) or endpoint not in BY_NAME:
                    raise OpenAIError("'endpoint' must be chat.completions or completions.", param="endpoint")
                if not isinstance(body, dict):
                    raise OpenAIError("'body' must be a JSON object.", param="body")
                serializer_class, start = BY_NAME[endpoint].serializer, BY_NAME[endpoint].start
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
