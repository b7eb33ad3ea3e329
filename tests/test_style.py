"""The code base stays ruff-clean (lint and format), checked with the test suite."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import unavailable

REPO = Path(__file__).resolve().parents[1]


def _ruff():
    exe = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(exe).exists():
        unavailable("ruff is not installed (pip install -e '.[dev]')")
    return exe


@pytest.mark.parametrize("args", [["check", "."], ["format", "--check", "."]])
def test_ruff(args):
    result = subprocess.run([_ruff(), *args], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
