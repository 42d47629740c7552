"""Drawing and plotting: box annotation, crops, batch mosaics, label statistics, training curves, feature maps.

Figures are built with matplotlib's object API (`matplotlib.figure.Figure`), which renders with Agg and never
opens a window or touches pyplot's global state, so plotting from a background thread or a headless machine is safe.
"""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image, ImageDraw, ImageFont

from utils.general import LOGGER, UserError, clip_boxes, increment_path, shown, xywh2xyxy, xyxy2xywh

# Upstream's 20-colour palette, as hex RGB.
_PALETTE_HEX = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
                "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")


class Colors:
    """Class index -> colour from a fixed palette (cycled); RGB tuples, BGR with bgr=True (for cv2)."""

    def __init__(self):
        self.palette = [tuple(int(h[k:k + 2], 16) for k in (0, 2, 4)) for h in _PALETTE_HEX]
        self.n = len(self.palette)

    def __call__(self, i, bgr=False):
        c = self.palette[int(i) % self.n]
        return c[::-1] if bgr else c


colors = Colors()


def _is_ascii(s):
    return all(ord(ch) < 128 for ch in str(s))


class Annotator:
    """Draw boxes, labels and text on an image.

    im: HxWx3 uint8 numpy array (drawn with cv2, colours in the image's own channel order) or a PIL image.
    pil=True (forced for a PIL image or a non-ASCII `example` text such as class names, which cv2 cannot render)
    draws with PIL using Pillow's built-in scalable font, so nothing is downloaded. result() returns a numpy array.
    """

    def __init__(self, im, line_width=None, font_size=None, pil=False, example="abc"):
        self.pil = pil or isinstance(im, Image.Image) or not _is_ascii(example)
        if self.pil:
            self.im = im if isinstance(im, Image.Image) else Image.fromarray(np.ascontiguousarray(im))
            self.draw = ImageDraw.Draw(self.im)
            size = font_size or max(round(sum(self.im.size) / 2 * 0.035), 12)
            try:
                self.font = ImageFont.load_default(size=size)
            except (TypeError, ValueError, ImportError, OSError):  # Pillow without FreeType: fixed bitmap font
                self.font = ImageFont.load_default()
            w, h = self.im.size
        else:
            if not isinstance(im, np.ndarray) or im.ndim != 3:
                raise ValueError(f"im: expected an HxWxC numpy array or a PIL image, got {type(im).__name__}")
            self.im = np.ascontiguousarray(im)
            h, w = self.im.shape[:2]
        self.lw = line_width or max(round((h + w) / 2 * 0.003), 2)

    def _text_size(self, text):
        """(width, height) of text in the current font."""
        if self.pil:
            left, top, right, bottom = self.font.getbbox(text)
            return right - left, bottom
        tf = max(self.lw - 1, 1)
        (w, h), _ = cv2.getTextSize(text, 0, fontScale=self.lw / 3, thickness=tf)
        return w, h

    def box_label(self, box, label="", color=(128, 128, 128), txt_color=(255, 255, 255)):
        """Outline box (x1, y1, x2, y2); put label on a filled tab above it (inside it when there is no room)."""
        x1, y1, x2, y2 = (float(v) for v in box[:4])
        label = shown(label) if label else label  # a name that is not UTF-8 would crash OpenCV's text functions
        if self.pil:
            self.draw.rectangle((x1, y1, x2, y2), width=self.lw, outline=tuple(color))
            if label:
                w, h = self._text_size(label)
                above = y1 - h >= 0
                top = y1 - h if above else y1
                self.draw.rectangle((x1, top, x1 + w + 1, top + h + 1), fill=tuple(color))
                self.draw.text((x1, top), label, fill=tuple(txt_color), font=self.font)
            return
        p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
        cv2.rectangle(self.im, p1, p2, color, thickness=self.lw, lineType=cv2.LINE_AA)
        if label:
            tf = max(self.lw - 1, 1)
            w, h = self._text_size(label)
            above = p1[1] - h >= 3
            tab_end = (p1[0] + w, p1[1] - h - 3 if above else p1[1] + h + 3)
            cv2.rectangle(self.im, p1, tab_end, color, -1, cv2.LINE_AA)
            baseline_y = p1[1] - 2 if above else p1[1] + h + 2
            cv2.putText(self.im, label, (p1[0], baseline_y), 0, self.lw / 3, txt_color, thickness=tf,
                        lineType=cv2.LINE_AA)

    def rectangle(self, xy, fill=None, outline=None, width=1):
        """Rectangle xy = (x1, y1, x2, y2), optionally filled and/or outlined."""
        x1, y1, x2, y2 = (int(round(float(v))) for v in xy)
        if self.pil:
            self.draw.rectangle((x1, y1, x2, y2), fill=None if fill is None else tuple(fill),
                                outline=None if outline is None else tuple(outline), width=width)
            return
        if fill is not None:
            cv2.rectangle(self.im, (x1, y1), (x2, y2), tuple(fill), -1)
        if outline is not None:
            cv2.rectangle(self.im, (x1, y1), (x2, y2), tuple(outline), width)

    def text(self, xy, text, txt_color=(255, 255, 255), anchor="top"):
        """Write text with its top-left corner at xy (its bottom-left with anchor='bottom')."""
        x, y = float(xy[0]), float(xy[1])
        text = shown(text)  # file names that are not UTF-8, escaped
        w, h = self._text_size(text)
        if anchor == "bottom":
            y += 1 - h
        if self.pil:
            self.draw.text((x, y), text, fill=tuple(txt_color), font=self.font)
        else:
            tf = max(self.lw - 1, 1)
            cv2.putText(self.im, text, (int(x), int(y + h)), 0, self.lw / 3, tuple(txt_color), thickness=tf,
                        lineType=cv2.LINE_AA)

    def result(self):
        """The annotated image as a numpy array."""
        return np.asarray(self.im)


