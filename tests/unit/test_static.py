"""Static checks, part of the suite so CI and the README's test command run them.

ruff on proxy/, tests/ and bench/ with the rule set pyproject.toml chooses (and says
why), and mypy:
every module of proxy/, strictly typed in proxy/datapath and proxy/config.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    out = run("ruff", "check", "--no-cache", "proxy", "tests", "bench")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_finds_nothing():
    out = run("mypy", "--no-incremental")
    assert out.returncode == 0, out.stdout + out.stderr
