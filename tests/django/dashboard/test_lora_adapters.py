"""LoRA adapters on the dashboard: staff register and remove them for a tenant (audited under their
name), the tenant page shows each adapter's load state from the replicas' heartbeats, and usage per
model names adapters as their calls did."""
import pytest

from engine.service.protocol import Heartbeat, encode
from tenants.models import AuditLog, LoRAAdapter
from tenants.services import create_api_key, create_tenant, record_usage
from tests.django.dashboard.conftest import make_user
from tests.django.lora_testing import BASE_MODEL, published_model, sync_redis, write_adapter

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
def base():
    with published_model(replicas_max_lora_rank=[16, 16]) as keys:
        yield keys


def test_staff_register_an_adapter_and_see_where_it_is_loaded(staff_client, staff_user, base, tmp_path):
    tenant = create_tenant(name="acme")
    folder = write_adapter(tmp_path / "support", rank=8)
    response = staff_client.post(f"/dashboard/tenants/{tenant.pk}/adapters/",
                                 {"name": "acme-support", "base_model": BASE_MODEL, "path": str(folder)})
    assert response.status_code == 302 and response["Location"] == f"/dashboard/tenants/{tenant.pk}/"
    adapter = LoRAAdapter.objects.get(name="acme-support")
    assert (adapter.tenant, adapter.rank) == (tenant, 8)
    assert AuditLog.objects.get(action="lora_adapter.register").actor == staff_user

    redis = sync_redis()  # replica-0 loaded it, replica-1 could not
    redis.set(base.heartbeat(BASE_MODEL, "replica-0"),
              encode(Heartbeat("replica-0", BASE_MODEL, max_lora_rank=16, lora_adapters=["acme-support"])), ex=60)
    redis.set(base.heartbeat(BASE_MODEL, "replica-1"),
              encode(Heartbeat("replica-1", BASE_MODEL, max_lora_rank=16, lora_errors={"acme-support": "disk full"})),
              ex=60)
    page = staff_client.get(f"/dashboard/tenants/{tenant.pk}/").content.decode()
    assert "acme-support" in page and "loaded on 1 of 2 replicas" in page and "replica-1: disk full" in page
    overview = staff_client.get("/dashboard/").content.decode()
    assert 'title="acme-support"' in overview  # the engines table counts the adapters loaded per model


def test_a_refused_registration_shows_why_and_saves_nothing(staff_client, base, tmp_path):
    tenant = create_tenant(name="acme")
    response = staff_client.post(f"/dashboard/tenants/{tenant.pk}/adapters/",
                                 {"name": "acme-support", "base_model": BASE_MODEL, "path": str(tmp_path / "none")})
    assert response.status_code == 400 and "does not exist" in response.content.decode()
    assert not LoRAAdapter.objects.exists()


def test_staff_remove_an_adapter(staff_client, staff_user, base, tmp_path):
    tenant = create_tenant(name="acme")
    staff_client.post(f"/dashboard/tenants/{tenant.pk}/adapters/",
                      {"name": "acme-support", "base_model": BASE_MODEL, "path": str(write_adapter(tmp_path / "a"))})
    adapter = LoRAAdapter.objects.get(name="acme-support")
    response = staff_client.post(f"/dashboard/adapters/{adapter.pk}/remove/")
    assert response.status_code == 302
    adapter.refresh_from_db()
    assert not adapter.is_active and AuditLog.objects.get(action="lora_adapter.remove").actor == staff_user
    page = staff_client.get(f"/dashboard/tenants/{tenant.pk}/").content.decode()
    assert "removed" in page and f"/dashboard/adapters/{adapter.pk}/remove/" not in page


def test_usage_by_model_shows_adapters_under_their_names(staff_client):
    tenant = create_tenant(name="acme")
    api_key, _ = create_api_key(tenant=tenant)
    for n, (model, completion) in enumerate((("acme-support", 30), ("acme-support", 20), (BASE_MODEL, 5))):
        record_usage(api_key=api_key, request_id=f"u-{n}", model=model, endpoint="chat.completions",
                     prompt_tokens=10, completion_tokens=completion)
    page = staff_client.get(f"/dashboard/tenants/{tenant.pk}/").content.decode()
    table = page[page.index('id="usage-by-model"'):page.index('id="adapters"')]
    assert table.index("acme-support") < table.index(BASE_MODEL)  # most tokens first
    assert "<td class=\"num\">50</td>" in table  # the adapter's two calls' completion tokens


def test_non_staff_cannot_register(client, tmp_path, base):
    tenant = create_tenant(name="acme")
    client.force_login(make_user(staff=False))
    response = client.post(f"/dashboard/tenants/{tenant.pk}/adapters/",
                           {"name": "x1", "base_model": BASE_MODEL, "path": str(write_adapter(tmp_path / "a"))})
    assert response.status_code == 403 and not LoRAAdapter.objects.exists()
