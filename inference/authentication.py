"""Bearer API keys for the OpenAI-compatible API (DRF authentication; `request.auth` is the ApiKey)."""
from __future__ import annotations

from rest_framework.authentication import BaseAuthentication

from inference.errors import OpenAIError
from tenants.errors import InvalidApiKey
from tenants.selectors import authenticate_api_key


def api_key_from_header(value: str) -> str:
    scheme, _, key = value.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise OpenAIError("You didn't provide an API key. You need to provide your API key in an Authorization "
                          "header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).", status=401,
                          code="missing_api_key")
    return key.strip()


def authenticate(raw_key: str):
    """The live ApiKey (tenant loaded) behind `raw_key`, or a 401 OpenAIError.

    The same message and code whatever the reason (unknown, revoked, expired, tenant inactive), so
    a caller cannot learn which keys once existed; the reason is logged (tenants.selectors).
    Usually no database query: keys are cached (tenants.key_cache)."""
    try:
        return authenticate_api_key(raw_key=raw_key)
    except InvalidApiKey:
        shown = f"{raw_key[:6]}...{raw_key[-4:]}" if len(raw_key) > 12 else "(hidden)"
        raise OpenAIError(f"Incorrect API key provided: {shown}.", status=401, code="invalid_api_key") from None


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request):
        return None, authenticate(api_key_from_header(request.META.get("HTTP_AUTHORIZATION", "")))

    def authenticate_header(self, request) -> str:
        return 'Bearer realm="api"'
