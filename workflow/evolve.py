"""train.py --evolve [N]: genetic search over the hyperparameters of a --hyp yaml, as upstream YOLOv5 does it.

Every generation trains a full run (validation only after the last epoch, no intermediate checkpoints) with
hyperparameters mutated from a parent: one of the best runs so far in `evolve.csv`, chosen at random with a
probability that grows with its fitness (0.1 mAP50 + 0.9 mAP50-95). The results and hyperparameters of every
generation are appended to `<run folder>/evolve.csv`, so a search can be stopped and started again with the same
`--name --exist-ok`; `hyp_evolve.yaml` holds the best hyperparameters found and `evolve.png` plots each one against
fitness. The first generation trains the --hyp yaml as given.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from utils.general import LOGGER, UserError, colorstr, yaml_save
from utils.metrics import fitness

METRICS = ("metrics/precision", "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss",
           "val/obj_loss", "val/cls_loss")

# hyperparameter -> (mutation gain, lower limit, upper limit); a gain of 0 keeps the value as given
SEARCH_SPACE = {
    "lr0": (1, 1e-5, 1e-1), "lrf": (1, 0.01, 1.0), "momentum": (0.3, 0.6, 0.98), "weight_decay": (1, 0.0, 0.001),
    "warmup_epochs": (1, 0.0, 5.0), "warmup_momentum": (1, 0.0, 0.95), "warmup_bias_lr": (1, 0.0, 0.2),
    "box": (1, 0.02, 0.2), "cls": (1, 0.2, 4.0), "cls_pw": (1, 0.5, 2.0), "obj": (1, 0.2, 4.0),
    "obj_pw": (1, 0.5, 2.0), "iou_t": (0, 0.1, 0.7), "anchor_t": (1, 2.0, 8.0), "anchors": (2, 2.0, 10.0),
    "fl_gamma": (0, 0.0, 2.0), "hsv_h": (1, 0.0, 0.1), "hsv_s": (1, 0.0, 0.9), "hsv_v": (1, 0.0, 0.9),
    "degrees": (1, 0.0, 45.0), "translate": (1, 0.0, 0.9), "scale": (1, 0.0, 0.9), "shear": (1, 0.0, 10.0),
    "perspective": (0, 0.0, 0.001), "flipud": (1, 0.0, 1.0), "fliplr": (0, 0.0, 1.0), "mosaic": (1, 0.0, 1.0),
    "mixup": (1, 0.0, 1.0), "copy_paste": (0, 0.0, 0.0)}
TOP = 5  # parents are drawn from the best TOP generations
MUTATE_P, SIGMA = 0.8, 0.2  # each gene mutates with probability MUTATE_P, by a factor ~ 1 + N(0, SIGMA)


def read_history(file: Path, keys: list[str]) -> np.ndarray:
    """Rows of [7 metrics, hyperparameters in `keys` order] from evolve.csv (empty if none)."""
    if not file.exists():
        return np.zeros((0, len(METRICS) + len(keys)))
    with open(file, newline="") as f:
        rows = list(csv.reader(f))
    header = [h.strip() for h in rows[0]]
    if header != [*METRICS, *keys]:
        raise UserError(f"{file}: its columns are not this --hyp yaml's keys; give the search another --name")
    return np.array([[float(x) for x in r] for r in rows[1:] if r], dtype=np.float64).reshape(-1, len(header))


def mutate(hyp: dict, history: np.ndarray, keys: list[str], rng: np.random.Generator) -> dict:
    """New hyperparameters: a fitness-weighted draw among the best generations, each gene scaled by a random factor
    (at least one changes), then clipped to SEARCH_SPACE's limits."""
    if not len(history):
        return dict(hyp)
    fit = fitness(history)
    best = np.argsort(-fit)[:TOP]
    w = fit[best] - fit[best].min() + 1e-6
    parent = history[rng.choice(best, p=w / w.sum()), len(METRICS):]
    gains = np.array([SEARCH_SPACE.get(k, (0, 0, 0))[0] for k in keys], dtype=np.float64)
    if not gains.any():
        raise UserError("--evolve: no hyperparameter of the --hyp yaml can be mutated")
    factor = np.ones(len(keys))
    while (factor == 1).all():  # mutate until something changes
        factor = (gains * (rng.random(len(keys)) < MUTATE_P) * rng.standard_normal(len(keys)) * rng.random() * SIGMA
                  + 1).clip(0.3, 3.0)
    out = dict(hyp)
    for k, v, f in zip(keys, parent, factor):
        lo, hi = SEARCH_SPACE[k][1:] if k in SEARCH_SPACE else (-np.inf, np.inf)
        out[k] = round(float(np.clip(v * f, lo, hi)), 5)
    return out


def append_result(file: Path, keys: list[str], metrics, hyp: dict):
    new = not file.exists()
    with open(file, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow([*METRICS, *keys])
        w.writerow([f"{float(x):.5g}" for x in metrics] + [f"{float(hyp[k]):.5g}" for k in keys])


def evolve(opt, device, train_fn, base_hyp: dict):
    """Run opt.evolve generations of train_fn(hyp, opt, device) in opt.save_dir; returns (best hyperparameters,
    their metrics: P, R, mAP50, mAP50-95 and the three validation losses)."""
    save_dir = Path(opt.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    keys = [k for k, v in base_hyp.items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    file = save_dir / "evolve.csv"
    rng = np.random.default_rng(opt.seed)
    history = read_history(file, keys)
    done = len(history)
    for g in range(done, done + opt.evolve):
        hyp = mutate(base_hyp, history, keys, rng)
        LOGGER.info(colorstr("evolve: ") + f"generation {g + 1} ({g + 1 - done}/{opt.evolve} of this run)")
        results = train_fn(dict(hyp), opt, device)
        append_result(file, keys, results, hyp)
        history = read_history(file, keys)
    best = history[int(np.argmax(fitness(history)))]
    best_hyp = {**base_hyp, **{k: float(v) for k, v in zip(keys, best[len(METRICS):])}}
    yaml_save(save_dir / "hyp_evolve.yaml", best_hyp)
    plot_evolve(history, keys, save_dir / "evolve.png")
    LOGGER.info(colorstr("evolve: ") + f"{len(history)} generations, best fitness {fitness(best[None])[0]:.5f} "
                f"(mAP50 {best[2]:.4f}, mAP50-95 {best[3]:.4f}); train with them: --hyp {save_dir / 'hyp_evolve.yaml'}")
    return best_hyp, tuple(float(x) for x in best[:len(METRICS)])


def plot_evolve(history: np.ndarray, keys: list[str], file: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fit = fitness(history)
    best = int(np.argmax(fit))
    cols = 6
    rows = (len(keys) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.4 * cols, 2.2 * rows), tight_layout=True)
    for ax, (i, k) in zip(np.ravel(axes), enumerate(keys)):
        v = history[:, len(METRICS) + i]
        ax.scatter(v, fit, c=fit, cmap="viridis", s=10, alpha=0.8)
        ax.plot(v[best], fit[best], "k+", markersize=12)
        ax.set_title(f"{k} = {v[best]:.3g}", fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in np.ravel(axes)[len(keys):]:
        ax.axis("off")
    fig.savefig(file, dpi=120)
    plt.close(fig)
