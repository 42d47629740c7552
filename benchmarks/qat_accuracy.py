"""QAT accuracy with error bars: the experiments 1-11 of cshbli/yolov5_qat, this project's own options and PTQ, side
by side from one FP32 parent, each trained row over several seeds; on shapes by default, on any dataset with --data.

    python benchmarks/qat_accuracy.py [--parent weights/shapes_yolov5n_relu.pt] [--epochs 3] [--seeds 0 1 2]
    python benchmarks/qat_accuracy.py --summary        # the table, CSV and chart from the rows measured so far
    # real images: the official yolov5n, train2017 to train, val2017 to validate (data/coco128_val2017.yaml)
    python benchmarks/qat_accuracy.py --data coco128_val2017.yaml --parent ../shared/release/yolov5n.pt --img 640 \
        --variants "FP32" "PTQ mse pow2" "PTQ default" "pow2 all, per-channel" "pow2 all, one scale"

Every finished run is appended to --csv (default notes/qat_accuracy/runs.csv, notes/qat_accuracy/<data>/runs.csv
for another --data) as soon as it is validated; a run
already in it (same variant, seed, epochs, image size and parent) is not run again, so a long benchmark can be
completed in pieces, on several machines. Runs go seed by seed (all variants at seed 0, then seed 1, ...), so a
partial run still gives every row.

- FP32 fine-tune (the reference): the parent trained for the same epochs with the same hyp (hyp.qat.yaml) and
  seed; extra epochs alone move a parent's mAP, so QAT is compared with this, seed by seed. Its per-epoch mAPs are
  recorded to show whether it still moves.
- QAT rows: train.py --qat with the flags of the original experiment (--disable-observer-epoch 0 --freeze-bn-epoch
  0, plus --bn-folding / --pow2-scale as the experiment says) and its recipe from data/quant/. Experiment 5 is
  experiment 4 on a ReLU6 model: it starts from the ReLU6 parent (--parent-relu6, the ReLU parent fine-tuned with
  --act relu6) and is compared with that parent's own FP32 fine-tune. This project's own rows: its default recipe
  (default.yaml: MSE on a histogram of every calibration image, one scale per channel for the Detect outputs from
  min/max), the default before it (mse_sampled.yaml: MSE on a sample of each batch, Detect ranges from a moving
  average), one scale per tensor everywhere (mse_per_tensor.yaml), mse_sampled.yaml with the Detect outputs'
  per-channel ranges from min/max over all calibration batches (detect_minmax.yaml), learnable power-of-two scales
  (learnable.yaml) and shared concat scales (shared_concat.yaml).
- PTQ rows: val.py --ptq of the parent with minmax, percentile and MSE observers (one scale per tensor everywhere),
  linear and pow2, and with the default, mse_sampled and detect_minmax recipes; BN folded. Calibration reads
  --calib-batches batches of the train split in a shuffled order fixed by the loader's seed 0, without augmentation,
  so a PTQ row is measured once; retention is against the parent.

Retention of a QAT row = mean over seeds of (QAT mAP50-95 / FP32 fine-tune mAP50-95 at the same seed); its spread is
the standard deviation over seeds. All numbers come from val.run on each run's best.pt with the same settings.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import val
from models.quant import QATConfig

SCHEDULE = ["--disable-observer-epoch", "0", "--freeze-bn-epoch", "0"]  # the original experiments' schedule
BN, POW2 = ["--bn-folding"], ["--pow2-scale"]


def _exp(n, name, flags):
    return f"exp{n:02d} " + name, ["--qat", *SCHEDULE, *flags, "--qat-recipe", f"data/quant/exp{n:02d}_{name}.yaml"]


# name -> train.py flags ([] = FP32 fine-tune); order = the order of the table
TRAINED = dict([
    ("FP32 fine-tune (reference)", []),
    _exp(1, "nonpow2_all", []), _exp(2, "nonpow2_all_bnfold", BN),
    _exp(3, "pow2_all", POW2), _exp(4, "pow2_all_bnfold", BN + POW2),
    _exp(6, "pow2_last_float", POW2), _exp(7, "pow2_last_float_bnfold", BN + POW2),
    _exp(8, "pow2_first_only", POW2), _exp(9, "pow2_first_only_bnfold", BN + POW2),
    _exp(10, "pow2_last_fixed", POW2), _exp(11, "pow2_last_fixed_bnfold", BN + POW2),
    ("pow2 all, per-channel Detect outputs (default.yaml)", ["--qat", *SCHEDULE, *BN, *POW2]),
    ("pow2 all, per-channel Detect outputs, sampled MSE (mse_sampled.yaml)",
     ["--qat", *SCHEDULE, *BN, *POW2, "--qat-recipe", "data/quant/mse_sampled.yaml"]),
    ("pow2 all, one scale per tensor (mse_per_tensor.yaml)", ["--qat", *SCHEDULE, *BN, *POW2, "--qat-recipe",
                                                              "data/quant/mse_per_tensor.yaml"]),
    ("pow2 all, per-channel Detect outputs from min/max (detect_minmax.yaml)",
     ["--qat", *SCHEDULE, *BN, *POW2, "--qat-recipe", "data/quant/detect_minmax.yaml"]),
    ("pow2 all, learnable scales (learnable.yaml)", ["--qat", *SCHEDULE, *BN, *POW2, "--qat-recipe",
                                                     "data/quant/learnable.yaml"]),
    ("pow2 all, shared concat (shared_concat.yaml)", ["--qat", *SCHEDULE, *BN, *POW2, "--qat-recipe",
                                                      "data/quant/shared_concat.yaml"]),
    ("FP32 fine-tune ReLU6 (reference for exp05)", []),
    _exp(5, "pow2_all_relu6", BN + POW2),
])
RELU6 = {"FP32 fine-tune ReLU6 (reference for exp05)", "exp05 pow2_all_relu6"}  # rows from the ReLU6 parent
REFERENCE = {name: "FP32 fine-tune ReLU6 (reference for exp05)" if name in RELU6 else "FP32 fine-tune (reference)"
             for name in TRAINED}
# name -> (activation observer, or a recipe file; pow2)
PTQ = {f"PTQ {obs} {kind}": (obs, kind == "pow2") for kind in ("linear", "pow2")
       for obs in ("minmax", "percentile", "mse")}
PTQ["PTQ default recipe pow2 (per-channel Detect outputs)"] = ("data/quant/default.yaml", True)
PTQ["PTQ mse_sampled recipe pow2 (per-channel Detect outputs, sampled MSE)"] = ("data/quant/mse_sampled.yaml", True)
PTQ["PTQ detect_minmax recipe pow2 (per-channel Detect outputs from min/max)"] = ("data/quant/detect_minmax.yaml", True)
FIELDS = ["variant", "seed", "epochs", "img", "parent", "mAP50", "mAP50-95", "per_epoch_mAP50-95", "seconds"]


def sh(args):
    print("$ " + " ".join(map(str, args)), flush=True)
    r = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT)
    if r.returncode:
        raise SystemExit(f"ERROR: {args[0]} exited with {r.returncode}")


def file_id(path: Path) -> str:
    """The parent as the CSV knows it: file name and the start of its SHA-256."""
    return f"{path.name}:{hashlib.sha256(path.read_bytes()).hexdigest()[:12]}"


def read_rows(csv_file: Path) -> list[dict]:
    if not csv_file.exists():
        return []
    with open(csv_file, newline="") as f:
        return list(csv.DictReader(f))


def append_row(csv_file: Path, row: dict):
    csv_file.parent.mkdir(parents=True, exist_ok=True)
    new = not csv_file.exists()
    with open(csv_file, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            w.writeheader()
        w.writerow(row)
        f.flush()


def per_epoch_map(run_dir: Path) -> str:
    import pandas as pd

    df = pd.read_csv(run_dir / "results.csv")
    df.columns = [c.strip() for c in df.columns]
    return " ".join(f"{x:.4f}" for x in df["metrics/mAP_0.5:0.95"])


def ptq_recipe(out: Path, observer: str) -> Path:
    f = out / f"ptq_{observer}.yaml"
    if not f.exists():
        out.mkdir(parents=True, exist_ok=True)
        f.write_text(f"description: PTQ with {observer} activation observers\n"
                     f"default:\n  activation: {{observer: {observer}}}\nrules: []\n")
    return f


def measure(opt):
    out, csv_file, parent, parent6 = Path(opt.out), Path(opt.csv), Path(opt.parent), Path(opt.parent_relu6)
    if not parent.is_file():
        raise SystemExit(f"ERROR: {parent}: no such parent checkpoint; pass --parent (an FP32 checkpoint)")
    pid = file_id(parent)
    if not parent6.is_file():
        print(f"{parent6}: no ReLU6 parent, experiment 5 and its reference are skipped (--parent-relu6)")
    pids = {name: (file_id(parent6) if parent6.is_file() else None) if name in RELU6 else pid for name in TRAINED}
    done = {(r["variant"], r["seed"], r["epochs"], r["img"], r["parent"]) for r in read_rows(csv_file)}
    evaluate = dict(data=opt.data, imgsz=opt.img, batch_size=32, workers=2, device="cpu", plots=False,
                    project=str(out / "val"), exist_ok=True)

    def record(variant, seed, r, per_epoch, t0):
        row = {"variant": variant, "seed": seed, "epochs": opt.epochs if seed != "-" else "-", "img": opt.img,
               "parent": pids.get(variant, pid), "mAP50": f"{r[2]:.5f}", "mAP50-95": f"{r[3]:.5f}",
               "per_epoch_mAP50-95": per_epoch,
               "seconds": f"{time.time() - t0:.0f}"}
        append_row(csv_file, row)
        print(f"{variant} seed {seed}: mAP50 {r[2]:.4f} mAP50-95 {r[3]:.4f}", flush=True)

    selected = [v for v in [*TRAINED, *PTQ, "FP32 parent"] if not opt.variants or any(s in v for s in opt.variants)]
    if "FP32 parent" in selected and ("FP32 parent", "-", "-", str(opt.img), pid) not in done:
        t0 = time.time()
        record("FP32 parent", "-", val.run(weights=str(parent), name="parent", **evaluate)[0], "", t0)
    for name, (observer, pow2) in PTQ.items():
        if name in selected and (name, "-", "-", str(opt.img), pid) not in done:
            t0 = time.time()
            recipe = observer if observer.endswith(".yaml") else ptq_recipe(out, observer)
            r = val.run(weights=str(parent), name="ptq", ptq=True, qat=QATConfig(bn_folding=True, pow2=pow2,
                        recipe=str(recipe)), calib_batches=opt.calib_batches, **evaluate)[0]
            record(name, "-", r, "", t0)
    for seed in opt.seeds:
        for name, flags in TRAINED.items():
            if name not in selected or pids[name] is None or \
                    (name, str(seed), str(opt.epochs), str(opt.img), pids[name]) in done:
                continue
            t0 = time.time()
            run = f"v{list(TRAINED).index(name):02d}_s{seed}"
            run_dir = out / run
            shutil.rmtree(run_dir, ignore_errors=True)  # what an interrupted benchmark left: start that run afresh
            start = parent6 if name in RELU6 else parent
            sh(["train.py", "--data", opt.data, "--weights", start, "--hyp", "data/hyps/hyp.qat.yaml", "--img",
                opt.img, "--batch-size", opt.batch, "--epochs", opt.epochs, "--workers", 2, "--noplots", "--seed",
                seed, "--calib-batches", opt.calib_batches, *flags, "--project", out, "--name", run, "--exist-ok"])
            r = val.run(weights=str(run_dir / "weights" / "best.pt"), name=run, **evaluate)[0]
            record(name, seed, r, per_epoch_map(run_dir), t0)


def summarize(opt):
    csv_file, pid = Path(opt.csv), file_id(Path(opt.parent))
    pid6 = file_id(Path(opt.parent_relu6)) if Path(opt.parent_relu6).is_file() else None
    rows = [r for r in read_rows(csv_file) if r["parent"] == (pid6 if r["variant"] in RELU6 else pid)
            and r["img"] == str(opt.img) and r["epochs"] in (str(opt.epochs), "-")]
    if not rows:
        raise SystemExit(f"ERROR: {csv_file} has no rows for this parent, --epochs {opt.epochs}, --img {opt.img}")
    by = {}
    for r in rows:
        by.setdefault(r["variant"], {})[r["seed"]] = (float(r["mAP50"]), float(r["mAP50-95"]), r["per_epoch_mAP50-95"])
    parent = by.get("FP32 parent", {}).get("-")
    table = []
    for name in ["FP32 parent", *TRAINED, *PTQ]:
        if name not in by:
            continue
        seeds = sorted(by[name])
        m50 = np.array([by[name][s][0] for s in seeds])
        m = np.array([by[name][s][1] for s in seeds])
        if name in PTQ:
            ret = m / parent[1] * 100 if parent else np.array([])
        elif name in TRAINED and REFERENCE[name] != name:
            ref = by.get(REFERENCE[name], {})
            ret = np.array([by[name][s][1] / ref[s][1] * 100 for s in seeds if s in ref])
        else:
            ret = np.array([])
        table.append((name, len(seeds), m50.mean(), m.mean(), m.std(ddof=1) if len(m) > 1 else float("nan"),
                      ret.mean() if len(ret) else float("nan"), ret.std(ddof=1) if len(ret) > 1 else float("nan")))

    shown = Path(opt.parent).resolve()
    shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
    print(f"\nQAT accuracy on {Path(opt.data).stem} (parent {shown}, {opt.epochs} epochs, img {opt.img}; "
          f"mean and standard deviation over seeds)")
    width = max(len(t[0]) for t in table) + 2
    print(f"{'variant':<{width}}{'n':>3}{'mAP50':>8}{'mAP50-95':>10}{'sd':>8}{'retention':>11}{'sd':>7}")
    def fmt(x, spec, unit=""):
        return "-" if np.isnan(x) else format(x, spec) + unit

    for name, n, m50, m, sd, ret, rsd in table:
        print(f"{name:<{width}}{n:>3}{m50:>8.4f}{m:>10.4f}{fmt(sd, '.4f'):>8}{fmt(ret, '.1f', '%'):>11}"
              f"{fmt(rsd, '.1f'):>7}")
    print("retention: QAT vs the FP32 fine-tune of its parent at the same seed (exp05: the ReLU6 parent's); PTQ vs "
          "the FP32 parent")
    for name in TRAINED:
        for s, row in sorted(by.get(name, {}).items()):
            print(f"{name.split(' (')[0]} seed {s} mAP50-95 per epoch: {row[2]}{held(name, row[2])}")

    out = Path(opt.csv).parent
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["variant", "n", "mAP50", "mAP50-95", "mAP50-95 sd", "retention %", "retention sd"])
        for row in table:
            w.writerow([row[0], row[1], *(f"{x:.5f}" for x in row[2:])])
    plot(table, out / "qat_accuracy.png", opt)
    print(f"saved {out / 'summary.csv'} and {out / 'qat_accuracy.png'}")


def held(name: str, per_epoch: str) -> str:
    """For a QAT row: whether no later epoch's mAP50-95 fell below the first epoch's."""
    maps = [float(x) for x in per_epoch.split()]
    if name in REFERENCE.values() or len(maps) < 2:
        return ""
    return " (no epoch below the first)" if min(maps[1:]) >= maps[0] else f" (lowest {min(maps[1:]):.4f} < first)"


def plot(table, file, opt):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [t[0] for t in table]
    means = np.array([t[3] for t in table])
    sds = np.nan_to_num(np.array([t[4] for t in table]))
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(names) + 1.5), tight_layout=True)
    y = np.arange(len(names))[::-1]
    ax.barh(y, means, xerr=sds, capsize=3, color=["tab:grey" if n.startswith(("FP32", "PTQ")) else "tab:blue"
                                                    for n in names])
    ax.set_yticks(y, names, fontsize=8)
    ax.set_xlabel("mAP50-95 (mean over seeds, error bar: standard deviation)")
    ax.set_title(f"QAT accuracy on {Path(opt.data).stem}: {Path(opt.parent).name}, {opt.epochs} epochs, img {opt.img}")
    ax.set_xlim(min(means) * 0.9, max(means + sds) * 1.02)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(file, dpi=150)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parent", default=str(ROOT / "weights/shapes_yolov5n_relu.pt"), help="FP32 parent checkpoint")
    ap.add_argument("--parent-relu6", default=str(ROOT / "weights/shapes_yolov5n_relu6.pt"),
                    help="FP32 ReLU6 checkpoint, the parent of experiment 5")
    ap.add_argument("--data", default="data/shapes.yaml", help="dataset yaml (train split to train and calibrate)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--calib-batches", type=int, default=32)
    ap.add_argument("--variants", nargs="*", default=[], help="only variants whose name contains one of these")
    ap.add_argument("--out", default=str(ROOT / "runs/qat_accuracy"), help="run folders")
    ap.add_argument("--csv", default="", help="measured rows (resumable); default notes/qat_accuracy[/<data>]/runs.csv")
    ap.add_argument("--summary", action="store_true", help="only print the table from --csv and draw the chart")
    opt = ap.parse_args()
    stem = Path(opt.data).stem
    opt.csv = opt.csv or str(ROOT / "notes/qat_accuracy" / ("" if stem == "shapes" else stem) / "runs.csv")
    if not opt.summary:
        measure(opt)
    summarize(opt)
