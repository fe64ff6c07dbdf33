"""HTTP endpoints of the inference app: thin views that call selectors and services."""
from django.http import HttpRequest, JsonResponse
from django.views import View

from inference.selectors import redis_is_reachable


class HealthApi(View):
    """`GET /health`: the web process is up (`status`), and whether it reaches Redis.

    Always 200 while Django answers, so a load balancer does not drop the web
    tier for a Redis outage; monitoring reads the `redis` flag.
    """

    def get(self, request: HttpRequest) -> JsonResponse:
        return JsonResponse({"status": "ok", "redis": redis_is_reachable()})
