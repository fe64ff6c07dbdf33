"""The process's API key cache: a hit runs no query, and every change of a key or tenant, in this
process or another, ends it at once; the key itself is never cached and every check still runs."""
import pickle
from datetime import timedelta

import pytest
from django.db import connection
from django.test import TestCase, override_settings
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from tenants.errors import InvalidApiKey
from tenants.key_cache import _generation_key, _redis, api_key_cache, invalidate_api_keys
from tenants.selectors import authenticate_api_key, effective_limits, model_allowed
from tenants.services import create_api_key, create_tenant, revoke_api_key, update_tenant

pytestmark = pytest.mark.usefixtures("db")


@pytest.fixture
def issued():
    return create_api_key(tenant=create_tenant(name="acme"), allowed_models=["m1"])


def queries_of(raw_key) -> int:
    """How many queries one authentication runs."""
    with CaptureQueriesContext(connection) as queries:
        authenticate_api_key(raw_key=raw_key)
    return len(queries)


def test_a_cached_key_needs_no_query(issued):
    _, raw_key = issued
    assert queries_of(raw_key) == 1
    assert queries_of(raw_key) == 0
    assert authenticate_api_key(raw_key=raw_key).tenant.name == "acme"  # the tenant came along


def test_a_wrong_secret_is_refused_from_the_cache_too(issued):
    _, raw_key = issued
    authenticate_api_key(raw_key=raw_key)
    prefix, secret = raw_key.split(".")
    with pytest.raises(InvalidApiKey) as info:
        authenticate_api_key(raw_key=f"{prefix}.{secret[::-1]}")
    assert info.value.reason == InvalidApiKey.UNKNOWN


def test_the_secret_is_nowhere_in_the_cache(issued):
    _, raw_key = issued
    authenticate_api_key(raw_key=raw_key)
    assert raw_key.split(".")[1].encode() not in pickle.dumps(api_key_cache._entries)


@pytest.mark.parametrize("change", [
    lambda api_key: revoke_api_key(api_key=api_key),
    lambda api_key: update_tenant(tenant=api_key.tenant, is_active=False),
])
def test_revocation_and_deactivation_refuse_the_next_call(issued, change):
    api_key, raw_key = issued
    authenticate_api_key(raw_key=raw_key)
    change(api_key)
    with pytest.raises(InvalidApiKey):
        authenticate_api_key(raw_key=raw_key)


def test_limit_and_allowlist_changes_show_at_the_next_call(issued):
    api_key, raw_key = issued
    authenticate_api_key(raw_key=raw_key)
    update_tenant(tenant=api_key.tenant, requests_per_minute=7)
    api_key.allowed_models = ["m2"]
    api_key.save()
    fresh = authenticate_api_key(raw_key=raw_key)
    assert effective_limits(api_key=fresh).requests_per_minute == 7
    assert model_allowed(api_key=fresh, model="m2") and not model_allowed(api_key=fresh, model="m1")


def test_a_change_made_by_another_process_ends_the_cache(issued):
    _, raw_key = issued
    authenticate_api_key(raw_key=raw_key)
    invalidate_api_keys()  # what a save in any process does, through Redis
    assert queries_of(raw_key) == 1


def test_a_change_invalidates_again_when_it_commits(issued):
    """A process that reloaded the key between the save and the commit read the old row."""
    api_key, _ = issued
    with TestCase.captureOnCommitCallbacks(execute=True):
        revoke_api_key(api_key=api_key)
        at_save = _redis().get(_generation_key())
    assert _redis().get(_generation_key()) != at_save


def test_expiry_is_checked_on_every_call(issued, monkeypatch):
    api_key, raw_key = issued
    api_key.expires_at = timezone.now() + timedelta(minutes=5)
    api_key.save()
    authenticate_api_key(raw_key=raw_key)
    later = timezone.now() + timedelta(minutes=6)
    monkeypatch.setattr(timezone, "now", lambda: later)
    with CaptureQueriesContext(connection) as queries, pytest.raises(InvalidApiKey) as info:
        authenticate_api_key(raw_key=raw_key)
    assert info.value.reason == InvalidApiKey.EXPIRED and len(queries) == 0


def test_entries_live_api_key_cache_s_at_most(issued):
    _, raw_key = issued
    authenticate_api_key(raw_key=raw_key)
    with override_settings(API_KEY_CACHE_S=0):
        assert queries_of(raw_key) == 1


def test_unknown_keys_are_cached_until_a_key_is_created(issued):
    api_key, raw_key = issued
    made_up = "sk-zzzzzzzz." + raw_key.split(".")[1]
    for expected_queries in (1, 0):
        with CaptureQueriesContext(connection) as queries, pytest.raises(InvalidApiKey):
            authenticate_api_key(raw_key=made_up)
        assert len(queries) == expected_queries
    _, new_key = create_api_key(tenant=api_key.tenant)  # changes the generation
    assert authenticate_api_key(raw_key=new_key).tenant == api_key.tenant


def test_a_burst_of_calls_with_a_new_key_loads_it_once(issued):
    """Threads that miss together wait for one load instead of each querying the database."""
    import threading

    _, raw_key = issued
    prefix = raw_key.split(".")[0]
    loads, started = [], threading.Barrier(8)

    def slow_load():
        loads.append(1)
        threading.Event().wait(0.2)
        return None

    def call():
        started.wait()
        api_key_cache.get(prefix=prefix, load=slow_load)

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(loads) == 1
