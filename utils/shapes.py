"""The embedded `shapes` detection dataset: generated deterministically, no downloads.

Ten classes drawn with OpenCV on textured backgrounds, chosen so that some pairs are easy to confuse:
filled vs outlined (circle / ring, square / square_outline), a square vs the same square turned by 45 degrees
(diamond), and polygons that differ by one corner (pentagon / hexagon). Objects range from about 6 px to half
the image, overlap (each keeps at least half of its pixels visible), may be cut by the image border, and sit among
distractor strokes (lines, open polylines, arcs) that are not objects. Image sizes vary from 256 to 384 px per side;
a few images hold no object at all.

Every image is rendered from its own random stream seeded by (seed, split, index), so the same arguments always
give the same files, and changing a split's count does not change the images both counts share.

Layout written under `out`:
    images/{train,val}/000001.jpg ...            (val image id in the COCO json = int(file stem))
    labels/{train,val}/000001.txt ...            YOLO rows: cls xc yc w h, normalised to [0, 1]
    annotations/instances_val.json               COCO format, category_id = class index + 1 (CATEGORY_IDS)

Each label box is the tight box of the object's drawn pixels (anti-aliased edge included), clipped to the image.

CLI: python utils/shapes.py --out datasets/shapes [--n-train 600 --n-val 150 --seed 0 --overwrite]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np

if __package__ in (None, ""):  # run as a script: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.general import LOGGER, UserError, run_cli

CLASS_NAMES = ("circle", "ring", "square", "square_outline", "diamond",
               "triangle", "pentagon", "hexagon", "star", "cross")
CATEGORY_IDS = tuple(range(1, len(CLASS_NAMES) + 1))  # COCO category id of class index i is i + 1
MIN_SIDE, MAX_SIDE = 256, 384  # image width and height are drawn from this range
MIN_OBJECT = 6.0  # px, smallest nominal object size; the largest is half the image's shorter side
BACKGROUND_PERIOD = 33  # one image in 33 (~3%) has no object
MAX_OBJECTS = 12
_SHIFT = 4  # fixed-point bits for sub-pixel polygon vertices in cv2.fillPoly
_CIRCLE_VERTICES = 72


# ----------------------------------------------------------------------------------------------------------------------
# Geometry of one object: an outer polygon and, for outlined classes, an inner polygon cut out of it.
# ----------------------------------------------------------------------------------------------------------------------

def _regular(n, radius, phase=0.0):
    a = phase + np.arange(n) * (2 * np.pi / n)
    return np.stack([np.cos(a), np.sin(a)], 1) * radius


def _star(r_outer, r_inner, phase):
    a = phase + np.arange(10) * (np.pi / 5)
    r = np.where(np.arange(10) % 2 == 0, r_outer, r_inner)
    return np.stack([np.cos(a) * r, np.sin(a) * r], 1)


def _cross(half, arm):
    """Plus sign with arms of half-length `half` and half-width `arm`."""
    h, a = half, arm
    return np.array([[-a, -h], [a, -h], [a, -a], [h, -a], [h, a], [a, a], [a, h], [-a, h], [-a, a], [-h, a],
                     [-h, -a], [-a, -a]], dtype=np.float64)


def _object_polygons(cls, size, rng):
    """Unit-free polygons (centred at 0) for class `cls` of nominal size `size` px: (outer, hole or None)."""
    name = CLASS_NAMES[cls]
    r = size / 2
    hole = None
    if name in ("circle", "ring"):
        outer = _regular(_CIRCLE_VERTICES, r)
        if name == "ring":
            hole = _regular(_CIRCLE_VERTICES, r * (1 - rng.uniform(0.15, 0.4)))
        angle = 0.0
    elif name in ("square", "square_outline", "diamond"):
        outer = np.array([[-r, -r], [r, -r], [r, r], [-r, r]]) * 0.9
        if name == "square_outline":
            hole = outer * (1 - rng.uniform(0.15, 0.4))
        angle = rng.uniform(-12, 12) + (45 if name == "diamond" else 0)
    elif name == "triangle":
        outer, angle = _regular(3, r, -np.pi / 2), rng.uniform(0, 360)
    elif name == "pentagon":
        outer, angle = _regular(5, r), rng.uniform(0, 360)
    elif name == "hexagon":
        outer, angle = _regular(6, r), rng.uniform(0, 360)
    elif name == "star":
        outer, angle = _star(r, r * rng.uniform(0.38, 0.55), -np.pi / 2), rng.uniform(0, 360)
    elif name == "cross":
        outer, angle = _cross(r, r * rng.uniform(0.2, 0.35)), rng.uniform(-20, 20)
    else:  # pragma: no cover - CLASS_NAMES and this table are edited together
        raise ValueError(f"cls={cls}: no geometry for class {name!r}")

    stretch = np.exp(rng.uniform(-0.18, 0.18))  # mild anisotropy so no class has a single fixed aspect ratio
    t = np.deg2rad(angle)
    rot = np.array([[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]])
    scale = np.array([stretch, 1 / stretch])
    outer = (outer * scale) @ rot.T
    if hole is not None:
        hole = (hole * scale) @ rot.T
    return outer, hole


def _rasterize(outer, hole, center, img_w, img_h):
    """Anti-aliased coverage mask of the shape: (mask uint8 in a region of interest, (x0, y0)) or None if off-image."""
    pts_o = outer + center
    x0 = max(int(np.floor(pts_o[:, 0].min())) - 2, 0)
    y0 = max(int(np.floor(pts_o[:, 1].min())) - 2, 0)
    x1 = min(int(np.ceil(pts_o[:, 0].max())) + 3, img_w)
    y1 = min(int(np.ceil(pts_o[:, 1].max())) + 3, img_h)
    if x1 <= x0 or y1 <= y0:
        return None
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    offset = np.array([x0, y0], dtype=np.float64)

    def fixed(p):
        return np.round((p - offset) * (1 << _SHIFT)).astype(np.int32).reshape(-1, 1, 2)

    cv2.fillPoly(mask, [fixed(pts_o)], 255, cv2.LINE_AA, _SHIFT)
    if hole is not None:
        cv2.fillPoly(mask, [fixed(hole + center)], 0, cv2.LINE_AA, _SHIFT)
    return mask, (x0, y0)


# ----------------------------------------------------------------------------------------------------------------------
# Backgrounds and distractors
# ----------------------------------------------------------------------------------------------------------------------

def _background(rng, w, h):
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    t = rng.uniform(0, 2 * np.pi)
    ramp = (xx * np.cos(t) + yy * np.sin(t))
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1.0)
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    img = c0 + ramp[..., None] * (c1 - c0)  # linear colour gradient

    kind = rng.integers(4)
    amp = rng.uniform(15, 60)
    if kind == 0:  # smooth clouds: coarse noise upsampled
        cells = int(rng.integers(3, 12))
        coarse = rng.normal(0, 1, (cells, cells, 3)).astype(np.float32)
        img = img + amp * cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC)
    elif kind == 1:  # stripes in a random direction
        period, phi = rng.uniform(6, 40), rng.uniform(0, np.pi)
        wave = np.sin(2 * np.pi * (xx * np.cos(phi) + yy * np.sin(phi)) / period)
        img = img + amp * wave[..., None] * rng.uniform(-1, 1, 3)
    elif kind == 2:  # checkerboard
        cell = rng.uniform(8, 48)
        board = ((np.floor(xx / cell) + np.floor(yy / cell)) % 2) * 2 - 1
        img = img + 0.6 * amp * board[..., None] * rng.uniform(-1, 1, 3)
    # kind == 3: gradient only
    img = img + rng.normal(0, rng.uniform(2, 12), (h, w, 1)) + rng.normal(0, 3, (h, w, 3))  # grain
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_color(rng):
    return tuple(int(v) for v in rng.integers(0, 256, 3))


def _draw_distractors(img, rng, n, max_thickness):
    """Strokes that are not objects: straight lines, open polylines and circular/elliptic arcs."""
    h, w = img.shape[:2]
    for _ in range(n):
        color, thick = _random_color(rng), int(rng.integers(1, max_thickness + 1))
        kind = rng.integers(3)
        if kind == 0:
            p = rng.uniform([0, 0, 0, 0], [w, h, w, h]).astype(int)
            cv2.line(img, (int(p[0]), int(p[1])), (int(p[2]), int(p[3])), color, thick, cv2.LINE_AA)
        elif kind == 1:
            k = int(rng.integers(3, 7))
            start = rng.uniform([0, 0], [w, h])
            pts = start + np.cumsum(rng.normal(0, min(w, h) / 8, (k, 2)), 0)
            cv2.polylines(img, [pts.astype(np.int32).reshape(-1, 1, 2)], False, color, thick, cv2.LINE_AA)
        else:  # an arc never closes into a ring: at most 250 degrees
            c = (int(rng.uniform(0, w)), int(rng.uniform(0, h)))
            axes = (int(rng.uniform(5, w / 3)), int(rng.uniform(5, h / 3)))
            a0 = float(rng.uniform(0, 360))
            cv2.ellipse(img, c, axes, float(rng.uniform(0, 180)), a0, a0 + float(rng.uniform(30, 250)), color,
                        thick, cv2.LINE_AA)


def _contrasting_color(rng, img_roi, mask):
    """A random colour far enough from the background under the object to be visible."""
    under = img_roi[mask > 0].reshape(-1, 3).astype(np.float64).mean(0)
    for _ in range(12):
        c = rng.integers(0, 256, 3).astype(np.float64)
        if np.linalg.norm(c - under) > 90:
            return c
    return 255.0 - under


# ----------------------------------------------------------------------------------------------------------------------
# One image
# ----------------------------------------------------------------------------------------------------------------------

def render_image(rng, background_only=False):
    """Draw one image. Returns (BGR uint8 image, list of (cls, x1, y1, x2, y2) integer pixel-edge boxes)."""
    w, h = (int(v) for v in rng.integers(MIN_SIDE, MAX_SIDE + 1, 2))
    img = _background(rng, w, h)
    _draw_distractors(img, rng, int(rng.integers(2, 10)), max_thickness=3)
    owner = np.full((h, w), -1, np.int16)  # which object a pixel shows (for the occlusion limit)
    areas, boxes = [], []
    n_obj = 0 if background_only else int(rng.integers(1, MAX_OBJECTS + 1))
    max_size = min(w, h) / 2
    for _ in range(n_obj):
        for _attempt in range(25):
            cls = int(rng.integers(len(CLASS_NAMES)))
            size = float(np.exp(rng.uniform(np.log(MIN_OBJECT), np.log(max_size))))
            outer, hole = _object_polygons(cls, size, rng)
            margin = 0.2 * size  # the border may cut at most ~30% of the object
            center = rng.uniform([margin, margin], [w - margin, h - margin])
            raster = _rasterize(outer, hole, center, w, h)
            if raster is None:
                continue
            mask, (x0, y0) = raster
            ys, xs = np.nonzero(mask)
            if len(xs) == 0:
                continue
            bx1, by1, bx2, by2 = x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1
            if bx2 - bx1 < 4 or by2 - by1 < 4:
                continue
            # occlusion: every earlier object must keep at least half of its pixels visible
            rh, rw = mask.shape
            own = owner[y0:y0 + rh, x0:x0 + rw]
            covered = own[(mask > 127) & (own >= 0)]
            if covered.size:
                ids, counts = np.unique(covered, return_counts=True)
                visible = np.array([(owner == i).sum() for i in ids])
                if np.any(visible - counts < 0.5 * np.array([areas[i] for i in ids])):
                    continue
            break
        else:
            continue  # no acceptable placement for this object; the image gets one fewer

        roi = img[y0:y0 + rh, x0:x0 + rw]
        color = _contrasting_color(rng, roi, mask)
        gy, gx = np.mgrid[0:rh, 0:rw].astype(np.float32)
        shade = rng.uniform(-25, 25) * (gx / max(rw, 1) - 0.5) + rng.uniform(-25, 25) * (gy / max(rh, 1) - 0.5)
        fill = color + shade[..., None] + rng.normal(0, 4, (rh, rw, 1))
        alpha = mask.astype(np.float32)[..., None] / 255.0
        roi[:] = np.clip(roi * (1 - alpha) + fill * alpha, 0, 255).astype(np.uint8)
        own[mask > 127] = len(boxes)
        areas.append(int((mask > 127).sum()) or 1)
        boxes.append((cls, int(bx1), int(by1), int(bx2), int(by2)))

    _draw_distractors(img, rng, int(rng.integers(0, 4)), max_thickness=2)  # a few strokes on top of objects
    return img, boxes


def is_background(index):
    """Whether image `index` of a split holds no object: every 33rd image (about 3%), whatever the split size."""
    return index % BACKGROUND_PERIOD == BACKGROUND_PERIOD // 2


# ----------------------------------------------------------------------------------------------------------------------
# Dataset
# ----------------------------------------------------------------------------------------------------------------------

def _coco_json(records):
    images, annotations = [], []
    for stem, (w, h), boxes in records:
        image_id = int(stem)
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": w, "height": h})
        for cls, x1, y1, x2, y2 in boxes:
            annotations.append({"id": len(annotations) + 1,  # COCOeval treats id 0 as 'unmatched'
                                "image_id": image_id, "category_id": CATEGORY_IDS[cls],
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": CATEGORY_IDS[i], "name": n, "supercategory": "shape"} for i, n in enumerate(CLASS_NAMES)]
    return {"info": {"description": "shapes: synthetic detection dataset generated by utils/shapes.py"},
            "licenses": [], "images": images, "annotations": annotations, "categories": categories}


def _write_split(root, split, n, seed, split_id):
    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    records = []
    for i in range(n):
        rng = np.random.default_rng([seed, split_id, i])
        img, boxes = render_image(rng, background_only=is_background(i))
        h, w = img.shape[:2]
        stem = f"{i + 1:06d}"
        if not cv2.imwrite(str(root / "images" / split / f"{stem}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92]):
            raise UserError(f"{root}: could not write images, check that the folder is writable")
        rows = [f"{c} {(x1 + x2) / 2 / w:.6f} {(y1 + y2) / 2 / h:.6f} {(x2 - x1) / w:.6f} {(y2 - y1) / h:.6f}"
                for c, x1, y1, x2, y2 in boxes]
        (root / "labels" / split / f"{stem}.txt").write_text("".join(r + "\n" for r in rows))
        records.append((stem, (w, h), boxes))
    return records


def generate(out, n_train=600, n_val=150, seed=0, overwrite=False):
    """Write the shapes dataset under `out` and return its path.

    It is built in a temporary folder inside `out` and moved into place at the end, so an interrupted run leaves no
    half-written dataset behind. Existing images/, labels/ or annotations/ under `out` are replaced only with
    overwrite=True.
    """
    out = Path(out).resolve()
    if n_train < 1 or n_val < 1:
        raise UserError(f"shapes: n_train={n_train}, n_val={n_val}: both splits need at least one image")
    parts = ("images", "labels", "annotations")
    existing = [out / p for p in parts if (out / p).exists()]
    if existing and not overwrite:
        raise UserError(f"{out}: already holds {', '.join(p.name for p in existing)}; "
                        f"delete the folder or pass --overwrite to regenerate it")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".partial-{os.getpid()}"  # inside the dataset folder: a generator writes nowhere else
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.time()
    try:
        _write_split(tmp, "train", n_train, seed, 0)
        val_records = _write_split(tmp, "val", n_val, seed, 1)
        (tmp / "annotations").mkdir()
        with open(tmp / "annotations" / "instances_val.json", "w") as f:
            json.dump(_coco_json(val_records), f)
        for p in parts:
            if (out / p).exists():
                if not overwrite:  # written by a concurrent run (another DDP rank) meanwhile: keep that one
                    continue
                shutil.rmtree(out / p)
            os.replace(tmp / p, out / p)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    LOGGER.info(f"shapes: {n_train} train + {n_val} val images written to {out} ({time.time() - t0:.1f}s)")
    return out


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description="Generate the embedded shapes detection dataset.")
    p.add_argument("--out", default="datasets/shapes", help="output folder")
    p.add_argument("--n-train", type=int, default=600, help="number of training images")
    p.add_argument("--n-val", type=int, default=150, help="number of validation images")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed -> same files)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset in --out")
    return p.parse_args(argv)


def main(opt):
    return generate(opt.out, opt.n_train, opt.n_val, opt.seed, opt.overwrite)


if __name__ == "__main__":
    run_cli(main, parse_opt())
