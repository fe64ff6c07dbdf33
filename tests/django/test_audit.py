"""The audit log: services, commands and the admin each leave an entry; none holds key material."""
import json
from io import StringIO

import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.db.models import Max
from django.test import override_settings

from tenants.models import ApiKey, AuditLog, Tenant
from tenants.services import create_api_key, create_tenant, revoke_api_key, rotate_api_key

pytestmark = pytest.mark.usefixtures("db")

# A tenant change form as the admin posts it (the key inline is read-only, so it posts none).
TENANT_FORM = {
    "name": "acme", "is_active": "on", "requests_per_minute": "60",
    "tokens_per_minute": "100000", "max_concurrent_requests": "8", "token_budget": "",
    "budget_period": "month", "max_tokens_cap": "4096", "max_prompt_tokens": "8192",
    "priority_tier": "0", "max_sequences_per_request": "256", "max_sequences_in_flight": "256",
    "api_keys-TOTAL_FORMS": "0", "api_keys-INITIAL_FORMS": "0",
    "api_keys-MIN_NUM_FORMS": "0", "api_keys-MAX_NUM_FORMS": "1000",
}


@pytest.fixture
def root():
    # A fast hasher: PBKDF2 costs seconds per test here, and passwords are not what is tested.
    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield get_user_model().objects.create_superuser("root", "root@example.com", "pw")


@pytest.fixture
def admin_client(client, root):
    assert client.login(username="root", password="pw")
    return client


@pytest.fixture
def entries():
    """The audit entries this test writes, optionally of one action (others may be committed)."""
    baseline = AuditLog.objects.aggregate(last=Max("pk"))["last"] or 0

    def written(action: str | None = None) -> list[AuditLog]:
        rows = AuditLog.objects.filter(pk__gt=baseline).order_by("pk")
        return list(rows.filter(action=action) if action else rows)

    return written


def test_services_log_who_did_what(root, entries):
    tenant = create_tenant(name="acme", requests_per_minute=5)
    api_key, _ = create_api_key(tenant=tenant, name="ci", allowed_models=["m"], actor=root)
    revoke_api_key(api_key=api_key, actor="command")
    revoke_api_key(api_key=api_key, actor="command")  # no change, no entry

    (created,) = entries("tenant.create")
    assert (created.actor, created.actor_label, created.tenant) == (None, "system", tenant)
    assert created.target == "acme" and created.changes["requests_per_minute"] == [None, 5]
    assert created.changes["token_budget"] == [None, None]
    (key_created,) = entries("api_key.create")
    assert (key_created.actor, key_created.actor_label) == (root, "root")
    assert key_created.tenant == tenant
    assert key_created.changes["allowed_models"] == [None, ["m"]]
    assert key_created.target == str(api_key)
    (revoked,) = entries("api_key.revoke")
    assert revoked.actor_label == "command" and revoked.changes["revoked_at"][0] is None


def test_rotation_is_one_entry(entries):
    tenant = create_tenant(name="acme")
    old, _ = create_api_key(tenant=tenant)
    new, _ = rotate_api_key(api_key=old, actor="command")
    assert len(entries()) == 3  # tenant.create, api_key.create, api_key.rotate
    (rotated,) = entries("api_key.rotate")
    assert rotated.target == str(old) and rotated.changes["replaced_by"] == [None, new.prefix]
    assert rotated.changes["revoked_at"][0] is None and rotated.changes["revoked_at"][1]


def test_commands_log_as_command(entries):
    call_command("create_tenant", "acme", stdout=StringIO())
    call_command("create_api_key", "acme", stdout=StringIO())
    assert {(entry.action, entry.actor_label) for entry in entries()} == {
        ("tenant.create", "command"), ("api_key.create", "command"),
    }


