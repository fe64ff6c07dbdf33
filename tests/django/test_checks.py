"""The project passes Django's system checks and has no model change without a migration."""
import os
import secrets
import subprocess
import sys
from pathlib import Path

from django.core.management import call_command


def test_system_checks_pass():
    call_command("check")


def test_no_missing_migrations():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)


def test_deploy_checks_are_clean_with_production_settings():
    """`manage.py check --deploy` with DEBUG off, a real secret and a host: no warning at all."""
    env = {**os.environ, "DJANGO_DEBUG": "0", "DJANGO_SECRET_KEY": secrets.token_urlsafe(50),
           "DJANGO_ALLOWED_HOSTS": "api.example.com"}
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
                            cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout
