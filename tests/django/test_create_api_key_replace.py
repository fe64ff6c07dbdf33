"""create_api_key --replace: a script minting its key on every run (scripts/serve) leaves one active key."""
from io import StringIO

import pytest
from django.core.management import call_command

from tenants.errors import InvalidApiKey
from tenants.models import ApiKey
from tenants.selectors import authenticate_api_key

pytestmark = pytest.mark.usefixtures("db")


def new_key(*args) -> str:
    out = StringIO()
    call_command("create_api_key", "demo", *args, stdout=out)
    return out.getvalue().rstrip("\n").splitlines()[-1]


def active(name: str) -> list[ApiKey]:
    return list(ApiKey.objects.filter(tenant__name="demo", name=name, revoked_at__isnull=True))


def test_replace_revokes_earlier_keys_of_the_same_name_only():
    call_command("create_tenant", "demo", stdout=StringIO())
    other = new_key("--name", "ci")
    first = new_key("--name", "scripts/serve")  # a key from before --replace existed
    second = new_key("--name", "scripts/serve", "--replace")
    third = new_key("--name", "scripts/serve", "--replace")

    assert [key.prefix for key in active("scripts/serve")] == [third.split(".")[0]]
    assert authenticate_api_key(raw_key=third).name == "scripts/serve"
    for revoked in (first, second):
        with pytest.raises(InvalidApiKey):
            authenticate_api_key(raw_key=revoked)
    assert authenticate_api_key(raw_key=other).name == "ci"


def test_without_replace_keys_accumulate_as_before():
    call_command("create_tenant", "demo", stdout=StringIO())
    new_key("--name", "x")
    new_key("--name", "x")
    assert len(active("x")) == 2
