"""Per-layer QAT diagnosis: the prepared model's structure, the QAT flow diagram, an activation report and a
per-layer sensitivity analysis. Replaces the eleven hand-edited experiments of cshbli/yolov5_qat with measurements.

    python qat_report.py --task structure --cfg models/yolov5m.yaml --act relu --bn-folding --pow2-scale
    python qat_report.py --task flow
    python qat_report.py --task activations --weights W.pt --data shapes.yaml --img 256 --pow2-scale --notes
    python qat_report.py --task sensitivity --weights W.pt --data shapes.yaml --img 256 --layers 0 23 24

activations: the model is prepared as QAT would prepare it (--qat-recipe, --pow2-scale, --bn-folding) and calibrated
on --calib-batches training batches (observers on, fake quantization off). A second pass over the same batches with
everything off sees the same float activations the observers saw and measures, per activation quantizer: min, max,
the exact percentiles p(100-P) and pP (nearest rank: the k-th smallest and k-th largest value, k = ceil((1 - P/100) n)),
the scale and zero point chosen, and the share of values the int8 grid saturates (values more than half a step outside
[(quant_min - zp) * scale, (quant_max - zp) * scale], where the clamp changes the rounded value). A quantizer with one
scale per channel (the Detect outputs of the default recipe) is counted channel by channel; its row gives the coarsest
channel's scale and grid, the finest scale and the number of channels. Writes
activations.csv, hist/layer_NN.png and last_conv_act.png (the Detect convs, also to --notes).

sensitivity: for each model index i, post-training quantization (same calibration batches for every variant) with
  one          only model.i quantized (recipe: model -> float, i -> quantize, plus the recipe's own rules under i);
  all-but-one  the whole recipe with model.i left in float;
  kinds        the whole recipe calibrated once, then one kind of quantizer turned off at a time (fake quantization
               off, so those tensors stay float): the weights, every activation, the input image, the Conv blocks'
               conv outputs with their activation (a lookup table's input and output together), the skip-adds and
               concats, the Detect outputs (not with --layers);
evaluated by val.run on the val split (or its first --max-images images, listed in val_subset.txt) and ranked by
mAP50-95 lost vs the float model (one), or by mAP50-95 recovered vs all layers quantized (all-but-one, kinds). The
input QuantStub sits outside model.* and stays quantized in the per-layer variants. Writes sensitivity.csv,
sensitivity_summary.yaml.
"""
from __future__ import annotations

import argparse
import csv
import math
import re
import sys
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

FILE_ROOT = Path(__file__).resolve().parent
if str(FILE_ROOT) not in sys.path:
    sys.path.append(str(FILE_ROOT))

import numpy as np
import torch
import torch.nn as nn

import val
from bst.torch.ao.quantization import FakeQuantizeBase
from models.experimental import attempt_load
from models.quant import (
    QATConfig,
    calibrate,
    is_quantized,
    load_recipe,
    prepare_yolo_qat,
    quantizers,
    set_fake_quant,
    set_observers,
)
from models.yolo import (
    Detect,
    DetectionModel,
)
from utils.dataloaders import create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import (
    LOGGER,
    ROOT,
    UserError,
    check_file,
    check_img_size,
    colorstr,
    increment_path,
    run_cli,
    yaml_save,
)
from utils.torch_utils import select_device

TASKS = ("structure", "flow", "activations", "sensitivity")
MODES = ("one", "all-but-one", "both", "kinds")
KINDS = ("weights", "activation", "input", "conv/table", "add/concat", "Detect")  # see quantizer_kind
PREFIX = colorstr("qat_report: ")


# ---------------------------------------------------------------------------------------------- models

def load_float_model(weights, device="cpu"):
    """A float DetectionModel from a .pt checkpoint, unfused, float32, eval mode."""
    if not weights:
        raise UserError("--weights: a float .pt checkpoint is needed for this task, e.g. --weights yolov5n.pt")
    model = attempt_load(weights, device=device, fuse=False)
    if isinstance(model, nn.ModuleList):
        raise UserError(f"--weights {weights}: give one checkpoint, not an ensemble")
    if is_quantized(model):
        raise UserError(f"--weights {weights}: already a QAT/PTQ checkpoint; this report needs the float model it "
                        f"started from")
    return model.float().eval()


def prepared(model, config: QATConfig, recipe=None):
    """A QAT-prepared deep copy of a float model as `config` says, with `recipe` in place of its recipe when given
    (the original model is untouched)."""
    return prepare_yolo_qat(deepcopy(model).train(), config if recipe is None else replace(config, recipe=recipe))


