"""A wrong HTTP method on a known endpoint is a 405 in OpenAI's shape, with `Allow`, before anything else.

DRF authenticates before it looks at the method, so `GET /v1/completions` without a key was a 401 and
with one a 405 without a word on what to use; a request that can never succeed should say so first.
"""
from __future__ import annotations

import functools

from asgiref.sync import iscoroutinefunction

from inference.errors import method_not_allowed


def allowed_methods(view_class) -> list[str]:
    """The methods `view_class` answers, in Django's order (HEAD wherever GET is, as Django serves it)."""
    methods = [m for m in view_class.http_method_names if hasattr(view_class, m)]
    if "get" in methods and "head" not in methods:
        methods.insert(methods.index("options") if "options" in methods else len(methods), "head")
    return [m.upper() for m in methods]


def methods_first(view):
    """`view` (from `as_view()`), refusing any method its class does not answer with a 405."""
    allowed = allowed_methods(view.view_class)

    if iscoroutinefunction(view):
        @functools.wraps(view)
        async def guarded(request, *args, **kwargs):
            if request.method not in allowed:
                return method_not_allowed(request, allowed)
            return await view(request, *args, **kwargs)
    else:
        @functools.wraps(view)
        def guarded(request, *args, **kwargs):
            if request.method not in allowed:
                return method_not_allowed(request, allowed)
            return view(request, *args, **kwargs)
    return guarded
