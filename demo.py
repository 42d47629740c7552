"""The whole point of yolov5-qat in one command (`make demo`): on the embedded shapes dataset with yolov5n, from
the converged FP32 ReLU parent: FP32 fine-tune (the reference) and QAT with power-of-two scales on every layer, the
same epochs, hyp and seed -> val.py of each (pycocotools) -> ONNX QDQ and OpenVINO export checked against PyTorch ->
val.py of both, then one summary table with QAT's retention against the fine-tune.

Every stage runs the real CLI (train.py / val.py / export.py) and prints its usual output. Finished stages
are reused when the demo runs again (delete runs/demo to start over). The parent is the shipped checkpoint
weights/shapes_yolov5n_relu.pt (trained by this project's train.py: notes/parents/); `make demo FULL=1`
(python demo.py --full) retrains it first with the recorded commands: FP32 SiLU from scratch, then two ReLU
cycles (about 3 hours on 2 CPU cores).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from models.checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parent
PY = sys.executable
OUT = ROOT / "runs" / "demo"
IMG = 256
SHIPPED = ROOT / "weights" / "shapes_yolov5n_relu.pt"
# --full: the commands that trained the shipped parent (notes/parents/*/README.md), each from the previous best.pt
PARENT_RUNS = [
    ("silu", ["--cfg", "yolov5n.yaml", "--weights", "", "--hyp", "data/hyps/hyp.scratch-shapes.yaml",
              "--epochs", "70"]),
    ("relu", ["--weights", None, "--act", "relu", "--hyp", "data/hyps/hyp.scratch-shapes.yaml", "--epochs", "50"]),
    ("relu2", ["--weights", None, "--act", "relu", "--hyp", "notes/parents/relu2/hyp.yaml", "--epochs", "40"]),
]
PARENT_COMMON = ["--data", "shapes.yaml", "--optimizer", "Adam", "--img", str(IMG), "--batch-size", "16", "--cos-lr",
                 "--cache", "ram", "--workers", "2", "--noplots"]
EPOCHS, SEED = 3, 0  # as benchmarks/qat_accuracy.py: the QAT row is its seed-0 row of the default recipe
# fine-tune and QAT share everything but --qat and its flags (the original experiments' schedule, BN folded in QAT)
COMMON = ["--data", "shapes.yaml", "--hyp", "data/hyps/hyp.qat.yaml", "--img", str(IMG), "--batch-size", "16",
          "--epochs", str(EPOCHS), "--workers", "2", "--noplots", "--seed", str(SEED), "--calib-batches", "32"]
QAT_FLAGS = ["--qat", "--bn-folding", "--pow2-scale", "--disable-observer-epoch", "0", "--freeze-bn-epoch", "0"]


def stage(n, total, text):
    bar = "#" * n + "-" * (total - n)
    print(f"\n[{bar}] stage {n}/{total}: {text}", flush=True)


def run(args, log=None):
    """Run a CLI, stream its output, keep it for parsing; a failure stops the demo with the stage's error."""
    cmd = [PY, *map(str, args)]
    print("$ " + " ".join(str(a) if a != "" else "''" for a in cmd[1:]), flush=True)
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines = []
    for line in p.stdout:
        sys.stdout.write(line)
        lines.append(line)
    if p.wait():
        print(f"ERROR: demo stage failed: {' '.join(map(str, args[:1]))} exited with {p.returncode}", file=sys.stderr)
        raise SystemExit(p.returncode)
    text = "".join(lines)
    if log:
        Path(log).parent.mkdir(parents=True, exist_ok=True)
        Path(log).write_text(text)
    return text


def val_metrics(text):
    """(mAP50, mAP50-95) from val.py output: pycocotools' numbers when it ran, else the 'all' row."""
    ap = re.findall(r"Average Precision\s+\(AP\) @\[ IoU=0\.50(:0\.95)?\s+\| area=\s+all \| maxDets=100 \] "
                    r"= ([\d.]+)", text)
    coco = {k: float(v) for k, v in ap}
    row = re.findall(r"^\s+all\s+\d+\s+\d+\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", text, re.M)
    if ":0.95" in coco and "" in coco:
        return coco[""], coco[":0.95"], "pycocotools"
    if row:
        return float(row[-1][2]), float(row[-1][3]), "val.py"
    raise SystemExit("ERROR: demo: could not read the mAP from val.py's output")


def val(weights, name, extra=()):
    log = OUT / f"{name}.log"
    if log.exists() and Path(weights).exists() and log.stat().st_mtime > Path(weights).stat().st_mtime:
        print(f"(reusing {log.relative_to(ROOT)})")
        text = log.read_text()
        for line in text.splitlines()[-16:]:
            print(line)
        return val_metrics(text)
    text = run(["val.py", "--weights", weights, "--data", "shapes.yaml", "--img", IMG, "--batch-size", "32",
                "--workers", "2", "--save-json", "--project", OUT, "--name", f"val_{name}", "--exist-ok", *extra], log)
    return val_metrics(text)