def activation_quantizers(model):
    """(name, fake quantizer) of every activation quantizer (output quantizers and the input QuantStub)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, FakeQuantizeBase) and not n.endswith("weight_fake_quant")]


def layer_index(name: str):
    """'model.24.m.0.activation_post_process' -> 24; names outside model.model (the input stub) -> None."""
    m = re.match(r"model\.(\d+)(\.|$)", name)
    return int(m.group(1)) if m else None


def short_name(name: str) -> str:
    return name.replace(".activation_post_process", "") or name


def detect_index(model) -> int:
    for i, m in enumerate(model.model):
        if isinstance(m, Detect):
            return i
    raise UserError("model: no Detect layer found; the activation report expects a YOLOv5 detection model")


# ---------------------------------------------------------------------------------------------- structure

def write_structure(out, model_source: str, qmodel, command="python qat_report.py --task structure") -> Path:
    """print(qmodel) to `out`, after a short header saying what was prepared and how."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    qat = qmodel.qat_config
    recipe = qat.recipe.get("file", "default recipe")
    n_act = len(activation_quantizers(qmodel))
    n_all = len(quantizers(qmodel))
    header = (f"# QAT-prepared model: {model_source}\n"
              f"# prepare_yolo_qat(bn_folding={qat.bn_folding}, pow2={qat.pow2}, "
              f"pow2_rounding={qat.pow2_rounding!r}, "
              + (f"rounding={qat.rounding!r}, " if qat.rounding != "half_even" else "") + f"recipe={recipe!r})\n"
              f"# {n_all} fake quantizers: {n_all - n_act} weight (per channel), {n_act} activation (per tensor)\n"
              f"# generated by: {command}\n\n")
    out.write_text(header + str(qmodel) + "\n")
    return out


# ---------------------------------------------------------------------------------------------- flow diagram

FLOW_STEPS = (
    ("Float model", "yolov5*.pt, FP32; ReLU / ReLU6 for shift-only hardware (SiLU: a warning, quantized as a LUT)"),
    ("Fuse Conv + BN + act", "--bn-folding: ConvBnReLU2d, BN live with simulated folding\n"
                             "without: BN folded into the conv weights and bias first -> ConvReLU2d"),
    ("Prepare (per --qat-recipe)", "fake quantizers: per-channel int8 weights, per-tensor int8 activations\n"
                                   "FloatFunctional skip-adds and concats, QuantStub on the input, Detect 1x1 convs\n"
                                   "--pow2-scale: every scale is 2^k; recipe rules: float / weight-only / fixed / "
                                   "observer"),
    ("Calibrate", "observers on, fake-quant off, eval mode (BN statistics untouched)\n"
                  "--calib-batches training batches -> scales; the PTQ mAP is printed before epoch 0"),
    ("QAT training", "fake-quant on, straight-through gradients, hyp.qat.yaml (low LR)\n"
                     "from --freeze-bn-epoch: BN running statistics frozen\n"
                     "from --disable-observer-epoch: observers off, scales frozen"),
    ("Checkpoint", "last.pt / best.pt in float32: quantizer and BN-freeze state, flags, recipe\n"
                   "val.py / detect.py run it fake-quantized; --resume keeps the schedule"),
    ("Export / convert", "export.py --include onnx: QuantizeLinear / DequantizeLinear (opset >= 13)\n"
                         "convert: int8 weights, int32 bias, power-of-two scales = bit shifts"),
)


def draw_flow(out, steps=FLOW_STEPS) -> Path:
    """The QAT flow as boxes and arrows, with the BN / observer schedule beside the training step."""
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    n = len(steps)
    height, width = 1.35 * n + 0.9, 12.6
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.axis("off")
    ax.text(width / 2, height - 0.35, "YOLOv5 quantization-aware training (train.py --qat)", ha="center", va="center",
            fontsize=14, weight="bold")
    x0, w, h = 1.6, 7.3, 0.95
    colours = ("#e8eef7", "#e6f2e6", "#fdf1dc", "#fde4e4", "#efe6f7", "#e6f4f4", "#eeeeee")
    centres = []
    for i, (title, detail) in enumerate(steps):
        y = height - 0.9 - 1.35 * i - h
        ax.add_patch(FancyBboxPatch((x0, y), w, h, boxstyle="round,pad=0.03,rounding_size=0.12", linewidth=1.2,
                                    edgecolor="#333333", facecolor=colours[i % len(colours)]))
        ax.text(x0 + 0.15, y + h - 0.2, f"{i + 1}. {title}", ha="left", va="center", fontsize=11, weight="bold")
        ax.text(x0 + 0.15, y + h - 0.38, detail, ha="left", va="top", fontsize=8.3, linespacing=1.35)
        centres.append(y)
        if i:
            ax.add_patch(FancyArrowPatch((x0 + w / 2, centres[i - 1]), (x0 + w / 2, y + h), arrowstyle="-|>",
                                         mutation_scale=16, linewidth=1.4, color="#333333"))
    # PTQ shortcut: calibrate -> checkpoint, no training
    cal = [t for t, _ in steps].index("Calibrate")
    ckpt = [t for t, _ in steps].index("Checkpoint")
    ax.add_patch(FancyArrowPatch((x0, centres[cal] + h / 2), (x0, centres[ckpt] + h / 2), arrowstyle="-|>",
                                 connectionstyle="arc3,rad=0.5", mutation_scale=14, linewidth=1.2, linestyle="--",
                                 color="#b03030"))
    ax.text(x0 - 0.8, (centres[cal] + centres[ckpt] + h) / 2, "PTQ only:\nval.py --ptq\n--ptq-save", ha="right",
            va="center", fontsize=8, color="#b03030")
    # schedule beside the training box: epochs 0..E, BN and observers per the two epoch flags (example values)
    qat = [t for t, _ in steps].index("QAT training")
    sx, sw, y = 9.8, 2.5, centres[qat]
    epochs, freeze_bn, disable_obs = 10, 3, 5
    ax.text(sx, y + h - 0.05, f"schedule, e.g. --freeze-bn-epoch {freeze_bn}\n--disable-observer-epoch {disable_obs}",
            fontsize=7.2, va="bottom")
    for row, (label, switch, on, off) in enumerate((("BN stats", freeze_bn, "update", "frozen"),
                                                     ("observers", disable_obs, "on", "off"))):
        ry = y + h - 0.38 - row * 0.4
        ax.text(sx - 0.05, ry + 0.13, label, fontsize=7.5, ha="right", va="center")
        cut = sx + sw * switch / epochs
        ax.add_patch(Rectangle((sx, ry), cut - sx, 0.26, facecolor="#7fb77f", edgecolor="black", linewidth=0.6))
        ax.add_patch(Rectangle((cut, ry), sx + sw - cut, 0.26, facecolor="#c9c9c9", edgecolor="black", linewidth=0.6))
        ax.text((sx + cut) / 2, ry + 0.13, on, fontsize=7, ha="center", va="center")
        ax.text((cut + sx + sw) / 2, ry + 0.13, off, fontsize=7, ha="center", va="center")
    for e in range(0, epochs + 1, 5):
        ax.text(sx + sw * e / epochs, y - 0.02, str(e), fontsize=7, ha="center", va="top")
    ax.text(sx + sw / 2, y - 0.2, "epoch (N = 0: from the start; -1: never)", fontsize=7, ha="center", va="top")
    fig.savefig(out, dpi=100)
    return out


