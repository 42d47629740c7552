"""mAP per epoch of the shapes parent runs, one after the other: the SiLU run, the ReLU retraining of its best.pt
and the ReLU run's second cosine cycle. Writes notes/parents/map_per_epoch.png.

    python benchmarks/plot_parents.py [--runs notes/parents/silu notes/parents/relu notes/parents/relu2]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def read_map(csv: Path):
    """(epochs, mAP50, mAP50-95) columns of a train.py results.csv, found by name."""
    import pandas as pd

    df = pd.read_csv(csv)
    df.columns = [c.strip() for c in df.columns]
    return df["epoch"].to_numpy(), df["metrics/mAP_0.5"].to_numpy(), df["metrics/mAP_0.5:0.95"].to_numpy()


def main(opt):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), tight_layout=True)
    start = 0
    for run in map(Path, opt.runs):
        epochs, m50, m = read_map(run / "results.csv")
        x = epochs + start
        ax.plot(x, m, label=f"{run.name} mAP50-95")
        ax.plot(x, m50, "--", alpha=0.6, label=f"{run.name} mAP50")
        tail = max(1, round(len(m) * 0.2))  # the convergence criterion: gain over the last 20% of the epochs
        gain = (m[-1] - m[-tail]) / m[-tail] * 100
        print(f"{run.name}: {len(m)} epochs, final mAP50-95 {m[-1]:.4f}, best {m.max():.4f}; "
              f"last {tail} epochs {m[-tail]:.4f} -> {m[-1]:.4f} ({gain:+.1f}%)")
        ax.axvline(start, color="grey", lw=0.5)
        start = int(x[-1]) + 1
    ax.set_xlabel("epoch (runs one after the other)")
    ax.set_ylabel("val mAP")
    ax.set_title("shapes yolov5n parents, validation per epoch (150 val images, 256 px)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    out = Path(opt.out)
    fig.savefig(out, dpi=150)
    print(f"saved {out}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", default=[str(ROOT / f"notes/parents/{n}") for n in ("silu", "relu", "relu2")])
    ap.add_argument("--out", default=str(ROOT / "notes/parents/map_per_epoch.png"))
    main(ap.parse_args())
