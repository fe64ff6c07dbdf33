"""create_tenant and create_api_key commands: options stored, key alone on the last line."""
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from tenants.models import Tenant
from tenants.selectors import authenticate_api_key, model_allowed

pytestmark = pytest.mark.usefixtures("db")


def run(*args) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def test_create_tenant_with_limit_options():
    run(
        "create_tenant", "acme", "--requests-per-minute", "10", "--tokens-per-minute", "2000",
        "--max-concurrent-requests", "3", "--token-budget", "50000", "--budget-period", "day",
        "--max-tokens-cap", "256", "--max-prompt-tokens", "512", "--priority-tier", "1",
        "--max-sequences-per-request", "64", "--max-sequences-in-flight", "128",
    )
    tenant = Tenant.objects.get(name="acme")
    assert (tenant.requests_per_minute, tenant.tokens_per_minute) == (10, 2000)
    assert (tenant.max_concurrent_requests, tenant.token_budget) == (3, 50000)
    assert (tenant.budget_period, tenant.max_tokens_cap) == ("day", 256)
    assert (tenant.max_prompt_tokens, tenant.priority_tier) == (512, 1)
    assert (tenant.max_sequences_per_request, tenant.max_sequences_in_flight) == (64, 128)


def test_create_tenant_with_sampling_defaults():
    run("create_tenant", "acme", "--sampling-defaults", '{"temperature": 0.2, "top_k": 40}')
    assert Tenant.objects.get(name="acme").sampling_defaults == {"temperature": 0.2, "top_k": 40}
    for bad, reason in (('{"temperature": -1}', "temperature"), ('{"beam_width": 4}', "unknown"),
                        ('{"top_p": true}', "number"), ('[0.2]', "object")):
        with pytest.raises(CommandError, match=reason):
            run("create_tenant", f"bad-{reason}", "--sampling-defaults", bad)
    assert not Tenant.objects.filter(name__startswith="bad-").exists()


def test_create_tenant_defaults_and_duplicate():
    run("create_tenant", "acme")
    assert Tenant.objects.get(name="acme").requests_per_minute == 60
    with pytest.raises(CommandError, match="already exists"):
        run("create_tenant", "acme")


def test_create_tenant_rejects_bad_values():
    with pytest.raises(CommandError):
        run("create_tenant", "acme", "--requests-per-minute", "-1")
    with pytest.raises(CommandError):
        run("create_tenant", "acme", "--budget-period", "week")
    assert not Tenant.objects.filter(name="acme").exists()


def test_create_api_key_last_line_authenticates():
    run("create_tenant", "acme")
    out = run("create_api_key", "acme", "--name", "ci", "--models", "m1", "m2",
              "--expires-in-days", "30")
    raw_key = out.rstrip("\n").splitlines()[-1]
    api_key = authenticate_api_key(raw_key=raw_key)
    assert api_key.tenant.name == "acme" and api_key.name == "ci"
    assert api_key.allowed_models == ["m1", "m2"]
    assert model_allowed(api_key=api_key, model="m2")
    assert not model_allowed(api_key=api_key, model="m3")
    days = (api_key.expires_at - timezone.now()).total_seconds() / 86400
    assert 29.9 < days <= 30


def test_create_api_key_unknown_tenant():
    with pytest.raises(CommandError, match="unknown tenant"):
        run("create_api_key", "nobody")
