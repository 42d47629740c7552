"""The code base passes its linter configuration (pyproject.toml; `make lint`, which CI runs before the tests)."""
import subprocess
import sys

from conftest import ROOT


def test_ruff_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
