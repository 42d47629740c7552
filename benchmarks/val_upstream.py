"""val.py against upstream YOLOv5 v7.0 on images of arbitrary size: P, R, mAP50, mAP50-95 and the --save-json
predictions, box for box, for the same checkpoint and flags.

The dataset is made here from the shapes val split: every image resized to another size (odd, non-square, several
aspect ratios, a few very small and very large ones), labels unchanged (they are normalised). Upstream is the
`yolov5==7.0.14` package, installed outside this repository with the few modules it imports (it needs numpy < 2):

    pip install --no-deps --target ../upstream yolov5==7.0.14 "numpy<2" pandas==2.2.3 "setuptools<70" \\
        ultralytics==8.0.238 requests urllib3 idna certifi psutil python-dateutil pytz
    python benchmarks/val_upstream.py --upstream ../upstream

Both run in subprocesses with that folder's numpy (< 2): numpy 2 sorts equal aspect ratios in another order, which
moves images across rectangular-batch boundaries (upstream in a numpy 2 environment differs from itself the same way).
Without it the script says so and exits 0.
Exit status 1 when the two disagree beyond --tol (metrics) or a prediction differs. `--speed N` also times a whole
val.run of each on the same data and on half of it, taking turns for N rounds, and prints images/s side by side, of
the whole run and per image (run it on a quiet machine).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import shutil
import statistics

from utils.dataset_yaml import check_dataset
from utils.general import LOGGER, UserError, run_cli, yaml_save

# (w, h): odd sides, portrait and landscape, very small and very large
SIZES = [(269, 245), (242, 361), (37, 53), (1203, 771), (513, 127), (99, 301), (333, 333), (700, 1001), (61, 29),
         (455, 387), (255, 257), (1500, 401)]

OURS = """
import json, sys
sys.path.insert(0, sys.argv[2])
import time
import val
t0 = time.perf_counter()
r = val.run(**json.loads(sys.argv[1]))
print("OURS_SECONDS " + json.dumps(time.perf_counter() - t0))
print("OURS_RESULT " + json.dumps([float(x) for x in r[0][:4]]))
"""

DRIVER = """
import json, sys
import yolov5.models, yolov5.models.common, yolov5.models.experimental, yolov5.models.yolo
import yolov5.utils.downloads, yolov5.utils.general
# a checkpoint pickles its classes as models.common.Conv etc.; resolved to the package's own modules, upstream's fuse()
# recognises them (isinstance) and folds Conv+BN as a v7.0 clone does, instead of running BN unfused
sys.modules.update({name: getattr(yolov5.models, name.split(".")[1]) if "." in name else yolov5.models
                    for name in ("models", "models.common", "models.experimental", "models.yolo")})
from yolov5 import val
for m in (yolov5.models.common, yolov5.utils.downloads):  # the pip package's hub lookup (network, not v7.0's code)
    m.attempt_download_from_hub = lambda *a, **k: None
