"""Websocket routes of the inference app (mounted by project/asgi.py)."""
from django.urls import path

from inference.consumers import InferenceConsumer

websocket_urlpatterns = [
    path("v1/ws", InferenceConsumer.as_asgi()),
]
