"""Routes of the operator dashboard, mounted at /dashboard/ by project/urls.py.

Login uses the admin's authentication form, which already refuses users who are not staff.
"""
from django.contrib.admin.forms import AdminAuthenticationForm
from django.contrib.auth.views import LoginView, LogoutView
from django.urls import path

from tenants.dashboard import views

app_name = "dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    # next_page: a login without ?next= (or after logging out) lands on the overview, not on
    # Django's LOGIN_REDIRECT_URL default, /accounts/profile/ (a 404 here).
    path("login/", LoginView.as_view(template_name="dashboard/login.html", next_page="dashboard:overview",
                                     authentication_form=AdminAuthenticationForm), name="login"),
    path("logout/", LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path("tenants/new/", views.tenant_create, name="tenant-create"),
    path("tenants/<int:pk>/", views.tenant_detail, name="tenant"),
    path("tenants/<int:pk>/limits/", views.tenant_limits, name="tenant-limits"),
    path("tenants/<int:pk>/keys/", views.key_create, name="key-create"),
    path("keys/<int:pk>/revoke/", views.key_revoke, name="key-revoke"),
    path("tenants/<int:pk>/adapters/", views.adapter_register, name="adapter-register"),
    path("adapters/<int:pk>/remove/", views.adapter_remove, name="adapter-remove"),
]