# ---------------------------------------------------------------------------------------------- data

def calibration_batches(data, imgsz, batch_size, stride, n_batches, workers=8, seed=0):
    """The first `n_batches` shuffled training batches (no augmentation) as [(uint8 images,)], kept in memory so
    that every variant is calibrated on the same images (the shape models.quant.calibrate iterates)."""
    loader = create_dataloader(data["train"], imgsz, batch_size, stride, augment=False, rect=False, workers=workers,
                               shuffle=True, seed=seed, prefix=colorstr("calib: "))[0]
    batches = []
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        batches.append((batch[0],))
    return batches


def val_dataloader(data, imgsz, batch_size, stride, save_dir, max_images=0, workers=8):
    """val.py's loader (rect batches, pad 0.5) over the val split, or its first `max_images` images (listed in
    save_dir/val_subset.txt)."""
    path = data["val"]
    if max_images:
        dataset = create_dataloader(path, imgsz, batch_size, stride, rect=False, workers=0,  # file order
                                    prefix=colorstr("val: "))[1]
        path = Path(save_dir) / "val_subset.txt"
        path.write_text("".join(f"{f}\n" for f in dataset.im_files[:max_images]))
    return create_dataloader(str(path), imgsz, batch_size, stride, pad=0.5, rect=True, workers=workers,
                             prefix=colorstr("val: "))[0]


# ---------------------------------------------------------------------------------------------- activations

class _RangePass:
    """Pass 1 (the calibration pass): element count, min, max and first-call order of each quantizer's input, over the
    calls that observe (the traced forward with which calibration ends sees no data)."""

    def __init__(self, named):
        self.stats = {}
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in named]

    def _hook(self, name):
        def hook(module, inputs):
            if not bool(module.observer_enabled[0]):
                return
            x = inputs[0].detach().float().flatten()
            lo, hi = (float(v) for v in torch.aminmax(x)) if x.numel() else (math.nan, math.nan)
            dirty = not (math.isfinite(lo) and math.isfinite(hi))  # NaN propagates into min/max; inf shows there
            if dirty:
                x = x[torch.isfinite(x)]
                if not x.numel():
                    return
                lo, hi = (float(v) for v in torch.aminmax(x))
            s = self.stats.setdefault(name, {"order": len(self.stats), "n": 0, "min": math.inf, "max": -math.inf,
                                             "dirty": False})
            s["n"] += x.numel()
            s["min"], s["max"] = min(s["min"], lo), max(s["max"], hi)
            s["dirty"] |= dirty
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


class _DetailPass:
    """Pass 2 (same inputs again): exact tail values for the percentiles, a histogram over [min, max] and the count
    of values outside the chosen grid's saturation thresholds."""

    def __init__(self, named, ranges, percentile, bins):
        self.ranges, self.bins, self.state = ranges, bins, {}
        for name, fq in named:
            if name not in ranges:
                continue
            r = ranges[name]
            scale, zp = fq.scale.detach().flatten().double().cpu(), fq.zero_point.detach().flatten().double().cpu()
            if scale.numel() == 1:
                scale, zp = float(scale), float(zp)
            else:  # one scale per channel (axis 1 of an activation): thresholds broadcast over (N, C, H, W)
                scale, zp = scale.reshape(1, -1, 1, 1), zp.reshape(1, -1, 1, 1)
            self.state[name] = {
                "k": max(1, min(r["n"], math.ceil((100.0 - percentile) / 100.0 * r["n"]))),
                "top": None, "bottom": None, "hist": torch.zeros(bins, dtype=torch.float64),
                "sat_lo": (fq.quant_min - zp - 0.5) * scale, "sat_hi": (fq.quant_max - zp + 0.5) * scale,
                "below": 0, "above": 0,
            }
        self.handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in named if n in self.state]

    def _hook(self, name):
        def hook(module, inputs):
            full = inputs[0].detach().float()
            x = full.flatten()
            s, r = self.state[name], self.ranges[name]
            if r["dirty"]:  # the observers skip non-finite values; so does the report
                x = x[torch.isfinite(x)]
                if not x.numel():
                    return
            s["top"] = _merge_extremes(s["top"], x, s["k"], largest=True)
            s["bottom"] = _merge_extremes(s["bottom"], x, s["k"], largest=False)
            lo, hi = r["min"], r["max"] if r["max"] > r["min"] else r["min"] + 1e-12
            s["hist"] += torch.histc(x, bins=self.bins, min=lo, max=hi).double().cpu()
            lo_t, hi_t = s["sat_lo"], s["sat_hi"]
            if isinstance(lo_t, torch.Tensor):  # per channel: compare each channel with its own thresholds
                x = full.double().cpu()
            if r["min"] < float(torch.as_tensor(lo_t).max()):  # no scan where nothing can saturate (ReLU outputs)
                s["below"] += int((x < lo_t).sum())
            if r["max"] > float(torch.as_tensor(hi_t).min()):
                s["above"] += int((x > hi_t).sum())
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _merge_extremes(kept, x, k, largest):
    """The k largest (or smallest) values of kept ∪ x, sorted from the extreme inwards (topk of the batch first: a
    small k over a large tensor is cheap; concatenating the whole batch is not)."""
    batch = torch.topk(x, min(k, x.numel()), largest=largest, sorted=False).values
    cand = batch if kept is None else torch.cat((kept, batch))
    return torch.topk(cand, min(k, cand.numel()), largest=largest, sorted=True).values


