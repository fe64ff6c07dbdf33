"""Django code never imports torch, triton or kernels: web and Celery processes stay light.

Two checks: a scan of every import statement (names the offending file), and a
fresh interpreter that loads the whole URL tree (catches indirect imports).
"""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DJANGO_PACKAGES = ("project", "tenants", "inference")
FORBIDDEN = {"torch", "triton", "kernels"}


def imported_top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize(
    "path",
    sorted(p for package in DJANGO_PACKAGES for p in (ROOT / package).rglob("*.py")),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_no_forbidden_import_statement(path):
    assert not imported_top_level_names(path) & FORBIDDEN


def test_loading_django_leaves_torch_out():
    code = (
        "import os, sys, django\n"
        "os.environ.setdefault('DJANGO_SETTINGS_MODULE', 'project.settings')\n"
        "os.environ.setdefault('DJANGO_DEBUG', '1')\n"
        "django.setup()\n"
        "import project.urls, project.asgi\n"
        f"print(sorted(set(sys.modules) & {FORBIDDEN!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]"
