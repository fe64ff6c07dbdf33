"""LoRA adapters owned by tenants: registration checks the adapter (clear errors, nothing written when
refused), tells the replicas through the adapter hash, audits; ownership reads come from a process
cache that a registration or removal anywhere ends at once; only the owner's keys find an adapter."""
from io import StringIO

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from engine.service.lora_control import registered_adapters
from engine.service.protocol import Heartbeat, encode
from tenants.errors import LoRAAdapterRefused
from tenants.lora_cache import lora_adapter_cache
from tenants.lora_selectors import callable_lora_adapters, owned_lora_adapter
from tenants.lora_services import register_lora_adapter, remove_lora_adapter
from tenants.models import AuditLog, LoRAAdapter
from tenants.services import create_api_key, create_tenant
from tests.django.admission_testing import run
from tests.django.lora_testing import BASE_MODEL, published_model, sync_redis, write_adapter

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
def base():
    with published_model() as keys:
        yield keys


def registered_in_redis() -> dict:
    return registered_adapters(sync_redis(), BASE_MODEL, key_prefix=settings.ENGINE_KEY_PREFIX)


def test_registration_reads_the_adapter_tells_the_replicas_and_audits(base, tmp_path):
    tenant = create_tenant(name="acme")
    folder = write_adapter(tmp_path / "support", rank=8, alpha=16)
    adapter = register_lora_adapter(tenant=tenant, name="acme-support", base_model=BASE_MODEL, path=str(folder),
                                    actor="command")
    adapter.refresh_from_db()
    assert (adapter.tenant, adapter.base_model, adapter.rank, adapter.alpha) == (tenant, BASE_MODEL, 8, 16.0)
    assert adapter.is_active and adapter.path == str(folder)
    path, int_id = registered_in_redis()["acme-support"]
    assert path == str(folder) and int_id >= 1
    entry = AuditLog.objects.get(action="lora_adapter.register")
    assert (entry.tenant, entry.target, entry.actor_label) == (tenant, "acme-support", "command")
    assert entry.changes["rank"] == [None, 8] and entry.changes["path"] == [None, str(folder)]


def test_a_relative_path_is_stored_absolute(base, tmp_path, monkeypatch):
    write_adapter(tmp_path / "rel")
    monkeypatch.chdir(tmp_path)
    adapter = register_lora_adapter(tenant=create_tenant(name="acme"), name="a1", base_model=BASE_MODEL, path="rel")
    assert adapter.path == str(tmp_path / "rel")
    assert registered_in_redis()["a1"][0] == str(tmp_path / "rel")


@pytest.mark.parametrize("make, message", [
    (lambda root: root / "nowhere", "does not exist"),
    (lambda root: _broken(write_adapter(root / "a"), "adapter_config.json", "{not json"), "not valid JSON"),
    (lambda root: write_adapter(root / "a", config={"r": 0}), "r must be a positive integer"),
    (lambda root: write_adapter(root / "a", config={"use_dora": True}), "DoRA"),
    (lambda root: _broken(write_adapter(root / "a"), "adapter_model.safetensors", None), "adapter_model.safetensors"),
    (lambda root: write_adapter(root / "a", rank=32), "rank 32, but the replicas of 'acme/base-model' load ranks up to 16"),
])
def test_a_bad_adapter_is_refused_with_the_reason_and_nothing_is_written(base, tmp_path, make, message):
    tenant = create_tenant(name="acme")
    with pytest.raises(LoRAAdapterRefused, match=message):
        register_lora_adapter(tenant=tenant, name="bad", base_model=BASE_MODEL, path=str(make(tmp_path)))
    assert not LoRAAdapter.objects.exists() and not AuditLog.objects.filter(action__startswith="lora").exists()
    assert registered_in_redis() == {}


def _broken(folder, file_name: str, content: str | None):
    if content is None:
        (folder / file_name).unlink()
    else:
        (folder / file_name).write_text(content)
    return folder


def test_the_rank_is_checked_against_every_live_replica_and_lora_must_be_on(tmp_path):
    tenant, folder = create_tenant(name="acme"), write_adapter(tmp_path / "a", rank=16)
    with published_model(replicas_max_lora_rank=[32, 8]):
        with pytest.raises(LoRAAdapterRefused, match="load ranks up to 8"):
            register_lora_adapter(tenant=tenant, name="a1", base_model=BASE_MODEL, path=str(folder))
    with published_model(replicas_max_lora_rank=[0]):
        with pytest.raises(LoRAAdapterRefused, match="run without LoRA"):
            register_lora_adapter(tenant=tenant, name="a1", base_model=BASE_MODEL, path=str(folder))
    with published_model(replicas_max_lora_rank=[]):  # none live: each replica checks as it loads
        assert register_lora_adapter(tenant=tenant, name="a1", base_model=BASE_MODEL, path=str(folder)).rank == 16


