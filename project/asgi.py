"""ASGI entry point (daphne): HTTP through Django, websockets through Channels."""
import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
from engine import tracing  # noqa: E402 (imports no torch)

if tracing.configure("llm-web"):  # before the application is built: the instrumentation adds a middleware
    from opentelemetry.instrumentation.django import DjangoInstrumentor

    DjangoInstrumentor().instrument()
django.setup(set_prefix=False)  # as get_asgi_application() does, before the routing imports models
from project.middleware import InlineHooksASGIHandler  # noqa: E402 (imports the apps' middleware)

django_http = InlineHooksASGIHandler()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from inference.body_limit import BodySizeLimit  # noqa: E402
from inference.reason_phrases import complete_reason_phrases  # noqa: E402
from inference.request_cleanup import CloseWhenRequestEnds  # noqa: E402
from inference.routing import websocket_urlpatterns  # noqa: E402
from inference.warmup import start_when_serving  # noqa: E402

complete_reason_phrases()  # daphne's status lines: "429 Too Many Requests", not "429 Unknown Status"
start_when_serving()  # what a first call would pay (tokenizers, connections, imports), paid at start
application = ProtocolTypeRouter({
    "http": BodySizeLimit(CloseWhenRequestEnds(django_http)),
    "websocket": URLRouter(websocket_urlpatterns),
})
