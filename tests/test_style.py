"""The repository passes ``ruff format --check`` and ``ruff check`` (rules in pyproject.toml).

CI runs the suite, so style is checked with the tests; ``ruff format . && ruff check --fix .``
repairs most findings.
"""

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("args", [["format", "--check"], ["check"]], ids=["format", "check"])
def test_ruff_is_clean(args):
    proc = subprocess.run([sys.executable, "-m", "ruff", *args, "."], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, f"ruff {' '.join(args)} found problems:\n{proc.stdout[-4000:]}{proc.stderr[-2000:]}"
