"""The project passes Django's system checks and has no model change without a migration."""
from django.core.management import call_command


def test_system_checks_pass():
    call_command("check")


def test_no_missing_migrations():
    call_command("makemigrations", "--check", "--dry-run", verbosity=0)
