"""NMS ms/image at val.py's settings (conf 0.001, IoU 0.6, multi-label, max_det 300), this project vs upstream
YOLOv5 v7.0, on the same predictions, side by side in one run.

The predictions are a model's raw outputs on the shapes val images in val.py's rectangular batches (by default a
yolov5n nc=10 with random weights: a weak model leaves thousands of candidates per image, where NMS is slowest).
Rounds alternate: this project's `non_max_suppression` in this process, then upstream's in a subprocess that loads
the same saved predictions (its own clock around the NMS calls only). Both must keep the same detections; upstream
also stops at its wall-clock limit (0.5 s + 0.05 s per image of a batch), and how often it did is reported.
Upstream is optional (see benchmarks/val_upstream.py for installing it); without it only this project is timed.

    python benchmarks/nms_speed.py --upstream ../upstream
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.experimental import attempt_load
from models.yolo import DetectionModel
from utils.dataloaders import create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import UserError, non_max_suppression, run_cli

SETTINGS = {"conf_thres": 0.001, "iou_thres": 0.6, "multi_label": True, "max_det": 300}

DRIVER = """
import json, sys, time, warnings
import torch
from yolov5.utils.general import LOGGER, non_max_suppression
preds = torch.load(sys.argv[1])
kw = json.loads(sys.argv[2])
limit = []
LOGGER.warning = lambda msg, *a, **k: limit.append(msg)
t = time.perf_counter()
out = [non_max_suppression(p, **kw) for p in preds]
dt = time.perf_counter() - t
torch.save(out, sys.argv[3])
print("UPSTREAM " + json.dumps({"seconds": dt, "limit_hits": sum("time limit" in m for m in limit)}))
"""


@torch.no_grad()
def collect_predictions(opt) -> list:
    data = check_dataset(opt.data)
    torch.manual_seed(0)
    if opt.weights:
        model = attempt_load(opt.weights)
    else:
        model = DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=data["nc"]).fuse().eval()
    loader = create_dataloader(data["val"], opt.imgsz, opt.batch_size, 32, pad=0.5, rect=True, workers=0,
                               prefix="val: ")[0]
    preds = []
    for i, (im, *_) in enumerate(loader):
        if opt.batches and i >= opt.batches:
            break
        preds.append(model(im.float() / 255)[0])
    return preds


def run_upstream(upstream: Path, preds_file: Path, out_file: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(upstream)
    r = subprocess.run([sys.executable, "-c", DRIVER, str(preds_file), json.dumps(SETTINGS), str(out_file)],
                       env=env, capture_output=True, text=True, timeout=1800)
    lines = [line for line in r.stdout.splitlines() if line.startswith("UPSTREAM ")]
    if r.returncode or not lines:
        raise UserError(f"upstream NMS failed (exit {r.returncode}): {(r.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(lines[-1].split(" ", 1)[1])


def same_detections(a: list, b: list) -> bool:
    return all(len(x) == len(y) and torch.allclose(x, y, atol=1e-4) for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def main(opt):
    torch.set_num_threads(opt.threads)
    preds = collect_predictions(opt)
    n = sum(p.shape[0] for p in preds)
    candidates = sum(int((p[..., 4] > SETTINGS["conf_thres"]).sum()) for p in preds) / n
    upstream = Path(opt.upstream).resolve() if opt.upstream else None
    if upstream is not None and not (upstream / "yolov5" / "utils" / "general.py").is_file():
        print(f"upstream YOLOv5 not found in {upstream}: timing this project only")
        upstream = None
    ours_t, theirs_t, hits, same = [], [], 0, True
    with tempfile.TemporaryDirectory() as tmp:
        preds_file, out_file = Path(tmp) / "preds.pt", Path(tmp) / "out.pt"
        torch.save(preds, preds_file)
        for _ in range(opt.rounds):
            t = time.perf_counter()
            ours = [non_max_suppression(p, **SETTINGS) for p in preds]
            ours_t.append(time.perf_counter() - t)
            if upstream is not None:
                r = run_upstream(upstream, preds_file, out_file)
                theirs_t.append(r["seconds"])
                hits += r["limit_hits"]
                same &= same_detections(ours, torch.load(out_file))
    print(f"\nNMS on {n} shapes val images at {opt.imgsz} px, batch {opt.batch_size}, {opt.threads} thread(s): "
          f"{candidates:.0f} candidates/image above conf {SETTINGS['conf_thres']}, multi-label, IoU "
          f"{SETTINGS['iou_thres']}, max_det {SETTINGS['max_det']}; median of {opt.rounds} interleaved rounds")
    ours_ms = statistics.median(ours_t) / n * 1e3
    print(f"{'implementation':<26}{'ms/image':>10}{'x ours':>9}")
    print(f"{'yolov5-qat':<26}{ours_ms:>10.2f}{1:>9.2f}")
    if theirs_t:
        up_ms = statistics.median(theirs_t) / n * 1e3
        print(f"{'upstream v7.0':<26}{up_ms:>10.2f}{up_ms / ours_ms:>9.2f}")
        print(f"same detections: {same}; upstream hit its time limit {hits} times in {opt.rounds} rounds "
              f"(its later images of those batches came back empty)")


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", default="", help="folder holding the yolov5 package (optional)")
    parser.add_argument("--weights", default="", help="a checkpoint instead of a random yolov5n")
    parser.add_argument("--data", default="shapes.yaml")
    parser.add_argument("--imgsz", "--img", type=int, default=320)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=0, help="only the first N batches (0: all)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_opt())
