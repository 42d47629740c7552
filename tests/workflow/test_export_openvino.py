"""The OpenVINO cases (tests/workflow/openvino_cases.py) in a pytest process of their own, so OpenVINO's CPU plugin
never runs inside a long-lived test worker (see that module's docstring)."""
import re
import subprocess
import sys

import pytest
from conftest import REFERENCE, ROOT

pytest.importorskip("openvino")

CASES = ROOT / "tests" / "workflow" / "openvino_cases.py"


def test_openvino_cases_pass_in_their_own_process():
    """Every case passes, or skips because a reference file is absent (a clone without ../shared): nothing fails,
    errors or skips for another reason, and passed + skipped accounts for every case."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", str(CASES)],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    lines = r.stdout.strip().splitlines()
    summary = lines[-1] if lines else ""
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|errors?|xfailed|xpassed)", summary)}
    cases = len(re.findall(r"^def test_", CASES.read_text(), re.M))
    assert set(counts) <= {"passed", "skipped"} and counts.get("passed", 0) + counts.get("skipped", 0) == cases, \
        summary
    skips = [ln for ln in lines if ln.startswith("SKIPPED")]  # "SKIPPED [n] where: reason", n cases per reason
    assert sum(int(re.match(r"SKIPPED \[(\d+)\]", ln)[1]) for ln in skips) == counts.get("skipped", 0), lines[-20:]
    assert all(f"reference file {REFERENCE}" in ln and "not present" in ln for ln in skips), skips
