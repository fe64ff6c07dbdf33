"""The project is installed (scripts/setup: `pip install -e .`): its packages import and its commands
run from any directory, not only from the repository root."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def run_elsewhere(tmp_path, *command: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"DJANGO_DEBUG": "1"}
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def test_the_packages_import_outside_the_repository(tmp_path):
    result = run_elsewhere(tmp_path, sys.executable, "-c", "import engine, kernels, inference, tenants, project")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command, expected", [
    (["llm-engine", "--help"], "serve"),
    (["llm-manage", "check"], "no issues"),
])
def test_the_console_scripts_run_outside_the_repository(tmp_path, command, expected):
    result = run_elsewhere(tmp_path, str(BIN / command[0]), *command[1:])
    assert result.returncode == 0, result.stderr
    assert expected in result.stdout
