"""Admin for tenants and keys: lists render, keys cannot be added there, the hash is read-only, revoke works."""
import pytest
from django.contrib.auth import get_user_model

from tenants.models import ApiKey
from tenants.services import create_api_key, create_tenant

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
def admin_client(client):
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    return client


def test_lists_render_and_add_key_is_off(admin_client):
    tenant = create_tenant(name="acme")
    api_key, _ = create_api_key(tenant=tenant)
    assert admin_client.get("/admin/tenants/tenant/").status_code == 200
    assert admin_client.get(f"/admin/tenants/tenant/{tenant.pk}/change/").status_code == 200
    listing = admin_client.get("/admin/tenants/apikey/")
    assert listing.status_code == 200 and api_key.prefix in listing.content.decode()
    assert admin_client.get("/admin/tenants/apikey/add/").status_code == 403


def test_hash_and_prefix_are_not_editable(admin_client):
    api_key, _ = create_api_key(tenant=create_tenant(name="acme"))
    page = admin_client.get(f"/admin/tenants/apikey/{api_key.pk}/change/")
    assert page.status_code == 200
    form = page.context["adminform"].form
    assert "hashed_key" not in form.fields and "prefix" not in form.fields


def test_revoke_selected_action(admin_client):
    tenant = create_tenant(name="acme")
    keys = [create_api_key(tenant=tenant)[0] for _ in range(2)]
    keep, _ = create_api_key(tenant=tenant)
    response = admin_client.post(
        "/admin/tenants/apikey/",
        {"action": "revoke_selected", "_selected_action": [k.pk for k in keys]},
    )
    assert response.status_code == 302
    assert all(ApiKey.objects.get(pk=k.pk).revoked_at for k in keys)
    assert ApiKey.objects.get(pk=keep.pk).revoked_at is None
