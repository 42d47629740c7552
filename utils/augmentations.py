"""Image augmentations for detection (numpy / OpenCV), with YOLOv5 v7.0 semantics.

Images are HWC BGR uint8. Box targets are (n, 5) float arrays [cls, x1, y1, x2, y2] in pixels.
Random draws use the global `random` / `np.random` streams, which the training loader seeds per sample from
(seed, epoch, index) (utils.dataloaders.EpochSampler).
"""
from __future__ import annotations

import math
import random

import cv2
import numpy as np

PAD_VALUE = 114  # grey used for letterbox padding and mosaic/perspective borders


def letterbox(im, new_shape=(640, 640), color=(114, 114, 114), auto=True, scaleFill=False, scaleup=True, stride=32):
    """Resize `im` keeping its aspect ratio, then pad it to `new_shape` (h, w), centring the image.

    auto: pad only up to the next multiple of `stride` (minimum rectangle) instead of to new_shape.
    scaleFill: stretch to new_shape exactly, no padding (the aspect ratio is not kept).
    scaleup: allow enlarging; False only shrinks (used for validation, better mAP).
    Returns (image, (ratio_w, ratio_h), (pad_w, pad_h)) where the pads are per side (possibly x.5).
    """
    h0, w0 = im.shape[:2]
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    out_h, out_w = int(new_shape[0]), int(new_shape[1])

    r = min(out_h / h0, out_w / w0)
    if not scaleup:
        r = min(r, 1.0)
    ratio = (r, r)
    w1, h1 = int(round(w0 * r)), int(round(h0 * r))  # size after resizing, before padding
    pad_w, pad_h = out_w - w1, out_h - h1
    if auto:
        pad_w, pad_h = pad_w % stride, pad_h % stride
    elif scaleFill:
        pad_w, pad_h = 0, 0
        w1, h1 = out_w, out_h
        ratio = (out_w / w0, out_h / h0)
    pad_w, pad_h = pad_w / 2, pad_h / 2  # split between the two sides

    if (w0, h0) != (w1, h1):
        im = cv2.resize(im, (w1, h1), interpolation=cv2.INTER_LINEAR)
    # an odd total pad puts the extra pixel at the bottom/right
    top, bottom = int(round(pad_h - 0.1)), int(round(pad_h + 0.1))
    left, right = int(round(pad_w - 0.1)), int(round(pad_w + 0.1))
    im = cv2.copyMakeBorder(im, top, bottom, left, right, cv2.BORDER_CONSTANT, value=color)
    return im, ratio, (pad_w, pad_h)


def augment_hsv(im, hgain=0.5, sgain=0.5, vgain=0.5):
    """Random hue/saturation/value gains in [1 - gain, 1 + gain], applied in place through lookup tables."""
    if not (hgain or sgain or vgain):
        return im
    gh, gs, gv = np.random.uniform(-1, 1, 3) * (hgain, sgain, vgain) + 1
    hue, sat, val = cv2.split(cv2.cvtColor(im, cv2.COLOR_BGR2HSV))
    x = np.arange(256, dtype=np.float64)
    lut_h = ((x * gh) % 180).astype(np.uint8)  # OpenCV hue lives in [0, 180)
    lut_s = np.clip(x * gs, 0, 255).astype(np.uint8)
    lut_v = np.clip(x * gv, 0, 255).astype(np.uint8)
    hsv = cv2.merge((cv2.LUT(hue, lut_h), cv2.LUT(sat, lut_s), cv2.LUT(val, lut_v)))
    cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR, dst=im)
    return im


def box_candidates(box1, box2, wh_thr=2, ar_thr=100, area_thr=0.1, eps=1e-16):
    """Which boxes survive an augmentation: box1 before, box2 after, both (4, n) xyxy.

    A box is kept when it is wider and taller than wh_thr px, keeps more than area_thr of its (scaled) area and
    its aspect ratio stays below ar_thr.
    """
    w1, h1 = box1[2] - box1[0], box1[3] - box1[1]
    w2, h2 = box2[2] - box2[0], box2[3] - box2[1]
    aspect = np.maximum(w2 / (h2 + eps), h2 / (w2 + eps))
    return (w2 > wh_thr) & (h2 > wh_thr) & (w2 * h2 / (w1 * h1 + eps) > area_thr) & (aspect < ar_thr)