yolov5.utils.general.check_font = lambda *a, **k: None  # downloads a plotting font; no metric depends on it
import types, time
# upstream's NMS empties the rest of a batch once its wall-clock limit passes, which on a busy machine drops images;
# a clock that stands still for NMS compares the two implementations rather than the machine's load
yolov5.utils.general.time = types.SimpleNamespace(time=lambda: 0.0, perf_counter=time.perf_counter, sleep=time.sleep)
t0 = time.perf_counter()
r = val.run(**json.loads(sys.argv[1]))
print("UPSTREAM_SECONDS " + json.dumps(time.perf_counter() - t0))
print("UPSTREAM_RESULT " + json.dumps([float(x) for x in r[0][:4]]))
"""


def make_dataset(out: Path, n: int) -> Path:
    """The first n shapes val images, each resized to the next size of SIZES; returns the data yaml."""
    shapes = check_dataset(ROOT / "data/shapes.yaml")
    src = sorted(Path(shapes["val"]).glob("*.jpg"))[:n]
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(src):
        w, h = SIZES[i % len(SIZES)]
        im = cv2.resize(cv2.imread(str(f)), (w, h), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(out / "images" / f.name), im)
        label = Path(str(f).replace(f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}")).with_suffix(".txt")
        (out / "labels" / label.name).write_text(label.read_text() if label.is_file() else "")
    data = out / "odd.yaml"
    yaml_save(data, {"path": str(out), "train": "images", "val": "images", "names": shapes["names"]})
    return data


def _run(code, tag, argv, pythonpath, cwd, timed=False):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # upstream resolves the checkpoint's pickled models.* classes through its own folder; torch >= 2.6 needs the
    # full unpickler for upstream's torch.load
    env.update(PYTHONPATH=pythonpath, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD="1", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", code, *argv], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=1800)
    lines = [line for line in r.stdout.splitlines() if line.startswith(tag + " ")]
    if r.returncode or not lines:
        tail = (r.stderr.strip().splitlines() or ["no output"])[-1]
        raise UserError(f"{tag}: val.run failed (exit {r.returncode}): {tail}")
    result = json.loads(lines[-1].split(" ", 1)[1])
    if not timed:
        return result
    seconds = next(line for line in r.stdout.splitlines() if line.startswith(tag.replace("RESULT", "SECONDS") + " "))
    return result, json.loads(seconds.split(" ", 1)[1])


def run_upstream(upstream: Path, kwargs: dict, cwd: Path, timed=False):
    return _run(DRIVER, "UPSTREAM_RESULT", [json.dumps(kwargs)], f"{upstream}{os.pathsep}{upstream / 'yolov5'}", cwd,
                timed)


def run_ours(upstream: Path, kwargs: dict, cwd: Path, timed=False):
    """This project's val.run with the numpy (< 2) upstream runs with: numpy 2's sort orders images of equal aspect
    ratio differently, which changes the rectangular batches at their boundaries (and so some predictions)."""
    return _run(OURS, "OURS_RESULT", [json.dumps(kwargs), str(ROOT)], str(upstream), cwd, timed)


def speed(upstream: Path, common: dict, tmp: Path, rounds: int, images: int):
    """Images/s of a whole val.run (model loading, data, inference, NMS, metrics) on `images` images and on half of
    them, both implementations taking turns for `rounds` rounds in fresh processes (one thread each); the median of
    each. The difference of the two runs is the per-image rate with the one-time costs (imports, model loading and
    its summary) taken out: what decides the speed of a validation set of any real size."""
    half = max(images // 2, 1)
    datasets = {images: common["data"], half: str(make_dataset(tmp / "odd_half", half))}
    times = {(who, n): [] for who in ("ours", "upstream") for n in datasets}
    for i in range(rounds):
        for who, fn in (("upstream", run_upstream), ("ours", run_ours)):
            for n, data in datasets.items():
                kwargs = {**common, "data": data, "save_json": False, "name": f"speed_{who}_{n}_{i}"}
                times[who, n].append(fn(upstream, kwargs, tmp, timed=True)[1])
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"\nval.run speed, {rounds} rounds taking turns (median, 1 thread): whole run on {images} images (loading, "
          f"data, inference, NMS, metrics), and per image from the difference with a run on {half}:")
    print(f"{'':<10}{'seconds':>10}{'images/s':>10}{f'{half} img s':>12}{'per image':>12}{'images/s':>10}")
    rate = {}
    for who in ("ours", "upstream"):
        full, part = med[who, images], med[who, half]
        rate[who] = (images - half) / max(full - part, 1e-9)
        print(f"{who:<10}{full:>10.2f}{images / full:>10.2f}{part:>12.2f}{1000 / rate[who]:>10.1f}ms"
              f"{rate[who]:>10.2f}")
    print(f"images/s ours / upstream: whole run {med['upstream', images] / med['ours', images]:.2f}, per image "
          f"{rate['ours'] / rate['upstream']:.2f}")


def predictions(folder: Path) -> list:
    """The --save-json predictions in an order both sides share: by image, class and box (to 0.01 px), not by score,
    whose 5 rounded decimals can order two close scores differently on the two sides."""
    (f,) = list(folder.glob("*_predictions.json"))
    key = lambda p: (str(p["image_id"]), p["category_id"], [round(x, 2) for x in p["bbox"]], -p["score"])  # noqa: E731
    return sorted(json.loads(f.read_text()), key=key)


def compare_predictions(ours: list, theirs: list) -> dict:
    worst_box = worst_score = 0.0
    same_keys = len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        same_keys &= (str(a["image_id"]), a["category_id"]) == (str(b["image_id"]), b["category_id"])
        worst_box = max(worst_box, max(abs(x - y) for x, y in zip(a["bbox"], b["bbox"])))
        worst_score = max(worst_score, abs(a["score"] - b["score"]))
    return {"n_ours": len(ours), "n_upstream": len(theirs), "same_images_and_classes": bool(same_keys),
            "max_bbox_diff": worst_box, "max_score_diff": worst_score}


def main(opt):
    upstream = Path(opt.upstream).resolve()
    if not (upstream / "yolov5" / "val.py").is_file():
        print(f"skipped: upstream YOLOv5 v7.0 not found in {upstream} (install it as the docstring says: "
              f"pip install --no-deps --target {opt.upstream} yolov5==7.0.14 ...)")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_dataset(tmp / "odd", opt.images)
        common = {"data": str(data), "weights": str(Path(opt.weights).resolve()), "imgsz": opt.imgsz,
                  "batch_size": opt.batch_size, "save_json": True, "plots": False, "workers": 0,
                  "project": str(tmp), "exist_ok": True, "device": "cpu"}
        theirs = run_upstream(upstream, {**common, "name": "upstream"}, tmp)
        ours = run_ours(upstream, {**common, "name": "ours"}, tmp)
        pred = compare_predictions(predictions(tmp / "ours"), predictions(tmp / "upstream"))
        if opt.speed:
            speed(upstream, common, tmp, opt.speed, opt.images)
        if opt.keep:
            shutil.copytree(tmp, opt.keep, dirs_exist_ok=True)
    names = ("P", "R", "mAP50", "mAP50-95")
    sizes = ", ".join(f"{w}x{h}" for w, h in SIZES)
    print(f"\nval.py vs upstream YOLOv5 v7.0 ({upstream}; its NMS time limit off): {Path(opt.weights).name}, "
          f"{opt.images} shapes val images "
          f"resized to {sizes} (cycled), --img {opt.imgsz} --batch-size {opt.batch_size}")
    print(f"{'metric':<10}{'ours':>10}{'upstream':>10}{'diff':>10}")
    worst = 0.0
    for n, a, b in zip(names, ours, theirs):
        worst = max(worst, abs(a - b))
        print(f"{n:<10}{a:>10.5f}{b:>10.5f}{a - b:>+10.5f}")
    print(f"--save-json predictions: {pred['n_ours']} ours, {pred['n_upstream']} upstream; same images and classes in "
          f"order: {pred['same_images_and_classes']}; max |bbox diff| {pred['max_bbox_diff']:.4f} px, "
          f"max |score diff| {pred['max_score_diff']:.6f}")
    agree = worst <= opt.tol and pred["same_images_and_classes"] and pred["max_bbox_diff"] <= 0.0011 \
        and pred["max_score_diff"] <= 1.1e-5
    print("agree" if agree else f"DIFFER (metrics tolerance {opt.tol}; JSON boxes and scores within one unit of their "
                                "last decimal)")
    return 0 if agree else 1


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--upstream", default=str(ROOT.parent / "upstream"), help="folder holding the yolov5 package")
    parser.add_argument("--weights", default=str(ROOT / "weights" / "shapes_yolov5n_silu.pt"), help="checkpoint")
    parser.add_argument("--imgsz", "--img", type=int, default=256, help="inference size (pixels)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size")
    parser.add_argument("--images", type=int, default=60, help="how many shapes val images to resize and use")
    parser.add_argument("--keep", default="", help="copy the dataset and both runs' outputs to this folder")
    parser.add_argument("--tol", type=float, default=0.001, help="largest allowed metric difference")
    parser.add_argument("--speed", type=int, default=0, metavar="ROUNDS",
                        help="also time both val.run side by side for this many rounds (images/s)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    LOGGER.setLevel("WARNING")
    raise SystemExit(run_cli(main, parse_opt()))
