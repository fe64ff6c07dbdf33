"""The ASGI application runs settings.MIDDLEWARE as project.middleware's twins (their hooks that do
no I/O on the event loop), and what the middleware do still happens: the admin's login through it
(a CSRF check, a session saved, a redirect) works, and answers carry the security headers."""
from __future__ import annotations

import asyncio
import re
import uuid

import httpx2 as httpx
from django.contrib.auth.models import User

from project import middleware


def test_the_asgi_application_loads_the_twins_and_the_admin_login_works_through_it():
    from project.asgi import application, django_http

    assert any(getattr(hook, "__func__", None) is middleware.CsrfViewMiddleware._process_view_async
               for hook in django_http._view_middleware)
    name, password = f"admin-{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    User.objects.create_superuser(username=name, password=password, email="")  # committed: the app reads it

    async def log_in():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=application),
                                     base_url="http://testserver") as client:
            form = await client.get("/admin/login/")
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text).group(1)
            login = await client.post("/admin/login/?next=/admin/", data={
                "username": name, "password": password, "csrfmiddlewaretoken": token})
            index = await client.get("/admin/")
            refused = await client.post("/admin/logout/")  # no CSRF token: refused by the check
            return form, login, index, refused

    form, login, index, refused = asyncio.run(log_in())
    assert form.status_code == 200 and form.headers["x-frame-options"] == "DENY"
    assert form.headers["x-content-type-options"] == "nosniff"
    assert login.status_code == 302 and login.headers["location"] == "/admin/" and "sessionid" in login.cookies
    assert index.status_code == 200 and "Site administration" in index.text
    assert refused.status_code == 403