@torch.no_grad()
def activation_report(qmodel, batches, device, percentile=99.99, bins=256):
    """Calibrate a QAT-prepared (uncalibrated) model on `batches` and measure every activation quantizer.

    Returns (rows, hists): rows in first-call order, one dict per quantizer that saw data; hists maps its name to
    (counts, bin edges) over [min, max]. The model is left calibrated (fake quantization on, observers off)."""
    if not 50.0 < percentile < 100.0:
        raise UserError(f"--percentile {percentile}: must be between 50 and 100 (e.g. 99.99)")
    named = activation_quantizers(qmodel)
    if not named:
        raise UserError("model: no activation quantizers after prepare (does the recipe leave everything float?)")
    for name, fq in named:
        if fq.scale.numel() != 1:
            raise UserError(f"{name}: per-channel activation quantizer; the report handles per-tensor ones only")
    first = _RangePass(named)
    try:
        calibrate(qmodel, batches, len(batches), device)
    finally:
        first.remove()
    missing = [n for n, _ in named if n not in first.stats]
    if missing:
        LOGGER.warning(f"{PREFIX}WARNING: {len(missing)} quantizer(s) saw no data and are left out: {missing[:3]}")
    qmodel.eval()
    set_fake_quant(qmodel, False)
    set_observers(qmodel, False)
    second = _DetailPass(named, first.stats, percentile, bins)
    try:
        for batch in batches:
            qmodel(batch[0].to(device, non_blocking=True).float() / 255)
    finally:
        second.remove()
        set_fake_quant(qmodel, True)
    lo_name, hi_name = f"p{100.0 - percentile:.6g}", f"p{percentile:.6g}"
    rows, hists = [], {}
    for name, fq in sorted(((n, m) for n, m in named if n in first.stats), key=lambda t: first.stats[t[0]]["order"]):
        r, s = first.stats[name], second.state[name]
        scales = fq.scale.detach().flatten().float().cpu()
        # one scale per channel: the coarsest channel's scale and grid (zero point 0), and how many there are
        i_max = int(torch.argmax(scales))
        scale, zp = float(scales[i_max]), int(fq.zero_point.flatten()[i_max])
        idx = layer_index(name)
        obs = getattr(fq, "activation_post_process", None)
        rows.append({
            "layer": "input" if idx is None else idx,
            "name": short_name(name),
            "quantizer": type(fq).__name__,
            "observer": type(obs).__name__ if obs is not None else "",
            "n": r["n"],
            "min": r["min"],
            "max": r["max"],
            lo_name: float(s["bottom"][-1]),
            hi_name: float(s["top"][-1]),
            "scale": scale,
            "log2_scale": math.log2(scale),
            "channels": scales.numel(),
            "scale_min": float(scales.min()),
            "zero_point": zp,
            "quant_min": int(fq.quant_min),
            "quant_max": int(fq.quant_max),
            "range_lo": (fq.quant_min - zp) * scale,
            "range_hi": (fq.quant_max - zp) * scale,
            "clipped_low": s["below"] / r["n"],
            "clipped_high": s["above"] / r["n"],
            "clipped": (s["below"] + s["above"]) / r["n"],
        })
        hi = r["max"] if r["max"] > r["min"] else r["min"] + 1e-12
        hists[short_name(name)] = (s["hist"].numpy(), np.linspace(r["min"], hi, bins + 1))
    return rows, hists


