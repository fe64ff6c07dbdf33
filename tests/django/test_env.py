"""project.env: DATABASE_URL forms and the boolean/list readers."""
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from project.env import env_bool, env_list, parse_database_url

BASE = Path("/srv/app")


def test_sqlite_relative_path_is_under_base_dir():
    db = parse_database_url("sqlite:///db.sqlite3", base_dir=BASE)
    assert db == {"ENGINE": "django.db.backends.sqlite3", "NAME": "/srv/app/db.sqlite3",
                  "OPTIONS": {"timeout": 20, "transaction_mode": "IMMEDIATE", "init_command": "PRAGMA journal_mode=WAL;"}}


def test_sqlite_absolute_path():
    assert parse_database_url("sqlite:////tmp/x.db", base_dir=BASE)["NAME"] == "/tmp/x.db"


def test_sqlite_in_memory():
    db = parse_database_url("sqlite:///:memory:", base_dir=BASE)
    assert db["NAME"] == ":memory:" and "init_command" not in db["OPTIONS"]  # no write-ahead log in memory


@pytest.mark.parametrize("scheme", ["postgres", "postgresql"])
def test_postgres_with_everything(scheme):
    db = parse_database_url(f"{scheme}://us%40er:p%3Ass@db.local:6543/llm?sslmode=require", base_dir=BASE)
    assert db == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": "llm",
        "USER": "us@er",
        "PASSWORD": "p:ss",
        "HOST": "db.local",
        "PORT": "6543",
        "OPTIONS": {"sslmode": "require"},
    }


def test_postgres_minimal():
    db = parse_database_url("postgres://postgres@127.0.0.1/test", base_dir=BASE)
    assert (db["USER"], db["PASSWORD"], db["HOST"], db["PORT"], db["NAME"]) == (
        "postgres", "", "127.0.0.1", "", "test"
    )


@pytest.mark.parametrize("url", ["mysql://root@localhost/db", "postgres://localhost:5432/"])
def test_unsupported_or_incomplete_url_is_refused(url):
    with pytest.raises(ImproperlyConfigured):
        parse_database_url(url, base_dir=BASE)


def test_env_bool_and_list(monkeypatch):
    monkeypatch.setenv("FLAG", "Yes")
    monkeypatch.setenv("HOSTS", " a.example, ,b.example ")
    monkeypatch.delenv("UNSET_FLAG", raising=False)
    assert env_bool("FLAG") is True
    assert env_bool("UNSET_FLAG", default=True) is True
    assert env_list("HOSTS") == ["a.example", "b.example"]
