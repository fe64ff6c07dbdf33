"""Root URL routes: each app owns its own urls.py; this file only mounts them."""
from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("dashboard/", include("tenants.dashboard.urls")),
    path("", include("inference.urls")),
]
handler404 = "inference.errors.page_not_found"  # DEBUG off: API clients get OpenAI's shape (/v1/ always does)