def finished(ckpt):
    """A run's best.pt is reusable once training finished (its optimizer was stripped: epoch -1)."""
    if not ckpt.exists():
        return False
    sys.path.insert(0, str(ROOT))

    return load_checkpoint(ckpt).get("epoch") == -1


def size_mb(path) -> float:
    """A file's size, or the total of a folder's files (an OpenVINO model), in MB."""
    path = Path(path)
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 1e6


def train_stage(name, args):
    best = OUT / name / "weights" / "best.pt"
    if finished(best):
        print(f"(reusing {best.relative_to(ROOT)}; delete {(OUT / name).relative_to(ROOT)} to retrain)")
        return best
    shutil.rmtree(OUT / name, ignore_errors=True)
    run(["train.py", *args, "--project", OUT, "--name", name, "--exist-ok"], OUT / f"train_{name}.log")
    return best


def parent(full: bool) -> Path:
    """The FP32 ReLU parent: the shipped checkpoint, or (--full) retrained by the recorded commands."""
    if not full and SHIPPED.exists():
        print(f"(using the shipped {SHIPPED.relative_to(ROOT)}: FP32 SiLU 70 epochs from scratch, then two ReLU cycles "
              f"of 50 and 40 epochs; notes/parents/ holds each run's command and results.csv; make demo FULL=1 "
              f"retrains it)")
        return SHIPPED
    weights = None
    for name, args in PARENT_RUNS:
        args = [str(weights) if a is None else a for a in args]
        weights = train_stage(f"parent_{name}", [*args, *PARENT_COMMON])
    SHIPPED.parent.mkdir(exist_ok=True)
    shutil.copy(weights, SHIPPED)
    return SHIPPED


def main(opt):
    t0 = time.time()
    total = 7
    OUT.mkdir(parents=True, exist_ok=True)

    stage(1, total, "the FP32 yolov5n ReLU parent (converged on shapes)")
    relu = parent(opt.full)

    stage(2, total, f"FP32 fine-tune of the parent, the reference ({EPOCHS} epochs, hyp.qat.yaml, seed {SEED})")
    tune = train_stage("fp32_tune", ["--weights", relu, *COMMON])

    stage(3, total, f"QAT, power-of-two scales, every layer quantized (default recipe, the same {EPOCHS} epochs)")
    qat = train_stage("qat", ["--weights", relu, *COMMON, *QAT_FLAGS])

    stage(4, total, "val.py of the parent, the fine-tune and the QAT checkpoint (pycocotools)")
    rows = [("FP32 ReLU parent", relu, *val(relu, "parent")), ("FP32 fine-tune", tune, *val(tune, "fp32_tune")),
            ("QAT pow2 int8", qat, *val(qat, "qat"))]

    stage(5, total, "export.py: ONNX with QuantizeLinear/DequantizeLinear and OpenVINO (dynamic shapes), checked "
                    "against PyTorch")
    onnx = qat.with_suffix(".onnx")
    openvino = qat.with_name(qat.stem + "_openvino_model")
    if onnx.exists() and onnx.stat().st_mtime > qat.stat().st_mtime and openvino.is_dir():
        print(f"(reusing {onnx.relative_to(ROOT)} and {openvino.relative_to(ROOT)})")
    else:
        # --dynamic: val.py then runs the files with the same rectangular batches as the .pt, so the rows compare
        run(["export.py", "--weights", qat, "--include", "onnx", "openvino", "--dynamic", "--imgsz", IMG, IMG,
             "--data", "shapes.yaml"], OUT / "export.log")

    stage(6, total, "val.py of the ONNX file (onnxruntime's int8 kernels) and of the OpenVINO folder")
    rows.append(("ONNX QDQ (onnxruntime)", onnx, *val(onnx, "onnx")))
    rows.append(("OpenVINO int8", openvino, *val(openvino, "openvino")))

    stage(7, total, "summary")
    reference = rows[1][3]
    print(f"\n{'stage':<24}{'mAP50':>8}{'mAP50-95':>10}{'retention':>11}  {'source':<12}{'size MB':>8}  file")
    for name, f, m50, m, src in rows:
        ret = f"{m / reference * 100:.1f}%" if reference and name != "FP32 ReLU parent" else "-"
        print(f"{name:<24}{m50:>8.3f}{m:>10.3f}{ret:>11}  {src:<12}{size_mb(f):>8.1f}  {Path(f).relative_to(ROOT)}")
    print(f"retention: mAP50-95 relative to the FP32 fine-tune (the parent trained for the same {EPOCHS} epochs with "
          f"the same hyp and seed as QAT)")
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="retrain the FP32 ReLU parent from scratch first (hours)")
    main(ap.parse_args())
