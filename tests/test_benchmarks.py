"""The GPU check script runs as is: here on the CPU (bfloat16 autocast, small sizes, a tiny shapes subset)."""
import os
import subprocess
import sys

from conftest import ROOT, shapes_subset


def test_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    data = shapes_subset(tmp_path, 16, 8)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--device", "cpu", "--quick", "--data", str(data)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    for row in ("fp32, AMP", "qat default", "qat observers off, AMP", "qat original flags", "torch.ao convs only, AMP",
                "train.py --qat, whole run", "val.py QAT best.pt, cpu", "export.py onnx, cpu", "val.py QAT .onnx"):
        assert row in text, text[-4000:]
    assert "raw outputs as written:" in text and "0.00% of" in text  # the pow2 export is exact
    assert "within 0.002: yes" in text
