"""val.py's mAP of each checkpoint at several batch sizes, to show how much the batch moves it.

Rectangular batches pad each batch to the smallest stride multiple that fits its images, so an image can get a
different padded shape, and a float model slightly different outputs, at another batch size. A frozen power-of-two
QAT model computes each image exactly (integer arithmetic in float32), so only that padding can move its mAP too.
Every run is an ordinary `val.run` with the same flags but --batch-size.

    python benchmarks/val_batch.py --weights runs/demo/relu/weights/best.pt runs/demo/qat/weights/best.pt
    python benchmarks/val_batch.py --data shapes_val1200.yaml --bootstrap 200 --weights A.pt B.pt

How much a spread means depends on how many images it is measured on: it is the largest of ten differences
between mAPs that share most of their predictions. --bootstrap N resamples the val images with replacement N
times (the same resamples for every checkpoint and batch size), recomputes every spread from the per-image
statistics val.run matched, and prints for each checkpoint after the first the difference between its spread and
the first one's with a 95% interval: an interval that holds 0 means the two move with the batch alike as far as
these images can tell.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import val
from utils.general import LOGGER, UserError, run_cli
from utils.metrics import ap_per_class


def flatten(image_stats):
    """val.run's image_stats -> (correct (n,10), conf, pred class, image index of each prediction, label class,
    image index of each label, image paths) as numpy arrays."""
    paths = [p for p, _ in image_stats]
    parts = [[], [], [], [], [], []]
    for i, (_, entry) in enumerate(image_stats):
        if entry is None:
            continue
        correct, conf, pcls, tcls = (t.cpu().numpy() for t in entry)
        for k, a in enumerate((correct, conf, pcls, np.full(len(conf), i), tcls, np.full(len(tcls), i))):
            parts[k].append(a)
    correct, conf, pcls, pimg, tcls, timg = (np.concatenate(a) if a else np.zeros(0) for a in parts)
    return correct.reshape(-1, 10), conf, pcls, pimg.astype(int), tcls, timg.astype(int), paths


def weighted_map(flat, weights):
    """mAP50-95 with image i counted weights[i] times (a bootstrap resample)."""
    correct, conf, pcls, pimg, tcls, timg, _ = flat
    wp, wt = weights[pimg], weights[timg]
    if not wt.sum():
        return 0.0
    ap = ap_per_class(np.repeat(correct, wp, 0), np.repeat(conf, wp), np.repeat(pcls, wp), np.repeat(tcls, wt))[5]
    return float(ap.mean(1).mean())


def bootstrap_spreads(flats, n, seed=0):
    """flats[checkpoint][batch size index] = flatten(...). Returns an (n, checkpoints) array: each checkpoint's spread
    (max - min mAP50-95 over the batch sizes) on n resamples of the images, the same resamples for all."""
    n_images = len(flats[0][0][-1])
    for per_batch in flats:
        for f in per_batch:
            if f[-1] != flats[0][0][-1]:
                raise UserError("the checkpoints were not validated on the same images in the same order")
    rng = np.random.default_rng(seed)
    out = np.zeros((n, len(flats)))
    for r in range(n):
        w = np.bincount(rng.integers(0, n_images, n_images), minlength=n_images)
        for c, per_batch in enumerate(flats):
            maps = [weighted_map(f, w) for f in per_batch]
            out[r, c] = max(maps) - min(maps)
    return out


def main(opt):
    for w in opt.weights:
        if not Path(w).exists():  # a file, or an exported model's folder
            raise UserError(f"--weights {w}: file not found")
    if opt.bootstrap < 0:
        raise UserError(f"--bootstrap {opt.bootstrap}: give a number of resamples, 0 for none")
    rows, flats = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for w in opt.weights:
            maps, per_batch = [], []
            for b in opt.batch_sizes:
                image_stats = []
                r = val.run(data=opt.data, weights=w, imgsz=opt.imgsz, batch_size=b, workers=opt.workers,
                            plots=False, project=tmp, name="val", exist_ok=True, device="cpu",
                            image_stats=image_stats)[0]
                maps.append((r[2], r[3]))
                if opt.bootstrap:
                    per_batch.append(flatten(image_stats))
            rows.append((w, maps))
            flats.append(per_batch)
    print(f"\nval.py mAP50-95 (mAP50) by --batch-size on {opt.data} at {opt.imgsz} px")
    print(f"{'checkpoint':<44}" + "".join(f"{'b' + str(b):>18}" for b in opt.batch_sizes) + f"{'spread':>10}")
    spreads = []
    for w, maps in rows:
        spreads.append(max(m for _, m in maps) - min(m for _, m in maps))
        cells = "".join(f"{m:>9.5f} ({m50:.4f})" for m50, m in maps)
        print(f"{str(w)[-44:]:<44}{cells}{spreads[-1]:>10.5f}")
    if opt.bootstrap and len(rows) > 1:
        boot = bootstrap_spreads(flats, opt.bootstrap)
        print(f"\nspread minus the spread of {rows[0][0]}, with a 95% interval from {opt.bootstrap} resamples of the "
              f"{len(flats[0][0][-1])} images")
        for c in range(1, len(rows)):
            lo, hi = np.percentile(boot[:, c] - boot[:, 0], [2.5, 97.5])
            print(f"{str(rows[c][0])[-44:]:<44}{spreads[c] - spreads[0]:>+10.5f}   [{lo:+.5f}, {hi:+.5f}]")


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", required=True, help="checkpoints (.pt, or exported files)")
    parser.add_argument("--data", default="shapes.yaml")
    parser.add_argument("--imgsz", "--img", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--bootstrap", type=int, default=0, metavar="N",
                        help="compare each checkpoint's spread with the first one's over N resamples of the images")
    return parser.parse_args(argv)


if __name__ == "__main__":
    LOGGER.setLevel("WARNING")
    run_cli(main, parse_opt())