def write_csv(rows, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _fmt_scale(scale):
    k = math.log2(scale)
    return f"2^{int(k)}" if k == int(k) else f"{scale:.4g}"


def _scales(row):
    if row.get("channels", 1) == 1:
        return _fmt_scale(row["scale"])
    return f"{_fmt_scale(row['scale_min'])}..{_fmt_scale(row['scale'])}"


def print_activation_table(rows):
    pcols = [k for k in rows[0] if k.startswith("p") and k[1:2].isdigit()]
    head = f"{'layer':>5} {'quantizer':<28} {'min':>9} {'max':>9} " + " ".join(f"{c:>9}" for c in pcols) + \
           f" {'scale':>9} {'zp':>4} {'range':>19} {'clipped':>8}"
    LOGGER.info(head)
    for r in rows:
        LOGGER.info(f"{str(r['layer']):>5} {r['name'][-28:]:<28} {r['min']:9.3g} {r['max']:9.3g} " +
                    " ".join(f"{r[c]:9.3g}" for c in pcols) +
                    f" {_scales(r):>9} {r['zero_point']:4d} "
                    f"{'[' + format(r['range_lo'], '.3g') + ', ' + format(r['range_hi'], '.3g') + ']':>19} "
                    f"{100 * r['clipped']:7.3f}%")


def _draw_histogram(ax, row, hist, title=None):
    from matplotlib.ticker import LogLocator, MaxNLocator, NullLocator

    counts, edges = hist
    pcols = [k for k in row if k.startswith("p") and k[1:2].isdigit()]
    ax.stairs(np.maximum(counts, 0.5), edges, fill=True, color="#4a78b5", alpha=0.85, baseline=0.5)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(numticks=4))  # few ticks, no minor ones: drawing ticks dominates the time
    ax.yaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_locator(MaxNLocator(6))
    ax.axvspan(row["range_lo"], row["range_hi"], color="#2ca02c", alpha=0.12, label="int8 range")
    for x in (row["range_lo"], row["range_hi"]):
        ax.axvline(x, color="#2ca02c", linewidth=1.2)
    for j, c in enumerate(pcols):
        ax.axvline(row[c], color="#d62728", linestyle=":", linewidth=1.0, label=" / ".join(pcols) if j == 0 else None)
    lo = min(edges[0], row["range_lo"])
    hi = max(edges[-1], row["range_hi"])
    pad = 0.03 * (hi - lo or 1.0)
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_title(title or row["name"], fontsize=8)
    ax.tick_params(labelsize=6)
    ax.text(0.98, 0.95, f"scale {_scales(row)}, zp {row['zero_point']}\n"
                        f"clipped {100 * row['clipped']:.3g}%", transform=ax.transAxes, ha="right", va="top",
            fontsize=6.5, bbox={"facecolor": "white", "alpha": 0.8, "linewidth": 0})


def plot_histograms(rows, hists, folder) -> list:
    """One figure per model index (plus the input) with a histogram per activation quantizer."""
    from matplotlib.figure import Figure

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    groups = {}
    for r in rows:
        groups.setdefault(r["layer"], []).append(r)
    files = []
    for layer, group in groups.items():
        cols = min(4, len(group))
        nrows = math.ceil(len(group) / cols)
        height = 2.3 * nrows + 0.5
        fig = Figure(figsize=(3.2 * cols, height))  # fixed margins: constrained layout would triple the time
        fig.subplots_adjust(left=0.07 if cols > 1 else 0.2, right=0.98, bottom=0.3 / height, top=1 - 0.45 / height,
                            wspace=0.25, hspace=0.45)
        axes = fig.subplots(nrows, cols, squeeze=False).flatten()
        for ax, r in zip(axes, group):
            _draw_histogram(ax, r, hists[r["name"]])
        for ax in axes[len(group):]:
            ax.axis("off")
        fig.suptitle(f"activations of {'the input' if layer == 'input' else f'model.{layer}'} "
                     f"(green: int8 range, red: percentiles)", fontsize=9)
        f = folder / (f"layer_{layer:02d}.png" if isinstance(layer, int) else f"{layer}.png")
        fig.savefig(f, dpi=80)
        files.append(f)
    return files


def plot_last_conv(rows, hists, detect_idx, out, title="") -> Path:
    """The Detect convs' output histograms with the chosen quantization range (the seed's last-conv figure)."""
    from matplotlib.figure import Figure

    chosen = [r for r in rows if r["layer"] == detect_idx]
    if not chosen:
        raise UserError(f"model.{detect_idx} (Detect) has no activation quantizer under this recipe (is it float?); "
                        f"nothing to plot")
    fig = Figure(figsize=(4.2 * len(chosen), 3.4), layout="constrained")
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, r in zip(axes, chosen):
        _draw_histogram(ax, r, hists[r["name"]], title=f"{r['name']} output")
        ax.set_xlabel("value (logit)", fontsize=7)
    axes[0].set_ylabel("count (log)", fontsize=7)
    axes[0].legend(loc="upper left", fontsize=6.5)
    fig.suptitle(title or "Detect 1x1 conv outputs", fontsize=9)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


# ---------------------------------------------------------------------------------------------- sensitivity

def quantizers_per_layer(qmodel) -> dict:
    """{model index: number of fake quantizers under it} for the indices that have any."""
    counts = {}
    for n, _ in quantizers(qmodel):
        i = layer_index(n)
        if i is not None:
            counts[i] = counts.get(i, 0) + 1
    return counts


