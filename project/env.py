"""Read settings from environment variables.

Kept apart from settings.py so the parsing is plain functions that tests can call
without reloading settings. No dj-database-url: the two URL forms we accept are
parsed here with urllib.parse.
"""
import os
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

from django.core.exceptions import ImproperlyConfigured

TRUE_WORDS = {"1", "true", "yes", "on"}
POSTGRES_SCHEMES = {"postgres", "postgresql"}


def env_bool(name: str, *, default: bool = False) -> bool:
    """`1`, `true`, `yes` or `on` (any case) mean True; unset means `default`."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in TRUE_WORDS


def env_int(name: str, *, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ImproperlyConfigured(f"{name} must be an integer, got {value!r}") from None


def env_list(name: str, *, default: str = "") -> list[str]:
    """A comma-separated variable as a list, blanks dropped."""
    return [item.strip() for item in os.environ.get(name, default).split(",") if item.strip()]


def parse_database_url(url: str, *, base_dir: Path) -> dict:
    """Turn a DATABASE_URL into one entry of Django's DATABASES.

    `sqlite:///db.sqlite3` is relative to `base_dir`, `sqlite:////abs/path` is
    absolute and `sqlite:///:memory:` is in memory. `postgres://user:pass@host:port/name`
    (or `postgresql://`) maps its query string, e.g. `?sslmode=require`, to OPTIONS.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if path in ("", ":memory:"):
            name = ":memory:"
        else:
            name = str(base_dir / path)  # an absolute path wins over base_dir
        # Web and Celery processes write the file at once: wait for the lock rather than fail,
        # take it when a transaction begins (a read lock upgraded mid-transaction fails at once
        # instead of waiting), and keep a write-ahead log so readers never block the writer.
        options = {"timeout": 20, "transaction_mode": "IMMEDIATE"}
        if name != ":memory:":
            options["init_command"] = "PRAGMA journal_mode=WAL;"
        return {"ENGINE": "django.db.backends.sqlite3", "NAME": name, "OPTIONS": options}
    if parts.scheme in POSTGRES_SCHEMES:
        name = unquote(parts.path.lstrip("/"))
        if not name:
            raise ImproperlyConfigured(f"DATABASE_URL names no database: {url!r}")
        return {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": name,
            "USER": unquote(parts.username or ""),
            "PASSWORD": unquote(parts.password or ""),
            "HOST": parts.hostname or "",
            "PORT": str(parts.port or ""),
            "OPTIONS": dict(parse_qsl(parts.query)),
        }
    raise ImproperlyConfigured(
        f"DATABASE_URL scheme {parts.scheme!r} is not supported: use sqlite:/// or postgres://"
    )
