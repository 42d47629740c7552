"""The OpenVINO cases (tests/openvino_cases.py) in a pytest process of their own, so OpenVINO's CPU plugin never runs
inside a long-lived test worker (see that module's docstring)."""
import re
import subprocess
import sys

import pytest
from conftest import ROOT

pytest.importorskip("openvino")


def test_openvino_cases_pass_in_their_own_process():
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/openvino_cases.py"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    summary = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert re.fullmatch(r"=*\s*6 passed.*", summary), summary