def layer_recipe(base: dict, index: int, mode: str) -> dict:
    """The recipe of one sensitivity variant, from the (loaded) base recipe.

    one: everything under model float, model.<index> quantized, then the base rules whose match is that index or a
    name under model.<index> (so a fixed scale or exclusion the recipe gives that layer still applies).
    all-but-one: the base recipe plus model.<index> -> float."""
    r = deepcopy(base)
    r["file"] = f"{base.get('file', 'default recipe')} [{mode}: model.{index}]"
    if mode == "all-but-one":
        r["rules"] = list(r["rules"]) + [{"match": str(index), "mode": "float"}]
        return r
    prefix = f"model.{index}"
    own = [rule for rule in base["rules"] if str(rule["match"]) in (str(index), prefix)
           or str(rule["match"]).startswith(prefix + ".")]
    r["rules"] = [{"match": "model", "mode": "float"}, {"match": str(index), "mode": "quantize"}] + own
    return r


def quantizer_kind(name: str, detect: int) -> str:
    """Which kind of KINDS (besides "activation", every one but the weights) the fake quantizer `name` belongs to."""
    if name.endswith("weight_fake_quant"):
        return "weights"
    if layer_index(name) is None:
        return "input"
    if layer_index(name) == detect:
        return "Detect"
    if re.search(r"\.(qadd|qcat)\.", name):
        return "add/concat"
    return "conv/table"


def kind_sensitivity(float_model, data, batches, loader, device, config: QATConfig, save_dir):
    """Rows (ranked by mAP50-95 recovered) of the whole recipe with one kind of quantizer off at a time, and the
    reference mAPs. One calibration serves every row: turning fake quantizers off changes no other quantizer."""
    ref = {"float": _evaluate(deepcopy(float_model), data, loader, save_dir)}
    q, ref["all_quantized"] = _all_quantized(float_model, config, load_recipe(config.recipe), data, batches, loader,
                                             device, save_dir)
    detect = detect_index(float_model)
    rows = []
    for kind in KINDS:
        variant = deepcopy(q)
        found = [m for n, m in quantizers(variant)
                 if (kind == "activation" and not n.endswith("weight_fake_quant")) or quantizer_kind(n, detect) == kind]
        if not found:
            continue
        LOGGER.info(f"{PREFIX}kinds: {kind} in float ({len(found)} quantizers off)")
        for m in found:
            m.disable_fake_quant()
        map50, map_ = _evaluate(variant, data, loader, save_dir)
        rows.append({"rank": 0, "mode": "kinds", "layer": "", "module": kind, "quantizers": len(found),
                     "mAP50": map50, "mAP50-95": map_, "drop_vs_float": ref["float"][1] - map_,
                     "recovered_vs_all": map_ - ref["all_quantized"][1]})
    rows.sort(key=lambda r: -r["recovered_vs_all"])
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank
    return rows, ref


def _all_quantized(float_model, config, recipe, data, batches, loader, device, save_dir):
    """The float model prepared with the whole `recipe` and calibrated, in eval mode, and its (mAP50, mAP50-95)."""
    LOGGER.info(f"{PREFIX}all layers quantized ({recipe.get('file', 'default recipe')})")
    q = prepared(float_model, config, recipe).to(device)
    calibrate(q, batches, len(batches), device)
    return q.eval(), _evaluate(q, data, loader, save_dir)


def _evaluate(model, data, loader, save_dir):
    results = val.run(data=data, model=model, dataloader=loader, half=False, plots=False, save_dir=save_dir,
                      conf_thres=0.001, iou_thres=0.6)[0]
    return float(results[2]), float(results[3])


def sensitivity(float_model, data, batches, loader, device, layers, modes, config: QATConfig, save_dir,
                layer_quantizers=None):
    """Rows of (rank, mode, layer, ...) ranked per mode; and the reference mAPs (float, all quantized).
    `layer_quantizers`: {index: fake quantizers it holds when quantized}, for the table."""
    base = load_recipe(config.recipe)
    LOGGER.info(f"{PREFIX}float model")
    ref = {"float": _evaluate(deepcopy(float_model), data, loader, save_dir)}
    if "all-but-one" in modes:
        _, ref["all_quantized"] = _all_quantized(float_model, config, base, data, batches, loader, device, save_dir)
    rows = []
    for mode in modes:
        mode_rows = []
        for i in layers:
            rec = layer_recipe(base, i, mode)
            LOGGER.info(f"{PREFIX}{mode}: model.{i} ({type(float_model.model[i]).__name__})")
            q = prepared(float_model, config, rec).to(device)
            calibrate(q, batches, len(batches), device)
            map50, map_ = _evaluate(q.eval(), data, loader, save_dir)
            row = {"rank": 0, "mode": mode, "layer": i, "module": type(float_model.model[i]).__name__,
                   "quantizers": (layer_quantizers or {}).get(i, ""), "mAP50": map50, "mAP50-95": map_,
                   "drop_vs_float": ref["float"][1] - map_,
                   "recovered_vs_all": map_ - ref["all_quantized"][1] if mode == "all-but-one" else ""}
            mode_rows.append(row)
        key = (lambda r: -r["drop_vs_float"]) if mode == "one" else (lambda r: -r["recovered_vs_all"])
        mode_rows.sort(key=key)  # stable: ties keep model order
        for rank, row in enumerate(mode_rows, 1):
            row["rank"] = rank
        rows += mode_rows
    return rows, ref


