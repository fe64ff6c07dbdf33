"""Django's stock middleware, with the hooks that do no I/O run on the event loop (under ASGI).

Under ASGI, Django runs every hook of a sync middleware (`process_request`, `process_view`,
`process_response`) through `sync_to_async`: a hand-off to the request's thread and back, each one
a wait behind everything else queued on the event loop. The seven stock middleware made about
fourteen of them per API call (a profile of a burst of /v1/completions calls), for hooks that read
headers and set attributes. These subclasses run such hooks inline, and keep the thread only where
a hook may reach the database: saving a session a view used (sessions, messages), and the CSRF
check of a view that is not exempt (it may read a form body).

settings.MIDDLEWARE keeps naming Django's classes (what `manage.py check --deploy` looks for, and
what WSGI and the test client run); `InlineHooksASGIHandler`, project.asgi's Django application,
loads each one's twin here instead: a subclass of the same name.
"""
from __future__ import annotations

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.sessions import middleware as sessions
from django.core.handlers.asgi import ASGIHandler
from django.middleware import clickjacking, common, csrf, security
from django.test.utils import override_settings
from django.utils.module_loading import import_string


class _InlineHooks:
    """Mixed in before a MiddlewareMixin subclass: under ASGI its hooks run inline, except a
    `process_response` that `response_needs_thread(request)` says may do I/O."""

    def response_needs_thread(self, request) -> bool:
        return False

    def __call__(self, request):
        if not self.async_mode:
            return super().__call__(request)
        return self._call_inline(request)

    async def _call_inline(self, request):
        response = self.process_request(request) if hasattr(self, "process_request") else None
        response = response or await self.get_response(request)
        if not hasattr(self, "process_response"):
            return response
        if self.response_needs_thread(request):
            return await sync_to_async(self.process_response, thread_sensitive=True)(request, response)
        return self.process_response(request, response)


class SecurityMiddleware(_InlineHooks, security.SecurityMiddleware):
    pass


class SessionMiddleware(_InlineHooks, sessions.SessionMiddleware):
    """process_request makes a lazy store (no query); process_response saves a session the view used."""

    def response_needs_thread(self, request) -> bool:
        session = getattr(request, "session", None)
        return session is not None and session.accessed


class CommonMiddleware(_InlineHooks, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(_InlineHooks, csrf.CsrfViewMiddleware):
    """The token lives in a cookie (CSRF_USE_SESSIONS is off; with it on, use Django's own class):
    reading and setting it is no I/O. A csrf-exempt view (every API view) is let through inline;
    the check of any other view runs in the thread."""

    def __init__(self, get_response) -> None:
        super().__init__(get_response)
        if self.async_mode:  # Django adapts process_view by its kind: a coroutine runs inline
            self.process_view = self._process_view_async

    async def _process_view_async(self, request, callback, callback_args, callback_kwargs):
        if getattr(callback, "csrf_exempt", False):
            return None  # Django's own answer for an exempt view
        return await sync_to_async(super().process_view, thread_sensitive=True)(
            request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(_InlineHooks, auth.AuthenticationMiddleware):
    """request.user is lazy: no query until a view reads it."""


class MessageMiddleware(_InlineHooks, messages.MessageMiddleware):
    """Storing messages a view used or added may write the session (a query)."""

    def response_needs_thread(self, request) -> bool:
        storage = getattr(request, "_messages", None)
        return storage is not None and (storage.used or storage.added_new)


class XFrameOptionsMiddleware(_InlineHooks, clickjacking.XFrameOptionsMiddleware):
    pass


class InlineHooksASGIHandler(ASGIHandler):
    """Django's ASGI handler, with each class of settings.MIDDLEWARE that has a twin here replaced by it."""

    def load_middleware(self, is_async=False) -> None:
        with override_settings(MIDDLEWARE=[_twin(path) for path in settings.MIDDLEWARE]):
            super().load_middleware(is_async)


def _twin(path: str) -> str:
    """This module's subclass of the same name as the middleware at `path`, else `path` itself."""
    twin = globals().get(path.rsplit(".", 1)[-1])
    if isinstance(twin, type) and issubclass(twin, import_string(path)):
        return f"{__name__}.{twin.__name__}"
    return path
