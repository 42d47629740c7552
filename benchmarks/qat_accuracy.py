"""QAT accuracy on shapes, side by side: PTQ, QAT (linear and power-of-two scales), and the same parent fine-tuned
in FP32 for the same epochs as the reference.

    python benchmarks/qat_accuracy.py [--parent runs/demo/relu/weights/best.pt] [--epochs 3] [--img 256]

The parent is an FP32 ReLU yolov5n trained on shapes (default: the demo's ReLU stage; if it is missing it is made
from weights/shapes_yolov5n_silu.pt the way `make demo` makes it). Every QAT variant uses the seed's flags
(--bn-folding --disable-observer-epoch 0 --freeze-bn-epoch 0) and hyp.qat.yaml. Retention = quantized mAP50-95 /
FP32 mAP50-95, where the FP32 side is the parent fine-tuned for the same epochs with the same hyp (extra epochs
alone raise the mAP of a parent that is not fully converged); PTQ is compared with the parent itself.
Finished runs under --out are reused. All numbers come from val.run on each run's best.pt with the same settings.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SEED_QAT = ["--qat", "--bn-folding", "--disable-observer-epoch", "0", "--freeze-bn-epoch", "0"]
VARIANTS = [  # name, extra train.py flags (None: no training, PTQ), val.py PTQ flags
    ("FP32 fine-tune (reference)", [], None),
    ("PTQ linear", None, []),
    ("PTQ pow2", None, ["--pow2-scale"]),
    ("QAT linear, all layers", SEED_QAT, None),
    ("QAT pow2, all layers, seed observers", SEED_QAT + ["--pow2-scale", "--qat-recipe", "data/quant/exp04_pow2_all_bnfold.yaml"], None),
    ("QAT pow2, all layers (default: MSE)", SEED_QAT + ["--pow2-scale"], None),
    ("QAT pow2, Detect convs float", SEED_QAT + ["--pow2-scale", "--qat-recipe", "data/quant/exp07_pow2_last_float_bnfold.yaml"], None),
]


def sh(args):
    print("$ " + " ".join(map(str, args)), flush=True)
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"ERROR: {args[0]} exited with {r.returncode}")


def make_parent(opt):
    parent = Path(opt.parent)
    if parent.exists():
        return parent
    shipped = ROOT / "weights" / "shapes_yolov5n_silu.pt"
    if not shipped.exists():
        raise SystemExit(f"ERROR: {parent} and {shipped} are missing; run `make demo` first or pass --parent")
    sh(["train.py", "--data", "shapes.yaml", "--weights", shipped, "--act", "relu", "--hyp",
        "data/hyps/hyp.m-relu-tune.yaml", "--img", opt.img, "--batch-size", opt.batch, "--epochs", 3, "--workers", 2,
        "--noplots", "--project", opt.out, "--name", "parent", "--exist-ok"])
    return Path(opt.out) / "parent" / "weights" / "best.pt"


def main(opt):
    import val

    out = Path(opt.out)
    parent = make_parent(opt)
    evaluate = dict(data="data/shapes.yaml", imgsz=opt.img, batch_size=32, workers=2, device="cpu", plots=False,
                    project=str(out / "val"), exist_ok=True)
    rows = []
    r, _, _ = val.run(weights=str(parent), name="parent", **evaluate)
    rows.append(("FP32 parent", r[2], r[3], None))
    for i, (name, train_flags, ptq_flags) in enumerate(VARIANTS):
        if train_flags is None:  # PTQ of the parent
            flags = {"ptq": True, "pow2_scale": "--pow2-scale" in ptq_flags, "bn_folding": True,
                     "calib_batches": opt.calib_batches}
            r, _, _ = val.run(weights=str(parent), name=f"v{i}", **evaluate, **flags)
            rows.append((name, r[2], r[3], "parent"))
            continue
        run_dir = out / f"v{i}"
        best = run_dir / "weights" / "best.pt"
        if not best.exists():
            sh(["train.py", "--data", "shapes.yaml", "--weights", parent, "--hyp", "data/hyps/hyp.qat.yaml", "--img",
                opt.img, "--batch-size", opt.batch, "--epochs", opt.epochs, "--workers", 2, "--noplots",
                "--calib-batches", opt.calib_batches, *train_flags, "--project", out, "--name", f"v{i}",
                "--exist-ok"])
        r, _, _ = val.run(weights=str(best), name=f"v{i}", **evaluate)
        rows.append((name, r[2], r[3], "fine-tune" if train_flags else None))

    parent_map = rows[0][2]
    ft_map = rows[1][2]
    print(f"\nQAT accuracy on shapes (yolov5n ReLU parent {parent}, {opt.epochs} epochs, img {opt.img})")
    print(f"{'variant':<42}{'mAP50':>8}{'mAP50-95':>10}{'retention':>11}")
    for name, m50, m, ref in rows:
        base = parent_map if ref == "parent" else ft_map if ref == "fine-tune" else None
        ret = f"{m / base * 100:.1f}%" if base else "-"
        print(f"{name:<42}{m50:>8.4f}{m:>10.4f}{ret:>11}")
    print("retention: PTQ vs the FP32 parent; QAT vs 'FP32 fine-tune (reference)'")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(ROOT / "runs/demo/relu/weights/best.pt"), help="FP32 ReLU checkpoint")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib-batches", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "runs/qat_accuracy"))
    main(ap.parse_args())