def test_admin_tenant_change_logs_the_changed_fields(admin_client, root, entries):
    tenant = create_tenant(name="acme")
    url = f"/admin/tenants/tenant/{tenant.pk}/change/"
    response = admin_client.post(url, {**TENANT_FORM, "requests_per_minute": "120"})
    assert response.status_code == 302, response.context and response.context["errors"]
    (updated,) = entries("tenant.update")
    assert (updated.actor, updated.tenant, updated.target) == (root, tenant, "acme")
    assert updated.changes == {"requests_per_minute": [60, 120]}
    admin_client.post(url, {**TENANT_FORM, "requests_per_minute": "120"})  # nothing changed
    assert len(entries("tenant.update")) == 1


def test_admin_tenant_add_and_delete_are_logged(admin_client, entries):
    response = admin_client.post("/admin/tenants/tenant/add/", {**TENANT_FORM, "name": "globex"})
    assert response.status_code == 302
    tenant = Tenant.objects.get(name="globex")
    (created,) = entries("tenant.create")
    assert created.actor_label == "root" and created.changes["name"] == [None, "globex"]

    response = admin_client.post(f"/admin/tenants/tenant/{tenant.pk}/delete/", {"post": "yes"})
    assert response.status_code == 302 and not Tenant.objects.filter(pk=tenant.pk).exists()
    (deleted,) = entries("tenant.delete")
    assert deleted.tenant is None and deleted.target == "globex"  # outlives the tenant
    assert deleted.changes["name"] == ["globex", None]


def test_admin_key_change_and_revoke_action_are_logged(admin_client, root, entries):
    api_key, _ = create_api_key(tenant=create_tenant(name="acme"), name="old")
    response = admin_client.post(f"/admin/tenants/apikey/{api_key.pk}/change/", {
        "name": "new", "allowed_models": '["m"]', "expires_at_0": "", "expires_at_1": "",
        "requests_per_minute": "7", "tokens_per_minute": "", "max_concurrent_requests": "",
    })
    assert response.status_code == 302, response.context and response.context["errors"]
    (updated,) = entries("api_key.update")
    assert updated.changes == {
        "name": ["old", "new"], "allowed_models": [[], ["m"]], "requests_per_minute": [None, 7],
    }
    admin_client.post(
        "/admin/tenants/apikey/", {"action": "revoke_selected", "_selected_action": [api_key.pk]}
    )
    (revoked,) = entries("api_key.revoke")
    assert (revoked.actor, revoked.tenant.name) == (root, "acme")
    admin_client.post(f"/admin/tenants/apikey/{api_key.pk}/delete/", {"post": "yes"})
    assert not ApiKey.objects.filter(pk=api_key.pk).exists()
    assert len(entries("api_key.delete")) == 1


def test_no_entry_holds_a_key_or_its_hash(admin_client, entries):
    tenant = create_tenant(name="acme")
    api_key, raw_key = create_api_key(tenant=tenant)
    rotated, rotated_raw = rotate_api_key(api_key=api_key)
    secrets = {raw_key, raw_key.split(".")[1], rotated_raw, rotated_raw.split(".")[1]}
    secrets |= {api_key.hashed_key, rotated.hashed_key}
    admin_client.post(f"/admin/tenants/apikey/{rotated.pk}/delete/", {"post": "yes"})
    assert len(entries("api_key.delete")) == 1
    for row in AuditLog.objects.values():
        text = json.dumps(row, default=str)
        assert "hashed_key" not in text
        assert not any(secret in text for secret in secrets), row["action"]


def test_audit_and_usage_are_read_only_in_the_admin(admin_client, entries):
    create_tenant(name="acme")
    (entry,) = entries()
    for model in ("auditlog", "usageevent", "dailyusage"):
        assert admin_client.get(f"/admin/tenants/{model}/").status_code == 200
        assert admin_client.get(f"/admin/tenants/{model}/add/").status_code == 403
    page = f"/admin/tenants/auditlog/{entry.pk}/"
    assert admin_client.get(page + "change/").status_code == 200  # to look at
    assert admin_client.post(page + "change/", {"action": "x"}).status_code == 403
    assert admin_client.post(page + "delete/", {"post": "yes"}).status_code == 403
    assert AuditLog.objects.filter(pk=entry.pk).exists()
