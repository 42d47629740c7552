"""What a CUDA device changes, in one table and a few minutes: QAT step cost with and without AMP, val.py, export.

    python benchmarks/gpu_check.py                        # CUDA device 0, yolov5n ReLU, batch 32, 640 px
    python benchmarks/gpu_check.py --device cpu --quick   # the same script on the CPU (bfloat16 autocast), small

Part 1 times training steps side by side (interleaved rounds, as benchmarks/qat_overhead.py): FP32, the default
--qat --pow2-scale step with observers on and off, the original flags, torch.ao's convs-only QAT, each in float32
and under autocast (AMP: float16 on CUDA with a GradScaler, bfloat16 on the CPU), with peak memory on CUDA.
Part 2 runs the project's own tools on the device: train.py --qat for one epoch on shapes from the shipped SiLU
checkpoint retrained with ReLU, val.py of its best.pt on the device and on the CPU (they must agree), export.py of
it to ONNX on the device (its exactness check must pass) and val.py of the .onnx.
"""
from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "benchmarks"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

import qat_overhead as qo

from utils.general import LOGGER
from workflow.autobatch import autobatch

STEP_VARIANTS = ("fp32", "qat default", "qat observers off", "qat original flags", "torch.ao convs only")
PARENT = ROOT / "weights/shapes_yolov5n_silu.pt"


def amp_step(model, imgs, targets, device):
    """qat_overhead's training step under autocast (float16 + GradScaler on CUDA, bfloat16 on the CPU)."""
    loss_fn = qo.ComputeLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, nesterov=True)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda", enabled=cuda)
    dtype = torch.float16 if cuda else torch.bfloat16
    x = imgs.float() / 255

    def step():
        with torch.autocast(device.type, dtype=dtype):
            loss, _ = loss_fn(model(x), targets)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
    return step