def save_one_box(xyxy, im, file=Path("im.jpg"), gain=1.02, pad=10, square=False, BGR=False, save=True):
    """Crop box xyxy (grown by gain and pad pixels, optionally squared) from BGR image im.

    Saves the crop as a .jpg at file, or at file2.jpg, file3.jpg ... when it exists (detect.py passes
    save_dir/crops/<class>/<image>.jpg). Returns the crop in BGR order when BGR=True, else RGB.
    """
    b = xyxy2xywh(torch.as_tensor(xyxy, dtype=torch.float32).view(-1, 4))
    if square:
        b[:, 2:] = b[:, 2:].max(1, keepdim=True).values
    b[:, 2:] = b[:, 2:] * gain + pad
    corners = clip_boxes(xywh2xyxy(b).long(), im.shape)[0].tolist()
    x1, y1, x2, y2 = (int(v) for v in corners)
    crop_bgr = im[y1:y2, x1:x2]
    if save:
        file = Path(file)
        file.parent.mkdir(parents=True, exist_ok=True)
        out = increment_path(file).with_suffix(".jpg")
        Image.fromarray(np.ascontiguousarray(crop_bgr[..., ::-1])).save(out, quality=95, subsampling=0)
    return crop_bgr if BGR else crop_bgr[..., ::-1]


def feature_visualization(x, module_type, stage, n=32, save_dir=Path("runs/detect/exp")):
    """Save the first n channels of feature map x (b, c, h, w) of one layer as a png grid, plus the map as .npy.

    Detect outputs and 1x1 maps are skipped. Returns the png path, or None when nothing was saved.
    """
    if "Detect" in module_type or x.ndim != 4:
        return None
    _, channels, height, width = x.shape
    if height <= 1 or width <= 1:
        return None
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    f = save_dir / f"stage{stage}_{module_type.split('.')[-1]}_features.png"
    maps = x[0].detach().float().cpu()
    n = min(n, channels)
    fig = Figure(figsize=(8, math.ceil(n / 8)), tight_layout=True)
    axes = fig.subplots(math.ceil(n / 8), 8, squeeze=False).ravel()
    for i, ax in enumerate(axes):
        if i < n:
            ax.imshow(maps[i].numpy())
        ax.axis("off")
    LOGGER.info(f"Saving {f}... ({n}/{channels})")
    fig.savefig(f, dpi=300, bbox_inches="tight")
    np.save(f.with_suffix(".npy"), maps.numpy())
    return f