def print_sensitivity_table(rows, ref):
    LOGGER.info(f"float model: mAP50 {ref['float'][0]:.4f}  mAP50-95 {ref['float'][1]:.4f}" +
                (f"; all quantized: mAP50 {ref['all_quantized'][0]:.4f}  mAP50-95 {ref['all_quantized'][1]:.4f}"
                 if "all_quantized" in ref else ""))
    LOGGER.info(f"{'rank':>4} {'mode':>11} {'layer':>5} {'module':<10} {'quant':>5} {'mAP50':>8} {'mAP50-95':>9} "
                f"{'drop':>8} {'recovered':>9}")
    for r in rows:
        rec = f"{r['recovered_vs_all']:9.4f}" if r["recovered_vs_all"] != "" else f"{'':>9}"
        LOGGER.info(f"{r['rank']:>4} {r['mode']:>11} {r['layer']:>5} {r['module']:<10} {r['quantizers']:>5} "
                    f"{r['mAP50']:8.4f} {r['mAP50-95']:9.4f} {r['drop_vs_float']:8.4f} {rec}")


# ---------------------------------------------------------------------------------------------- CLI

def parse_opt(argv=None):
    p = argparse.ArgumentParser(description="Per-layer QAT diagnosis (see the module docstring)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--task", default="", help=f"one of {', '.join(TASKS)}")
    p.add_argument("--weights", type=str, default="", help="float .pt checkpoint (activations, sensitivity; "
                   "structure: instead of --cfg)")
    p.add_argument("--data", type=str, default="data/shapes.yaml", help="dataset yaml")
    p.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (calibration and validation)")
    p.add_argument("--calib-batches", type=int, default=32, help="training batches for calibration (as train.py)")
    p.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    p.add_argument("--workers", type=int, default=8, help="max dataloader workers")
    q = p.add_argument_group("quantization (as train.py --qat)")
    QATConfig.add_arguments(q)
    s = p.add_argument_group("structure")
    s.add_argument("--cfg", type=str, default="models/yolov5m.yaml", help="model yaml when no --weights is given")
    s.add_argument("--act", type=str, default="relu", help="activation for --cfg (relu, relu6, silu, ...)")
    s.add_argument("--nc", type=int, default=80, help="classes for --cfg")
    a = p.add_argument_group("activations")
    a.add_argument("--percentile", type=float, default=99.99, help="report p(100-P) and pP of every activation")
    a.add_argument("--bins", type=int, default=256, help="histogram bins")
    a.add_argument("--notes", nargs="?", const=str(ROOT / "notes"), default=None,
                   help="also write last_conv_act.png (the Detect convs' histograms) to this folder; bare --notes: "
                   "the repository's notes/")
    v = p.add_argument_group("sensitivity")
    v.add_argument("--mode", default="one", help=f"{' | '.join(MODES)}")
    v.add_argument("--layers", type=int, nargs="+", default=None, help="model indices to test; none given: every "
                   "index that has quantizers")
    v.add_argument("--max-images", type=int, default=0, help="evaluate on the first N val images (0: all)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=str, default="", help="output file (structure, flow) or folder (activations, "
                   "sensitivity); default notes/torch_qat_model.txt, notes/pytorch_qat_flow.png, "
                   "runs/qat_report/exp*")
    o.add_argument("--project", default=str(ROOT / "runs/qat_report"), help="save to project/name")
    o.add_argument("--name", default="exp", help="save to project/name")
    o.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    return p.parse_args(argv)


def _check_opt(opt):
    if opt.task not in TASKS:
        raise UserError(f"--task {opt.task!r}: choose one of {', '.join(TASKS)}")
    for name, v in (("--imgsz", opt.imgsz), ("--batch-size", opt.batch_size), ("--calib-batches", opt.calib_batches),
                    ("--bins", opt.bins)):
        if v < 1:
            raise UserError(f"{name} {v}: must be a positive integer")
    if opt.max_images < 0:
        raise UserError(f"--max-images {opt.max_images}: must be >= 0 (0: every val image)")
    if opt.mode not in MODES:
        raise UserError(f"--mode {opt.mode!r}: choose one of {', '.join(MODES)}")
    if opt.mode == "kinds" and opt.layers:
        raise UserError(f"--layers {' '.join(map(str, opt.layers))}: --mode kinds turns kinds of quantizers off "
                        "across every layer; drop --layers, or use --mode one / all-but-one for single layers")
    if opt.task in ("activations", "sensitivity") and not opt.weights:
        raise UserError(f"--task {opt.task}: needs --weights, a float .pt checkpoint")


def _run_dir(opt):
    d = Path(opt.out) if opt.out else increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok)
    d.mkdir(parents=True, exist_ok=True)
    return d


def _data_and_model(opt):
    device = select_device(opt.device, batch_size=opt.batch_size)
    model = load_float_model(opt.weights, device)
    data = check_dataset(check_file(opt.data))
    stride = int(model.stride.max())
    imgsz = check_img_size(opt.imgsz, s=stride)
    return device, model, data, stride, imgsz


def _structure_command(opt, out):
    """The command line that writes this structure file (for its header)."""
    what = [f"--weights {opt.weights}"] if opt.weights else [f"--cfg {opt.cfg}", f"--act {opt.act}", f"--nc {opt.nc}"]
    config = QATConfig.from_options(opt)
    flags = [f for f in config.flags_given() if not f.startswith("--qat-recipe") and
             not (f.startswith("--pow2-rounding") and not config.pow2)]
    flags += [f"--qat-recipe {opt.qat_recipe}"] if opt.qat_recipe else []
    try:
        out = Path(out).resolve().relative_to(ROOT)
    except ValueError:
        pass
    return " ".join(["python qat_report.py --task structure", *what, *flags, f"--out {out}"])


