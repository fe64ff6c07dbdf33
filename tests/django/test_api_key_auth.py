"""authenticate_api_key: the good key passes; every bad one fails with its own reason."""
from datetime import timedelta

import pytest
from django.utils import timezone

from tenants.errors import InvalidApiKey
from tenants.selectors import authenticate_api_key
from tenants.services import create_api_key, create_tenant, revoke_api_key

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
def issued():
    tenant = create_tenant(name="acme")
    return create_api_key(tenant=tenant, name="ci")


def reason_for(raw_key) -> str:
    with pytest.raises(InvalidApiKey) as info:
        authenticate_api_key(raw_key=raw_key)
    return info.value.reason


def test_good_key_authenticates(issued):
    api_key, raw_key = issued
    found = authenticate_api_key(raw_key=raw_key)
    assert found.pk == api_key.pk and found.tenant.name == "acme"


@pytest.mark.parametrize(
    "raw_key",
    ["", "sk-", "not-a-key", "sk-abcdefgh", "sk-abcdefgh.short", "Bearer sk-x.y", None, 42,
     "sk-ABCDEFGH." + "a" * 43, "sk-abcdefgh." + "a" * 43 + " ", "sk-abcdefgh." + "a" * 44],
)
def test_malformed(raw_key):
    assert reason_for(raw_key) == InvalidApiKey.MALFORMED


def test_unknown_prefix(issued):
    _, raw_key = issued
    prefix, secret = raw_key.split(".")
    other_prefix = "sk-" + ("a" * 8 if prefix != "sk-aaaaaaaa" else "b" * 8)
    assert reason_for(f"{other_prefix}.{secret}") == InvalidApiKey.UNKNOWN


def test_right_prefix_wrong_secret(issued):
    _, raw_key = issued
    prefix, secret = raw_key.split(".")
    wrong = secret[:-1] + ("A" if secret[-1] != "A" else "B")
    assert reason_for(f"{prefix}.{wrong}") == InvalidApiKey.UNKNOWN


def test_revoked(issued):
    api_key, raw_key = issued
    revoke_api_key(api_key=api_key)
    assert reason_for(raw_key) == InvalidApiKey.REVOKED


def test_expired_and_not_yet_expired():
    tenant = create_tenant(name="acme")
    _, expired = create_api_key(tenant=tenant, expires_at=timezone.now() - timedelta(seconds=1))
    _, future = create_api_key(tenant=tenant, expires_at=timezone.now() + timedelta(days=1))
    assert reason_for(expired) == InvalidApiKey.EXPIRED
    assert authenticate_api_key(raw_key=future)


def test_inactive_tenant(issued):
    api_key, raw_key = issued
    api_key.tenant.is_active = False
    api_key.tenant.save()
    assert reason_for(raw_key) == InvalidApiKey.TENANT_INACTIVE


def test_message_does_not_echo_the_key(issued):
    _, raw_key = issued
    prefix, secret = raw_key.split(".")
    with pytest.raises(InvalidApiKey) as info:
        authenticate_api_key(raw_key=f"{prefix}.{secret[::-1]}")
    assert secret[::-1] not in str(info.value) and prefix not in str(info.value)
