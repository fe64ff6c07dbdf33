"""Every error the API returns, in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.

Views raise `OpenAIError`; DRF's own exceptions (bad JSON, wrong method, ...) are translated by
`openai_exception_handler`, so a client never sees another shape, bad input never a 500, and a
busy database pool a 503 with `Retry-After` (as do the SSE and websocket paths, through `expected_error`).
"""
from __future__ import annotations

from django.http import JsonResponse
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt
from psycopg_pool import PoolTimeout, TooManyRequests
from redis.exceptions import RedisError
from rest_framework import exceptions
from rest_framework.response import Response

from inference import metrics


class OpenAIError(Exception):
    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None) -> None:
        message, param = _writable(message), None if param is None else _writable(param)
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JsonResponse:
        response = JsonResponse(self.body(), status=self.status)
        for name, value in self.headers.items():
            response[name] = value
        return response


def _writable(text: str) -> str:
    """`text` without lone surrogates (as `\\ud800`): an error may quote the input that caused it,
    and a surrogate in it would make the error itself unencodable (a 500 instead of the 400)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def invalid(param: str | None, message: str, code: str | None = None) -> OpenAIError:
    """A 400 about one request field."""
    return OpenAIError(message, param=param, code=code)


def model_not_found(model: str) -> OpenAIError:
    """The one answer for a model that is unknown, not served, or another tenant's adapter (no existence leak)."""
    return OpenAIError(f"The model `{model}` does not exist or you do not have access to it.", status=404,
                       param="model", code="model_not_found")


def from_drf(exc: exceptions.APIException) -> OpenAIError:
    if isinstance(exc, exceptions.ParseError):
        return OpenAIError(
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your "
            "HTTP library correctly. The OpenAI API expects a JSON payload.)", code="invalid_json")
    if isinstance(exc, exceptions.UnsupportedMediaType):
        return OpenAIError(f"Unsupported content type: {exc.detail}. Send application/json.", status=415,
                           code="unsupported_media_type")
    if isinstance(exc, exceptions.MethodNotAllowed):
        return OpenAIError(str(exc.detail), status=405, code="method_not_allowed")
    if isinstance(exc, exceptions.NotFound):
        return OpenAIError(str(exc.detail), status=404, code="not_found")
    if isinstance(exc, (exceptions.NotAuthenticated, exceptions.AuthenticationFailed)):
        return OpenAIError(str(exc.detail), status=401, code="invalid_api_key")
    if isinstance(exc, exceptions.ValidationError):
        param, message = _first_error(exc.detail)
        return invalid(param, message)
    return OpenAIError(str(exc.detail), status=exc.status_code)


def _first_error(detail, path: str = "") -> tuple[str | None, str]:
    """The first error of a (nested) DRF error detail: its dotted `param` path and a message."""
    if isinstance(detail, dict):
        name, value = next((k, v) for k, v in detail.items() if v)
        if name == "non_field_errors":
            return _first_error(value, path)
        key = f"[{name}]" if isinstance(name, int) or str(name).isdigit() else (f".{name}" if path else str(name))
        return _first_error(value, path + key)
    if isinstance(detail, list):
        index, value = next((i, v) for i, v in enumerate(detail) if v)
        return _first_error(value, f"{path}[{index}]" if isinstance(value, dict) else path)
    message = str(detail)
    return (path or None), (f"Invalid value for '{path}': {message}" if path else message)


@csrf_exempt  # an unknown URL is a 404 on every method, not CSRF's 403 page for a POST
def not_found(request, exception=None) -> JsonResponse:
    """Unknown /v1/ URLs answer in OpenAI's shape too (whatever DEBUG says)."""
    return OpenAIError(f"Invalid URL ({request.method} {request.path})", status=404, code="unknown_url").response()


HTML_PREFIXES = ("/admin/", "/dashboard/", "/accounts/")  # pages for people in a browser


def page_not_found(request, exception=None):
    """handler404 (DEBUG off): OpenAI's shape for API clients, Django's page for the admin and dashboard."""
    if request.path.startswith(HTML_PREFIXES):
        return defaults.page_not_found(request, exception)
    return not_found(request, exception)


def method_not_allowed(request, allowed: list[str]) -> JsonResponse:
    """405 with `Allow`, in OpenAI's shape: a wrong method can never succeed, so it is said before auth."""
    error = OpenAIError(f"Method {request.method} is not allowed on {request.path}; allowed: {', '.join(allowed)}.",
                        status=405, code="method_not_allowed", headers={"Allow": ", ".join(allowed)})
    metrics.observe_error(status=405)
    return error.response()


def server_busy() -> OpenAIError:
    """503 when no database connection came free in time: retrying soon works; a 500 would say it never will."""
    return OpenAIError("The service is busy; please retry.", status=503, type="server_error", code="server_busy",
                       headers={"Retry-After": "1"})


def expected_error(exc: Exception) -> OpenAIError | None:
    """The OpenAIError for what the API raises on purpose or meets when a dependency is out of
    reach (Redis, a database pool with no free connection); None for a real bug."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, exceptions.APIException):
        return from_drf(exc)
    if isinstance(exc, RedisError):
        return OpenAIError(f"The service cannot reach Redis ({exc}); retry shortly.", status=503,
                           type="server_error", code="service_unavailable")
    if _caused_by(exc, (PoolTimeout, TooManyRequests)):  # Django wraps them in its OperationalError
        return server_busy()
    return None


def openai_error_or_raise(exc: Exception) -> OpenAIError:
    """`expected_error(exc)` for the paths that answer in frames or events (SSE, websockets); a
    real bug is raised again, for the server's log."""
    error = expected_error(exc)
    if error is None:
        raise exc
    return error


def _caused_by(exc: BaseException | None, kinds: tuple[type[BaseException], ...]) -> bool:
    while exc is not None:
        if isinstance(exc, kinds):
            return True
        exc = exc.__cause__
    return False


def openai_exception_handler(exc, context) -> Response | None:
    """DRF's EXCEPTION_HANDLER: the OpenAI shape for everything `expected_error` knows."""
    error = expected_error(exc)
    if error is None:
        return None  # a real bug: Django's 500 (and its log)
    metrics.observe_error(status=error.status)
    return Response(error.body(), status=error.status, headers=error.headers)
