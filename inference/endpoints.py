"""The inference endpoints, one registry for every way a call arrives: websocket frames name them
(`"endpoint": "chat.completions"`), batch lines and batch jobs by URL (`"/v1/chat/completions"`), and
each brings its request serializer and the service that starts it. A field or endpoint added here is
the same on every transport (the REST views use the same serializers and services).
"""
from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from inference import services
from inference.serializers import ChatCompletionRequestSerializer, CompletionRequestSerializer


@dataclass(frozen=True)
class Endpoint:
    name: str  # as websocket frames name it
    path: str  # as REST, batch lines and batch jobs name it
    serializer: type
    start: Callable[..., Awaitable[services.Call]]


ENDPOINTS = (
    Endpoint("chat.completions", "/v1/chat/completions", ChatCompletionRequestSerializer, services.start_chat),
    Endpoint("completions", "/v1/completions", CompletionRequestSerializer, services.start_completion),
)
BY_NAME = {endpoint.name: endpoint for endpoint in ENDPOINTS}
BY_PATH = {endpoint.path: endpoint for endpoint in ENDPOINTS}