def main(opt):
    _check_opt(opt)
    config = QATConfig.from_options(opt)
    if opt.task == "structure":
        if opt.weights:
            model, source = load_float_model(opt.weights), str(opt.weights)
        else:
            model = DetectionModel(check_file(opt.cfg, search_dirs=("models",)), nc=opt.nc, act=opt.act)
            source = f"{Path(opt.cfg).name}, act={opt.act}, nc={opt.nc}"
        qmodel = prepared(model, config)
        out = Path(opt.out or ROOT / "notes/torch_qat_model.txt")
        write_structure(out, source, qmodel, _structure_command(opt, out))
        LOGGER.info(f"{PREFIX}structure written to {out}")
        return out

    if opt.task == "flow":
        out = draw_flow(opt.out or ROOT / "notes/pytorch_qat_flow.png")
        LOGGER.info(f"{PREFIX}flow diagram written to {out}")
        return out

    device, model, data, stride, imgsz = _data_and_model(opt)
    if opt.task == "activations":
        qmodel = prepared(model, config).to(device)
        save_dir = _run_dir(opt)
        batches = calibration_batches(data, imgsz, opt.batch_size, stride, opt.calib_batches, opt.workers)
        rows, hists = activation_report(qmodel, batches, device, opt.percentile, opt.bins)
        print_activation_table(rows)
        csv_file = write_csv(rows, save_dir / "activations.csv")
        plot_histograms(rows, hists, save_dir / "hist")
        d = detect_index(model)
        rec = qmodel.qat_config.recipe.get("file", "default recipe")
        title = (f"{Path(opt.weights).name}: Detect (model.{d}) conv outputs, {rec}, "
                 f"{'pow2 ' + config.pow2_rounding if config.pow2 else 'linear'} scales, "
                 f"{sum(len(b[0]) for b in batches)} calibration images at {imgsz}px")
        plot_last_conv(rows, hists, d, save_dir / "last_conv_act.png", title)
        if opt.notes:
            f = plot_last_conv(rows, hists, d, Path(opt.notes) / "last_conv_act.png", title)
            LOGGER.info(f"{PREFIX}{f} written")
        LOGGER.info(f"{PREFIX}{len(rows)} activation quantizers; table {csv_file}, histograms {save_dir / 'hist'}")
        return csv_file

    # sensitivity

    layers, everything = (None, None) if opt.mode == "kinds" else _sensitivity_layers(model, config, opt.layers)
    save_dir = _run_dir(opt)
    batches = calibration_batches(data, imgsz, opt.batch_size, stride, opt.calib_batches, opt.workers)
    loader = val_dataloader(data, imgsz, opt.batch_size, stride, save_dir, opt.max_images, opt.workers)
    if opt.mode == "kinds":
        rows, ref = kind_sensitivity(model, data, batches, loader, device, config, save_dir)
    else:
        modes = ("one", "all-but-one") if opt.mode == "both" else (opt.mode,)
        rows, ref = sensitivity(model, data, batches, loader, device, layers, modes, config, save_dir, everything)
    return _write_sensitivity(rows, ref, opt, config, save_dir, imgsz, batches, loader)


def _sensitivity_layers(model, config, wanted):
    """(model indices to test, {index: fake quantizers under it}) for --layers `wanted` (none: every index that has
    quantizers); indices with nothing to quantize are skipped with a warning, bad ones are a UserError."""
    n_layers = len(model.model)
    if wanted:
        bad = [i for i in wanted if not 0 <= i < n_layers]
        if bad:
            raise UserError(f"--layers {bad}: model indices are 0-{n_layers - 1}")
    everything = quantizers_per_layer(prepared(model, config, {**load_recipe(config.recipe), "rules": []}))
    layers = list(dict.fromkeys(wanted)) if wanted else sorted(everything)
    skipped = [i for i in layers if i not in everything]
    if skipped:
        LOGGER.warning(f"{PREFIX}WARNING: model indices {skipped} have nothing to quantize "
                       f"({', '.join(type(model.model[i]).__name__ for i in skipped)}); skipped")
    layers = [i for i in layers if i in everything]
    if not layers:
        raise UserError(f"--layers {wanted}: none of them has anything to quantize")
    return layers, everything


def _write_sensitivity(rows, ref, opt, config, save_dir, imgsz, batches, loader):
    print_sensitivity_table(rows, ref)
    csv_file = write_csv(rows, save_dir / "sensitivity.csv")
    yaml_save(save_dir / "sensitivity_summary.yaml", {
        "weights": str(opt.weights), "data": str(opt.data), "imgsz": imgsz, "recipe": opt.qat_recipe or "default",
        "pow2": config.pow2, "bn_folding": config.bn_folding, "calib_images": sum(len(b[0]) for b in batches),
        "val_images": len(loader.dataset), "float_mAP50-95": ref["float"][1], "float_mAP50": ref["float"][0],
        **({"all_quantized_mAP50-95": ref["all_quantized"][1], "all_quantized_mAP50": ref["all_quantized"][0]}
           if "all_quantized" in ref else {})})
    LOGGER.info(f"{PREFIX}ranking written to {csv_file}")
    return csv_file


if __name__ == "__main__":
    run_cli(main, parse_opt())
