"""Tenant and key services: limits stored, keys never in clear, rotation, revocation, isolation."""
import pytest
from django.core.exceptions import ValidationError

from tenants.errors import InvalidApiKey, TenantAlreadyExists
from tenants.models import ApiKey, Tenant
from tenants.selectors import (
    authenticate_api_key,
    effective_limits,
    get_tenant_keys,
    model_allowed,
)
from tenants.services import create_api_key, create_tenant, revoke_api_key, rotate_api_key

pytestmark = pytest.mark.usefixtures("db")


def test_create_tenant_defaults_and_limits():
    plain = create_tenant(name="plain")
    assert (plain.requests_per_minute, plain.tokens_per_minute) == (60, 100_000)
    assert plain.token_budget is None and plain.is_active
    custom = create_tenant(
        name="custom", requests_per_minute=5, token_budget=1000, budget_period="day",
        priority_tier=2,
    )
    custom.refresh_from_db()
    assert (custom.requests_per_minute, custom.token_budget) == (5, 1000)
    assert (custom.budget_period, custom.priority_tier) == ("day", 2)


def test_create_tenant_rejects_duplicates_typos_and_bad_values():
    create_tenant(name="acme")
    with pytest.raises(TenantAlreadyExists):
        create_tenant(name="acme")
    with pytest.raises(TypeError):
        create_tenant(name="typo", request_per_minute=5)
    with pytest.raises(ValidationError):
        create_tenant(name="bad", budget_period="week")
    assert not Tenant.objects.filter(name__in=["typo", "bad"]).exists()


def test_keys_are_never_stored_in_clear():
    tenant = create_tenant(name="acme")
    api_key, raw_key = create_api_key(tenant=tenant, name="ci", allowed_models=["m"])
    prefix, secret = raw_key.split(".")
    assert prefix == api_key.prefix and prefix.startswith("sk-") and len(secret) >= 43
    row = ApiKey.objects.filter(pk=api_key.pk).values().get()
    for column, value in row.items():
        text = str(value)
        assert raw_key not in text, column
        assert secret not in text, column
    assert len(api_key.hashed_key) == 64


def test_keys_are_unique():
    tenant = create_tenant(name="acme")
    raw_keys = {create_api_key(tenant=tenant)[1] for _ in range(20)}
    assert len(raw_keys) == 20
    assert ApiKey.objects.filter(tenant=tenant).values("prefix").distinct().count() == 20


def test_revoke_is_idempotent_and_blocks_the_key():
    tenant = create_tenant(name="acme")
    api_key, raw_key = create_api_key(tenant=tenant)
    revoke_api_key(api_key=api_key)
    first = api_key.revoked_at
    revoke_api_key(api_key=api_key)
    api_key.refresh_from_db()
    assert api_key.revoked_at == first and api_key.status == "revoked"
    with pytest.raises(InvalidApiKey) as info:
        authenticate_api_key(raw_key=raw_key)
    assert info.value.reason == InvalidApiKey.REVOKED


def test_rotation_invalidates_the_old_key_and_keeps_settings():
    tenant = create_tenant(name="acme")
    old, old_raw = create_api_key(tenant=tenant, name="ci", allowed_models=["a", "b"])
    old.requests_per_minute = 7
    old.save()
    new, new_raw = rotate_api_key(api_key=old)
    assert new.pk != old.pk and new_raw != old_raw
    assert (new.tenant, new.name, new.allowed_models) == (tenant, "ci", ["a", "b"])
    assert new.requests_per_minute == 7
    assert authenticate_api_key(raw_key=new_raw).pk == new.pk
    with pytest.raises(InvalidApiKey) as info:
        authenticate_api_key(raw_key=old_raw)
    assert info.value.reason == InvalidApiKey.REVOKED


def test_effective_limits_prefer_key_overrides():
    tenant = create_tenant(
        name="acme", requests_per_minute=100, tokens_per_minute=5000, max_concurrent_requests=4,
        token_budget=10**6, max_tokens_cap=512, max_prompt_tokens=1024, priority_tier=3,
    )
    api_key, _ = create_api_key(tenant=tenant, tokens_per_minute=200)
    limits = effective_limits(api_key=api_key)
    assert limits.requests_per_minute == 100
    assert limits.tokens_per_minute == 200
    assert limits.max_concurrent_requests == 4
    assert (limits.token_budget, limits.max_tokens_cap, limits.max_prompt_tokens) == (
        10**6, 512, 1024,
    )
    assert limits.priority_tier == 3
    api_key.requests_per_minute = 0  # an override of 0 is an override, not "unset"
    assert effective_limits(api_key=api_key).requests_per_minute == 0


def test_model_allowlist():
    tenant = create_tenant(name="acme")
    open_key, _ = create_api_key(tenant=tenant)
    narrow_key, _ = create_api_key(tenant=tenant, allowed_models=["llama-3-8b"])
    assert model_allowed(api_key=open_key, model="anything")
    assert model_allowed(api_key=narrow_key, model="llama-3-8b")
    assert not model_allowed(api_key=narrow_key, model="qwen-7b")


def test_a_tenant_only_sees_its_own_keys():
    acme, globex = create_tenant(name="acme"), create_tenant(name="globex")
    acme_keys = {create_api_key(tenant=acme)[0].pk for _ in range(3)}
    globex_keys = {create_api_key(tenant=globex)[0].pk for _ in range(2)}
    assert set(get_tenant_keys(tenant=acme).values_list("pk", flat=True)) == acme_keys
    assert set(get_tenant_keys(tenant=globex).values_list("pk", flat=True)) == globex_keys