def test_names_must_be_model_names_free_of_clashes(base, tmp_path):
    acme, other = create_tenant(name="acme"), create_tenant(name="other")
    folder = write_adapter(tmp_path / "a")
    register_lora_adapter(tenant=acme, name="acme-support", base_model=BASE_MODEL, path=str(folder))
    for tenant, name, message in ((other, "acme-support", "taken by another LoRA adapter"),
                                  (acme, "acme-support", "taken by another LoRA adapter"),
                                  (other, BASE_MODEL, "is a base model's"),
                                  (other, "has space", "Use letters, digits"),
                                  (other, "-leading-dash", "Use letters, digits"),
                                  (other, "x" * 201, "longer than 200")):
        with pytest.raises(LoRAAdapterRefused, match=message):
            register_lora_adapter(tenant=tenant, name=name, base_model=BASE_MODEL, path=str(folder))
    with pytest.raises(LoRAAdapterRefused, match="no engine replica has served the base model 'acme/unknown'"):
        register_lora_adapter(tenant=other, name="other-1", base_model="acme/unknown", path=str(folder))
    assert list(LoRAAdapter.objects.values_list("name", "tenant__name")) == [("acme-support", "acme")]


def test_removal_unregisters_audits_once_and_keeps_the_name(base, tmp_path):
    tenant = create_tenant(name="acme")
    adapter = register_lora_adapter(tenant=tenant, name="a1", base_model=BASE_MODEL,
                                    path=str(write_adapter(tmp_path / "a")))
    remove_lora_adapter(adapter=adapter, actor="command")
    first = adapter.disabled_at
    remove_lora_adapter(adapter=adapter)
    adapter.refresh_from_db()
    assert not adapter.is_active and adapter.disabled_at == first
    assert registered_in_redis() == {}
    assert AuditLog.objects.filter(action="lora_adapter.remove").count() == 1
    with pytest.raises(LoRAAdapterRefused, match="taken"):
        register_lora_adapter(tenant=tenant, name="a1", base_model=BASE_MODEL, path=adapter.path)


def test_only_the_owners_keys_find_an_adapter_and_changes_reach_the_cache_at_once(base, tmp_path):
    acme, other = create_tenant(name="acme"), create_tenant(name="other")
    acme_key, _ = create_api_key(tenant=acme)
    narrow_key, _ = create_api_key(tenant=acme, allowed_models=[BASE_MODEL])
    other_key, _ = create_api_key(tenant=other)
    folder = str(write_adapter(tmp_path / "a"))
    adapter = register_lora_adapter(tenant=acme, name="acme-support", base_model=BASE_MODEL, path=folder)

    def owned(api_key, name="acme-support"):
        return run(lambda redis: owned_lora_adapter(redis_client=redis, api_key=api_key, name=name))

    found = owned(acme_key)
    assert (found.name, found.base_model, found.path, found.tenant_id) == ("acme-support", BASE_MODEL, folder, acme.pk)
    assert owned(other_key) is None and owned(narrow_key) is None and owned(acme_key, "nope") is None
    loaded_at = lora_adapter_cache._loaded_at
    assert owned(acme_key) == found and lora_adapter_cache._loaded_at == loaded_at  # cached: no reload
    register_lora_adapter(tenant=other, name="other-1", base_model=BASE_MODEL, path=folder)
    listed = run(lambda redis: callable_lora_adapters(redis_client=redis, api_key=other_key))
    assert [a.name for a in listed] == ["other-1"] and lora_adapter_cache._loaded_at > loaded_at
    remove_lora_adapter(adapter=adapter)
    assert owned(acme_key) is None