def time_steps(opt, device):
    base = qo.float_model(device)
    imgs, targets = qo.inputs(opt.batch, opt.img, device)
    steps, rows, failed = {}, [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for key in STEP_VARIANTS:
            for amp in (False, True):
                model = qo.build(key, base, imgs, targets, opt, tmp).to(device)
                step = amp_step(model, imgs, targets, device) if amp else qo.make_step(model, imgs, targets)
                try:
                    for _ in range(opt.warmup):
                        step()
                except RuntimeError as e:  # e.g. torch.ao's fused fake-quant kernel refuses bfloat16
                    failed[(key, amp)] = str(e).splitlines()[0][:42]
                    continue
                steps[(key, amp)] = step
    times, peaks = {k: [] for k in steps}, {}
    for _ in range(opt.rounds):
        for k, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            t = time.perf_counter()
            step()
            times[k].append(time.perf_counter() - t)
            if device.type == "cuda":
                peaks[k] = max(peaks.get(k, 0), torch.cuda.max_memory_allocated(device) / 2 ** 20)
    fp32 = statistics.median(times[("fp32", False)])
    for (key, amp), t in times.items():
        med = statistics.median(t)
        peak = f"{peaks[(key, amp)]:.0f}" if (key, amp) in peaks else "-"
        rows.append((f"{key}{', AMP' if amp else ''}", f"{med * 1e3:.1f} ms", f"{med / fp32:.2f}", peak))
    for (key, amp), error in failed.items():
        rows.append((f"{key}{', AMP' if amp else ''}", "fails", error, ""))
    return rows


def run(cmd, what):
    t = time.perf_counter()
    out = subprocess.run([sys.executable] + cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"{what} failed: {' '.join(cmd)}\n{out.stdout[-1500:]}\n{out.stderr[-3000:]}")
    return out.stdout + out.stderr, time.perf_counter() - t


def val_map(weights, device, opt):
    text, seconds = run(["val.py", "--weights", str(weights), "--data", opt.data, "--img", str(opt.tool_img),
                         "--batch-size", "32", "--device", device], f"val.py on {device}")
    line = [ln for ln in text.splitlines() if ln.strip().startswith("all ")][-1].split()
    return float(line[-2]), float(line[-1]), seconds


def tools(opt, device_arg):
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        _, seconds = run(["train.py", "--data", opt.data, "--weights", str(PARENT), "--act", "relu", "--qat",
                          "--pow2-scale", "--hyp", "data/hyps/hyp.qat.yaml", "--img", str(opt.tool_img), "--epochs",
                          str(opt.epochs), "--batch-size", "32", "--device", device_arg, "--workers", "4",
                          "--noplots", "--project", tmp, "--name", "qat"] + (["--calib-batches", "2"] if opt.quick
                                                                            else []), "train.py --qat")
        rows.append(("train.py --qat, whole run", f"{seconds:.1f} s", "", ""))
        best = Path(tmp) / "qat/weights/best.pt"
        dev = val_map(best, device_arg, opt)
        rows.append((f"val.py QAT best.pt, {device_arg}", f"{dev[2]:.1f} s", f"mAP50 {dev[0]:.4f}",
                     f"mAP50-95 {dev[1]:.4f}"))
        cpu = val_map(best, "cpu", opt) if device_arg != "cpu" else dev
        if device_arg != "cpu":
            rows.append(("val.py QAT best.pt, cpu", f"{cpu[2]:.1f} s", f"mAP50 {cpu[0]:.4f}", f"mAP50-95 {cpu[1]:.4f}"))
        # --dynamic: val.py then runs the .onnx with the same rectangular batches as the .pt
        text, seconds = run(["export.py", "--weights", str(best), "--include", "onnx", "--img", str(opt.tool_img),
                             "--dynamic", "--device", device_arg], "export.py")
        found = re.search(r"as written\) vs PyTorch .*?raw head outputs ([\d.]+)% of (\d+) differ", text)
        check = f"{found.group(1)}% of {found.group(2)} differ" if found else "check not printed"
        rows.append((f"export.py onnx, {device_arg}", f"{seconds:.1f} s", "raw outputs as written:", check))
        onnx = best.with_suffix(".onnx")
        ox = val_map(onnx, "cpu", opt)
        rows.append(("val.py QAT .onnx (onnxruntime)", f"{ox[2]:.1f} s", f"mAP50 {ox[0]:.4f}", f"mAP50-95 {ox[1]:.4f}"))
        agree = abs(dev[1] - cpu[1]) <= 0.002 and abs(ox[1] - cpu[1]) <= 0.002
    return rows, agree


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="0", help="CUDA device index, or cpu")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tool-img", type=int, default=320, help="image size for train/val/export on shapes")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--data", default="shapes.yaml", help="dataset yaml for train/val/export")
    p.add_argument("--quick", action="store_true", help="small sizes (a smoke run, e.g. on the CPU)")
    opt = p.parse_args(argv)
    if opt.quick:
        opt.batch, opt.img, opt.rounds, opt.warmup, opt.tool_img = 2, 128, 2, 1, 128
    cuda = opt.device != "cpu"
    if cuda and not torch.cuda.is_available():
        raise SystemExit(f"--device {opt.device}: no CUDA device is available here; use --device cpu for a smoke run")
    device = torch.device(f"cuda:{opt.device}" if cuda else "cpu")
    warnings.filterwarnings("ignore")
    LOGGER.setLevel("WARNING")
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if cuda else "cpu"
    rows = time_steps(opt, device)
    if cuda:  # AutoBatch (train.py --batch-size -1) on this device, for the float yolov5n at --img

        t = time.perf_counter()
        batch = autobatch(qo.float_model(device), opt.img, device)
        rows.append(("AutoBatch (--batch-size -1)", f"{time.perf_counter() - t:.1f} s", f"batch {batch}", ""))
    tool_rows, agree = tools(opt, opt.device)
    print(f"\n{name}, torch {torch.__version__}, yolov5n ReLU, steps at batch {opt.batch}, {opt.img} px; "
          f"tools on shapes at {opt.tool_img} px ({time.perf_counter() - t0:.0f} s in all)")
    print(f"{'what':<34}{'time':>10}  {'x FP32 / result':<42}{'peak MiB / result'}")
    for row in rows + tool_rows:
        print(f"{row[0]:<34}{row[1]:>10}  {row[2]:<42}{row[3]}")
    print("val.py device vs cpu vs onnx mAP50-95 within 0.002:", "yes" if agree else "NO")
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
