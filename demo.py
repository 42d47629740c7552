"""The whole point of yolov5-qat in one command (`make demo`): on the embedded shapes dataset with yolov5n,
FP32 (SiLU) -> ReLU retraining -> QAT with power-of-two scales -> val.py of each (pycocotools) -> ONNX QDQ
export checked by onnxruntime -> val.py of the ONNX, then one summary table.

Every stage runs the real CLI (train.py / val.py / export.py) and prints its usual output. Finished stages
are reused when the demo runs again (delete runs/demo to start over). The FP32 stage starts from the
shipped checkpoint weights/shapes_yolov5n_silu.pt (trained by this project's train.py, command below);
`make demo FULL=1` (python demo.py --full) retrains it from scratch first.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PY = sys.executable
OUT = ROOT / "runs" / "demo"
IMG = 256
SHIPPED = ROOT / "weights" / "shapes_yolov5n_silu.pt"
FP32_CMD = ["train.py", "--data", "shapes.yaml", "--cfg", "yolov5n.yaml", "--weights", "", "--hyp",
            "data/hyps/hyp.scratch-shapes.yaml", "--optimizer", "Adam", "--img", str(IMG), "--batch-size", "16",
            "--epochs", "40", "--workers", "2"]
RELU_EPOCHS, QAT_EPOCHS = 3, 2


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
    ap = re.findall(r"Average Precision\s+\(AP\) @\[ IoU=0\.50(:0\.95)?\s+\| area=\s+all \| maxDets=100 \] = ([\d.]+)", text)
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
    from utils.checkpoint import load_checkpoint

    return load_checkpoint(ckpt).get("epoch") == -1


def train_stage(name, args):
    best = OUT / name / "weights" / "best.pt"
    if finished(best):
        print(f"(reusing {best.relative_to(ROOT)}; delete {(OUT / name).relative_to(ROOT)} to retrain)")
        return best
    shutil.rmtree(OUT / name, ignore_errors=True)
    run(["train.py", *args, "--project", OUT, "--name", name, "--exist-ok"], OUT / f"train_{name}.log")
    return best


def main(opt):
    t0 = time.time()
    total = 7
    OUT.mkdir(parents=True, exist_ok=True)

    stage(1, total, "FP32 yolov5n (SiLU) on shapes")
    if opt.full or not SHIPPED.exists():
        fp32 = train_stage("fp32", FP32_CMD[1:])
        SHIPPED.parent.mkdir(exist_ok=True)
        shutil.copy(fp32, SHIPPED)
    else:
        cmd = " ".join(a if a else "''" for a in FP32_CMD)
        print(f"(using the shipped {SHIPPED.relative_to(ROOT)}: best.pt (epoch 23) of the first 24 of the 40 epochs of "
              f"`python {cmd}`; make demo FULL=1 trains all 40)")
    fp32 = SHIPPED

    stage(2, total, f"retrain with ReLU (hyp.m-relu-tune.yaml, {RELU_EPOCHS} epochs)")
    relu = train_stage("relu", ["--data", "shapes.yaml", "--weights", fp32, "--act", "relu", "--hyp",
                                "data/hyps/hyp.m-relu-tune.yaml", "--img", IMG, "--batch-size", "16", "--epochs",
                                RELU_EPOCHS, "--workers", "2", "--noplots"])

    stage(3, total, f"QAT, power-of-two scales, every layer ({QAT_EPOCHS} epochs)")
    qat = train_stage("qat", ["--data", "shapes.yaml", "--weights", relu, "--hyp", "data/hyps/hyp.qat.yaml", "--img",
                              IMG, "--batch-size", "16", "--epochs", QAT_EPOCHS, "--workers", "2", "--noplots",
                              "--qat", "--bn-folding", "--pow2-scale", "--disable-observer-epoch", "0",
                              "--freeze-bn-epoch", "0"])

    stage(4, total, "val.py of the FP32, ReLU and QAT checkpoints (pycocotools)")
    rows = [("FP32 SiLU", fp32, *val(fp32, "fp32")), ("FP32 ReLU", relu, *val(relu, "relu")),
            ("QAT pow2 int8", qat, *val(qat, "qat"))]

    stage(5, total, "export.py: ONNX with QuantizeLinear/DequantizeLinear (dynamic shapes), checked by onnxruntime")
    onnx = qat.with_suffix(".onnx")
    if onnx.exists() and onnx.stat().st_mtime > qat.stat().st_mtime:
        print(f"(reusing {onnx.relative_to(ROOT)})")
    else:
        # --dynamic: val.py then runs the file with the same rectangular batches as the .pt, so the two rows compare
        run(["export.py", "--weights", qat, "--include", "onnx", "--dynamic", "--imgsz", IMG, IMG, "--data",
             "shapes.yaml"], OUT / "export.log")

    stage(6, total, "val.py of the ONNX file (onnxruntime)")
    rows.append(("ONNX QDQ (onnxruntime)", onnx, *val(onnx, "onnx")))

    stage(7, total, "summary")
    base = {"FP32 SiLU": rows[0][3], "FP32 ReLU": rows[0][3]}
    print(f"\n{'stage':<24}{'mAP50':>8}{'mAP50-95':>10}{'retention':>11}  {'source':<12}{'size MB':>8}  file")
    for name, f, m50, m, src in rows:
        ref = rows[0][3] if name in base else rows[1][3]
        ret = f"{m / ref * 100:.1f}%" if ref else "-"
        print(f"{name:<24}{m50:>8.3f}{m:>10.3f}{ret:>11}  {src:<12}{Path(f).stat().st_size / 1e6:>8.1f}  "
              f"{Path(f).relative_to(ROOT)}")
    print("retention: mAP50-95 relative to FP32 SiLU for the float stages, to FP32 ReLU (the QAT parent) for the "
          "quantized ones")
    print(f"\ndemo finished in {(time.time() - t0) / 60:.1f} min")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", action="store_true", help="retrain the FP32 checkpoint from scratch first")
    main(ap.parse_args())