def output_to_target(output, max_det=300):
    """NMS output (list of (n, 6) [xyxy, conf, cls] per image) -> (N, 7) array [image, cls, x, y, w, h, conf]."""
    rows = []
    for i, det in enumerate(output):
        det = det[:max_det, :6].detach().float().cpu()
        box, conf, cls = det[:, :4], det[:, 4:5], det[:, 5:6]
        index = torch.full_like(conf, i)
        rows.append(torch.cat((index, cls, xyxy2xywh(box), conf), 1))
    return torch.cat(rows, 0).numpy() if rows else np.zeros((0, 7), dtype=np.float32)


def _class_name(names, cls):
    """names[cls] for a list or dict of names, else the index itself."""
    try:
        return names[cls] if names is not None else cls
    except (KeyError, IndexError):
        return cls


def plot_images(images, targets, paths=None, fname="images.jpg", names=None, max_size=1920, max_subplots=16):
    """Save a mosaic of a batch with its boxes (train_batch*.jpg, val_batch*_labels.jpg / _pred.jpg).

    images: (b, 3, h, w) RGB, uint8 or float in [0, 1] or [0, 255]. targets: (n, 6) [image, cls, x, y, w, h] labels
    or (n, 7) with a trailing conf for predictions (only conf > 0.25 drawn); boxes normalised or in pixels of the
    batch images. names: class names (list or dict). Returns the saved path.
    """
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().float().numpy()
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    images = np.asarray(images, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2:
        targets = targets.reshape(-1, 6)
    bs, _, h, w = images.shape
    bs = min(bs, max_subplots)
    ns = math.ceil(bs ** 0.5)  # tiles per side
    if bs and images[0].max() <= 1:
        images = images * 255

    mosaic = np.full((ns * h, ns * w, 3), 255, dtype=np.uint8)
    for i in range(bs):
        x, y = w * (i // ns), h * (i % ns)  # tiles fill column by column
        mosaic[y:y + h, x:x + w] = images[i].transpose(1, 2, 0).clip(0, 255).astype(np.uint8)

    scale = max_size / ns / max(h, w)
    if scale < 1:
        h, w = math.ceil(scale * h), math.ceil(scale * w)
        mosaic = cv2.resize(mosaic, (w * ns, h * ns))

    fs = int((h + w) * ns * 0.01)  # font size
    if isinstance(names, dict):
        example = "".join(str(v) for v in names.values())
    else:
        example = "".join(str(v) for v in names) if names else "abc"
    annotator = Annotator(mosaic, line_width=max(round(fs / 10), 1), font_size=max(fs, 8), pil=True, example=example)
    for i in range(bs):
        x, y = w * (i // ns), h * (i % ns)
        annotator.rectangle([x, y, x + w, y + h], None, (255, 255, 255), width=2)
        if paths is not None and i < len(paths):
            annotator.text((x + 5, y + 5), Path(paths[i]).name[:40], txt_color=(220, 220, 220))
        if not len(targets):
            continue
        ti = targets[targets[:, 0] == i]
        if not len(ti):
            continue
        boxes = xywh2xyxy(ti[:, 2:6])
        is_labels = ti.shape[1] == 6
        if boxes.max() <= 1.01:  # normalised
            boxes[:, [0, 2]] *= w
            boxes[:, [1, 3]] *= h
        elif scale < 1:
            boxes *= scale
        boxes[:, [0, 2]] += x
        boxes[:, [1, 3]] += y
        for j, box in enumerate(boxes.tolist()):
            cls = int(ti[j, 1])
            if not is_labels and ti[j, 6] <= 0.25:
                continue
            name = _class_name(names, cls)
            label = f"{name}" if is_labels else f"{name} {ti[j, 6]:.1f}"
            annotator.box_label(box, label, color=colors(cls))
    fname = Path(fname)
    fname.parent.mkdir(parents=True, exist_ok=True)
    annotator.im.save(fname)
    return fname


def plot_labels(labels, names=(), save_dir=Path("")):
    """Save labels.jpg: instances per class, all boxes drawn centred, and 2-D histograms of box centres and sizes.

    labels: (n, 5) [cls, x, y, w, h] normalised. Returns the saved path.
    """
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.float64)
    labels = labels.reshape(-1, 5)
    cls, xywh = labels[:, 0].astype(int), labels[:, 1:5]
    nc = int(cls.max()) + 1 if len(cls) else max(len(names), 1)
    names = list(names.values()) if isinstance(names, dict) else list(names)
    LOGGER.info("Plotting labels to " + str(Path(save_dir) / "labels.jpg") + "... ")

    fig = Figure(figsize=(8, 8), tight_layout=True)
    ax = fig.subplots(2, 2).ravel()

    counts = np.bincount(cls, minlength=nc) if len(cls) else np.zeros(nc, dtype=int)
    ax[0].bar(range(len(counts)), counts, width=0.8, color=[tuple(v / 255 for v in colors(i)) for i in
                                                             range(len(counts))])
    ax[0].set_ylabel("instances")
    if 0 < len(names) < 30:
        ax[0].set_xticks(range(len(names)))
        ax[0].set_xticklabels(names, rotation=90, fontsize=10)
    else:
        ax[0].set_xlabel("classes")

    # every box (up to 1000) drawn with its centre at the middle of a canvas: the spread of shapes and sizes
    canvas = Image.new("RGB", (2000, 2000), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    centred = xywh.copy()
    centred[:, :2] = 0.5
    for c, box in zip(cls[:1000], (xywh2xyxy(centred[:1000]) * 2000).tolist()):
        draw.rectangle(box, width=1, outline=colors(c))
    ax[1].imshow(np.asarray(canvas))
    ax[1].axis("off")

    ax[2].hist2d(xywh[:, 0], xywh[:, 1], bins=50, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
    ax[2].set_xlabel("x")
    ax[2].set_ylabel("y")
    ax[3].hist2d(xywh[:, 2], xywh[:, 3], bins=50, range=[[0, 1], [0, 1]], cmap="Blues", cmin=1)
    ax[3].set_xlabel("width")
    ax[3].set_ylabel("height")
    for a in ax:
        for side in ("top", "right", "left", "bottom"):
            a.spines[side].set_visible(False)

    out = Path(save_dir) / "labels.jpg"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=200)
    return out


# results.csv columns drawn by plot_results, in grid order: top row train losses, P, R; bottom val losses, mAPs.
RESULTS_COLUMNS = ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
                   "val/box_loss", "val/obj_loss", "val/cls_loss", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95")


def plot_results(file="path/to/results.csv", dir=""):
    """Save results.png (2x5 grid of losses and metrics per epoch) next to the results*.csv files of a run.

    Columns are found by name (train.py pads them to 20 characters); a file or column that cannot be read is
    reported and skipped. Returns the saved path.
    """
    save_dir = Path(file).parent if file else Path(dir)
    files = sorted(save_dir.glob("results*.csv"))
    if not files:
        raise UserError(f"{save_dir.resolve()}: no results*.csv found, nothing to plot")
    fig = Figure(figsize=(12, 6), tight_layout=True)
    ax = fig.subplots(2, 5).ravel()
    for f in files:
        try:
            data = pd.read_csv(f, skipinitialspace=True)
        except Exception as e:  # a half-written or foreign csv must not stop training
            LOGGER.warning(f"WARNING: plotting error for {f}: {e}")
            continue
        data.columns = [str(c).strip() for c in data.columns]
        epochs = data["epoch"].to_numpy() if "epoch" in data else np.arange(len(data))
        for a, col in zip(ax, RESULTS_COLUMNS):
            a.set_title(col, fontsize=12)
            if col not in data:
                LOGGER.warning(f"WARNING: {f} has no column '{col}'")
                continue
            a.plot(epochs, pd.to_numeric(data[col], errors="coerce").to_numpy(dtype=float), marker=".",
                   label=f.stem, linewidth=2, markersize=8)
    ax[1].legend()
    out = save_dir / "results.png"
    fig.savefig(out, dpi=200)
    return out
