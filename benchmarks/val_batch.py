"""val.py's mAP of each checkpoint at several batch sizes, to show how much the batch moves it.

Rectangular batches pad each batch to the smallest stride multiple that fits its images, so an image can get a
different padded shape, and a float model slightly different outputs, at another batch size. A frozen power-of-two
QAT model computes each image exactly (integer arithmetic in float32), so only that padding can move its mAP too.
Every run is an ordinary `val.run` with the same flags but --batch-size.

    python benchmarks/val_batch.py --weights runs/demo/relu/weights/best.pt runs/demo/qat/weights/best.pt
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import val
from utils.general import LOGGER, UserError, run_cli


def main(opt):
    for w in opt.weights:
        if not Path(w).is_file():
            raise UserError(f"--weights {w}: file not found")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in opt.weights:
            maps = []
            for b in opt.batch_sizes:
                r = val.run(data=opt.data, weights=w, imgsz=opt.imgsz, batch_size=b, workers=opt.workers,
                            plots=False, project=tmp, name="val", exist_ok=True, device="cpu")[0]
                maps.append((r[2], r[3]))
            rows.append((w, maps))
    print(f"\nval.py mAP50-95 (mAP50) by --batch-size on {opt.data} at {opt.imgsz} px")
    print(f"{'checkpoint':<44}" + "".join(f"{'b' + str(b):>18}" for b in opt.batch_sizes) + f"{'spread':>10}")
    for w, maps in rows:
        spread = max(m for _, m in maps) - min(m for _, m in maps)
        cells = "".join(f"{m:>9.5f} ({m50:.4f})" for m50, m in maps)
        print(f"{str(w)[-44:]:<44}{cells}{spread:>10.5f}")


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", nargs="+", required=True, help="checkpoints (.pt, or exported files)")
    parser.add_argument("--data", default="shapes.yaml")
    parser.add_argument("--imgsz", "--img", type=int, default=256)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8, 16, 32, 64])
    parser.add_argument("--workers", type=int, default=2)
    return parser.parse_args(argv)


if __name__ == "__main__":
    LOGGER.setLevel("WARNING")
    run_cli(main, parse_opt())