def test_the_command_registers_and_removes(base, tmp_path):
    create_tenant(name="acme")
    folder = write_adapter(tmp_path / "a", rank=4, alpha=8)
    out = StringIO()
    call_command("register_lora_adapter", "--tenant", "acme", "--name", "acme-1", "--base-model", BASE_MODEL,
                 "--path", str(folder), "--wait", "0", stdout=out)
    assert "Registered LoRA adapter 'acme-1' (rank 4, alpha 8)" in out.getvalue()
    assert "Loaded on 0 of 1 replicas so far" in out.getvalue()  # the heartbeat here never loads anything
    assert AuditLog.objects.get(action="lora_adapter.register").actor_label == "command"
    for args, message in ((["--name", "acme-2", "--tenant", "acme"], "needs --base-model, --path"),
                          (["--name", "acme-2", "--tenant", "ghost", "--base-model", "m", "--path", "p"],
                           "unknown tenant"),
                          (["--name", "acme-2", "--tenant", "acme", "--base-model", BASE_MODEL, "--path",
                            str(tmp_path / "none")], "does not exist"),
                          (["--name", "ghost", "--remove"], "no LoRA adapter named 'ghost'")):
        with pytest.raises(CommandError, match=message):
            call_command("register_lora_adapter", *args)
    call_command("register_lora_adapter", "--name", "acme-1", "--remove", stdout=out)
    assert not LoRAAdapter.objects.get(name="acme-1").is_active and registered_in_redis() == {}
    with pytest.raises(CommandError, match="removed already"):
        call_command("register_lora_adapter", "--name", "acme-1", "--remove")



def test_the_admin_registers_through_the_service_and_shows_refusals(client, base, tmp_path):
    user = get_user_model().objects.create_superuser("root", "root@example.com", "pw")
    client.force_login(user)
    tenant = create_tenant(name="acme")
    form = {"tenant": tenant.pk, "name": "acme-1", "base_model": BASE_MODEL}
    refused = client.post("/admin/tenants/loraadapter/add/", {**form, "path": str(tmp_path / "none")})
    assert refused.status_code == 200 and "does not exist" in refused.content.decode()
    added = client.post("/admin/tenants/loraadapter/add/", {**form, "path": str(write_adapter(tmp_path / "a", rank=8))})
    assert added.status_code == 302
    adapter = LoRAAdapter.objects.get(name="acme-1")
    assert adapter.rank == 8 and "acme-1" in registered_in_redis()
    assert AuditLog.objects.get(action="lora_adapter.register").actor == user
    change = client.get(f"/admin/tenants/loraadapter/{adapter.pk}/change/")
    assert change.status_code == 200 and "path" not in change.context["adminform"].form.fields
    client.post("/admin/tenants/loraadapter/", {"action": "remove_selected", "_selected_action": [adapter.pk]})
    adapter.refresh_from_db()
    assert not adapter.is_active and "acme-1" not in registered_in_redis()


def test_the_command_reports_what_the_replicas_said(tmp_path):
    """It waits for each live replica to load the adapter or say why not (their heartbeats)."""
    create_tenant(name="acme")
    client = sync_redis()
    with published_model(replicas_max_lora_rank=[16, 16]) as keys:
        for n, loaded in enumerate(({"lora_adapters": ["acme-1"]}, {"lora_errors": {"acme-1": "wrong shapes"}})):
            client.set(keys.heartbeat(BASE_MODEL, f"replica-{n}"),
                       encode(Heartbeat(f"replica-{n}", BASE_MODEL, max_lora_rank=16, **loaded)), ex=60)
        with pytest.raises(CommandError, match="loaded on 1 of 2 replicas; not loaded on replica-1: wrong shapes"):
            call_command("register_lora_adapter", "--tenant", "acme", "--name", "acme-1", "--base-model", BASE_MODEL,
                         "--path", str(write_adapter(tmp_path / "a")), "--wait", "5", stdout=StringIO())
        assert LoRAAdapter.objects.get(name="acme-1").is_active  # registered all the same, until --remove
        client.set(keys.heartbeat(BASE_MODEL, "replica-1"),
                   encode(Heartbeat("replica-1", BASE_MODEL, max_lora_rank=16, lora_adapters=["acme-2"])), ex=60)
        client.set(keys.heartbeat(BASE_MODEL, "replica-0"),
                   encode(Heartbeat("replica-0", BASE_MODEL, max_lora_rank=16, lora_adapters=["acme-2"])), ex=60)
        out = StringIO()
        call_command("register_lora_adapter", "--tenant", "acme", "--name", "acme-2", "--base-model", BASE_MODEL,
                     "--path", str(write_adapter(tmp_path / "b")), stdout=out)
        assert out.getvalue().splitlines()[-1] == "Loaded on 2 of 2 replicas."
