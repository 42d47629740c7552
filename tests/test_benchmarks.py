"""Benchmarks that run as they are: the GPU check on the CPU (bfloat16 autocast, small sizes, a tiny shapes subset),
qat_overhead in fresh processes with its two-level interval."""
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


def _qat_overhead():
    import importlib.util

    spec = importlib.util.spec_from_file_location("qat_overhead", ROOT / "benchmarks" / "qat_overhead.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_qat_overhead_interval_sees_the_processes():
    """The ratio's interval draws processes, then rounds: processes that disagree widen it to cover both, one process
    gives the plain bootstrap over its rounds."""
    ratio_interval = _qat_overhead().ratio_interval
    ref = [[1.0] * 10, [1.0] * 10]
    r, lo, hi = ratio_interval([[1.10] * 10, [1.30] * 10], ref)
    assert (r, lo, hi) == (1.10, 1.10, 1.30)  # the median of the pooled ratios; the bootstrap reaches both
    r, lo, hi = ratio_interval([1.2, 1.2, 1.2, 1.4], [1.0] * 4)
    assert r == 1.2 and lo == 1.2 and hi == 1.4
    assert ratio_interval([[2.0, 4.0]], [[1.0, 2.0]])[:1] == (2.0,)


def test_qat_overhead_runs_in_fresh_processes(tmp_path):
    cmd = [sys.executable, "benchmarks/qat_overhead.py", "--img", "64", "--batch", "1", "--rounds", "2", "--warmup",
           "1", "--processes", "2", "--no-memory", "--calibration-rounds", "1", "--threads", "1", "--skip",
           "qat default, search", "qat observers off", "qat original flags", "qat live BN folding",
           "torch.ao convs only", "brevitas pow2"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    assert "2 processes x 2 interleaved rounds" in text
    row = next(line for line in text.splitlines() if line.startswith("qat default"))
    assert len(row.split()) == 11  # name (2 words), quantizers, ms, spread, ratio, interval, 2 memory dashes, 2 ratios
    assert "calibration of `qat default` on 4 batches" in text and "2 x 1 rounds" in text
