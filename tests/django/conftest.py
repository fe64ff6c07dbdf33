"""Django set up for plain pytest (no pytest-django).

django.setup() runs when pytest collects this folder, so tests of engine/ and
kernels/ never load Django. One test database (test_<NAME>, SQLite or
PostgreSQL, whichever DATABASE_URL names) is created for the session.
"""
import os
import uuid

import django
import pytest

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
os.environ.setdefault("DJANGO_DEBUG", "1")  # a dev SECRET_KEY when none is set
os.environ["ENGINE_KEY_PREFIX"] = f"test-{uuid.uuid4().hex[:12]}"  # no engine of a developer's is seen
django.setup()

from django.test import Client  # noqa: E402  (needs django.setup())
from django.test.runner import DiscoverRunner  # noqa: E402
from django.test.utils import setup_test_environment, teardown_test_environment  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def django_test_database(tmp_path_factory):
    """Test environment and database for the whole session, as `manage.py test` would.

    SQLite's test database is a file (not memory) so the live servers of the API tests share it.
    """
    from django.conf import settings

    database = settings.DATABASES["default"]
    if database["ENGINE"].endswith("sqlite3"):
        database.setdefault("TEST", {})["NAME"] = str(tmp_path_factory.mktemp("db") / "test.sqlite3")
    setup_test_environment(debug=False)
    runner = DiscoverRunner(verbosity=0, interactive=False)
    old_config = runner.setup_databases()
    yield
    runner.teardown_databases(old_config)
    teardown_test_environment()


@pytest.fixture
def client() -> Client:
    return Client()


class _Rollback(Exception):
    """Raised to undo everything a test wrote."""


@pytest.fixture
def db():
    """Run the test inside a transaction that is rolled back, so tests never see each other's rows."""
    from django.db import transaction

    try:
        with transaction.atomic():
            yield
            raise _Rollback
    except _Rollback:
        pass
