"""The code is laid out by `ruff format` and lint-clean under `ruff check` (config in pyproject.toml): the README's
test command fails when either does."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff_is_clean(command):
  run = subprocess.run(
    [sys.executable, "-m", "ruff", *command, "src", "tests"], cwd=ROOT, capture_output=True, text=True
  )
  assert run.returncode == 0, f"ruff {' '.join(command)} src tests:\n{run.stdout[-3000:]}{run.stderr[-1000:]}"
