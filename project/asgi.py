"""ASGI entry point (daphne): HTTP through Django, websockets through Channels."""
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
from engine import tracing  # noqa: E402 (imports no torch)

if tracing.configure("llm-web"):  # before the application is built: the instrumentation adds a middleware
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    DjangoInstrumentor().instrument()
django_http = get_asgi_application()  # sets Django up before the routing imports models

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from inference.body_limit import BodySizeLimit  # noqa: E402
from inference.reason_phrases import complete_reason_phrases  # noqa: E402
from inference.request_cleanup import CloseWhenRequestEnds  # noqa: E402
from inference.routing import websocket_urlpatterns  # noqa: E402

complete_reason_phrases()  # daphne's status lines: "429 Too Many Requests", not "429 Unknown Status"
application = ProtocolTypeRouter({
    "http": BodySizeLimit(CloseWhenRequestEnds(django_http)),
    "websocket": URLRouter(websocket_urlpatterns),
})