def random_perspective(im, targets=(), degrees=10, translate=0.1, scale=0.1, shear=10, perspective=0.0,
                       border=(0, 0)):
    """Random rotation, scale, shear, translation and perspective of an image and its boxes.

    border (h, w): pixels removed from each side of the output (negative: the mosaic's 2s canvas -> s).
    targets: (n, 5) [cls, x1, y1, x2, y2] pixels. Boxes are mapped by their 4 corners, clipped to the output and
    filtered with box_candidates. Returns (image, targets).
    """
    out_h = im.shape[0] + 2 * border[0]
    out_w = im.shape[1] + 2 * border[1]

    # Compose, right to left: move the centre to the origin, perspective, rotate+scale, shear, translate.
    to_origin = np.eye(3)
    to_origin[0, 2] = -im.shape[1] / 2
    to_origin[1, 2] = -im.shape[0] / 2

    persp = np.eye(3)
    persp[2, 0] = random.uniform(-perspective, perspective)
    persp[2, 1] = random.uniform(-perspective, perspective)

    rot = np.eye(3)
    angle = random.uniform(-degrees, degrees)
    s = random.uniform(1 - scale, 1 + scale)
    rot[:2] = cv2.getRotationMatrix2D(center=(0, 0), angle=angle, scale=s)

    sh = np.eye(3)
    sh[0, 1] = math.tan(random.uniform(-shear, shear) * math.pi / 180)
    sh[1, 0] = math.tan(random.uniform(-shear, shear) * math.pi / 180)

    move = np.eye(3)
    move[0, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_w
    move[1, 2] = random.uniform(0.5 - translate, 0.5 + translate) * out_h

    M = move @ sh @ rot @ persp @ to_origin
    if border[0] != 0 or border[1] != 0 or (M != np.eye(3)).any():
        border_value = (PAD_VALUE,) * 3
        if perspective:
            im = cv2.warpPerspective(im, M, dsize=(out_w, out_h), borderValue=border_value)
        else:
            im = cv2.warpAffine(im, M[:2], dsize=(out_w, out_h), borderValue=border_value)

    targets = np.asarray(targets, dtype=np.float32).reshape(-1, 5)
    n = len(targets)
    if n:
        x1, y1, x2, y2 = (targets[:, i].astype(np.float64) for i in range(1, 5))
        xs = np.stack([x1, x2, x2, x1], 1)  # corners clockwise from top-left, (n, 4)
        ys = np.stack([y1, y1, y2, y2], 1)
        pts = np.stack([xs, ys, np.ones_like(xs)], -1) @ M.T  # homogeneous, (n, 4, 3)
        if perspective:
            pts = pts / pts[..., 2:3]
        xs, ys = pts[..., 0], pts[..., 1]
        new = np.stack([xs.min(1), ys.min(1), xs.max(1), ys.max(1)], 1)  # enclosing box of the mapped corners
        new[:, [0, 2]] = new[:, [0, 2]].clip(0, out_w)
        new[:, [1, 3]] = new[:, [1, 3]].clip(0, out_h)
        keep = box_candidates(targets[:, 1:5].T * s, new.T, area_thr=0.10)
        targets = targets[keep]
        targets[:, 1:5] = new[keep]
    return im, targets


def mixup(im, labels, im2, labels2):
    """Blend two images of the same shape with a Beta(32, 32) weight and keep the labels of both."""
    r = np.random.beta(32.0, 32.0)
    im = (im * r + im2 * (1 - r)).astype(np.uint8)
    return im, np.concatenate((labels, labels2), 0)
