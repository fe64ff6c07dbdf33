"""ASGI entry point: the one that streaming (SSE now, websockets via Channels later) needs."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")

application = get_asgi_application()
