"""Django's command-line entry point (migrate, runserver, check, ...): `./manage.py` in the repository,
`llm-manage` anywhere once the project is installed (pyproject.toml)."""
import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "project.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
