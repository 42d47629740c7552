"""AutoAnchor (YOLOv5 v7.0): measure how well a model's anchors fit a dataset's boxes and re-fit them if needed.

The fit of an anchor to a box is the worst of its width and height ratios, min(r, 1/r); a box is reachable when
some anchor's fit exceeds 1/thr (thr = hyp anchor_t), which is exactly the rule ComputeLoss uses to assign targets.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch

from models.yolo import Detect
from utils.general import LOGGER, colorstr

PREFIX = colorstr("AutoAnchor: ")


def check_anchor_order(m):
    """Anchors must grow with stride; flip the levels of Detect m if their mean areas run the other way
    (the model does this itself when built: `Detect.check_anchor_order`)."""
    Detect.check_anchor_order(m)


def _ratio_fit(wh, anchors):
    """Fit of every box (n,2) to every anchor (k,2): min over w and h of min(r, 1/r) -> (n,k)."""
    r = wh[:, None] / anchors[None]
    return torch.min(r, 1 / r).min(2).values


def anchor_metrics(wh, anchors, thr=4.0):
    """(best possible recall, mean anchors per box above threshold) of anchors (k,2) for boxes wh (n,2), in pixels."""
    wh = torch.as_tensor(np.asarray(wh), dtype=torch.float32).view(-1, 2)
    anchors = torch.as_tensor(np.asarray(anchors), dtype=torch.float32).view(-1, 2)
    fit = _ratio_fit(wh, anchors)
    aat = (fit > 1 / thr).float().sum(1).mean()
    bpr = (fit.max(1).values > 1 / thr).float().mean()
    return float(bpr), float(aat)


def label_wh(dataset, imgsz=640, scale=None):
    """Box sizes in pixels (n,2) after resizing each image's long side to imgsz, optionally times a per-image scale."""
    shapes = imgsz * dataset.shapes / dataset.shapes.max(1, keepdims=True)
    if scale is not None:
        shapes = shapes * scale
    parts = [np.asarray(lb, dtype=np.float64).reshape(-1, 5)[:, 3:5] * s for s, lb in zip(shapes, dataset.labels)]
    return np.concatenate(parts, 0) if parts else np.zeros((0, 2))


def _detect_of(model):
    return model.module.model[-1] if hasattr(model, "module") else model.model[-1]


@torch.no_grad()
def check_anchors(dataset, model, thr=4.0, imgsz=640, seed=0):
    """Log the anchors' fit to the dataset; below 0.98 BPR evolve new anchors and keep them if they fit better.

    Box sizes get a random 0.9-1.1 scale per image (as training augmentation would), drawn from `seed`.
    Returns (bpr, aat) of the anchors in the model afterwards.
    """
    m = _detect_of(model)
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.9, 1.1, size=(len(dataset.shapes), 1))
    wh = label_wh(dataset, imgsz, scale)
    if len(wh) == 0:
        LOGGER.warning(f"{PREFIX}WARNING ⚠️ no labels in the dataset, skipping the anchor check")
        return 0.0, 0.0

    stride = m.stride.to(m.anchors.device).view(-1, 1, 1)
    anchors_px = (m.anchors.clone() * stride).cpu().view(-1, 2)
    bpr, aat = anchor_metrics(wh, anchors_px, thr)
    s = f"\n{PREFIX}{aat:.2f} anchors/target, {bpr:.3f} Best Possible Recall (BPR). "
    if bpr > 0.98:
        LOGGER.info(f"{s}Current anchors are a good fit to dataset ✅")
        return bpr, aat

    LOGGER.info(f"{s}Anchors are a poor fit to dataset ⚠️, attempting to improve...")
    na = m.anchors.numel() // 2
    new = kmean_anchors(dataset, n=na, img_size=imgsz, thr=thr, gen=1000, verbose=False, seed=seed)
    new_bpr, new_aat = anchor_metrics(wh, new, thr)
    if new_bpr > bpr:
        m.anchors[:] = torch.tensor(new, device=m.anchors.device).type_as(m.anchors).view_as(m.anchors)
        check_anchor_order(m)  # on pixel anchors, before converting to grid units
        m.anchors /= stride
        LOGGER.info(f"{PREFIX}Done ✅ (optional: update model *.yaml to use these anchors in the future)")
        return new_bpr, new_aat
    LOGGER.info(f"{PREFIX}Done ⚠️ (original anchors better than new anchors, proceeding with original anchors)")
    return bpr, aat


def _kmeans(obs, n, seed):
    from scipy.cluster.vq import kmeans

    params = inspect.signature(kmeans).parameters
    kw = {"rng": np.random.default_rng(seed)} if "rng" in params else {"seed": seed}
    return kmeans(obs, n, iter=30, **kw)[0]


def kmean_anchors(dataset, n=9, img_size=640, thr=4.0, gen=1000, verbose=True, seed=0):
    """Anchors (n,2) in pixels, small to large, for a dataset: k-means on box sizes, then `gen` generations of
    mutation keeping any change that raises the fitness (mean of best fits above 1/thr).

    dataset: an object with .shapes (images, 2: w, h) and .labels (list of (k,5) class, xc, yc, w, h normalised).
    """
    if not (hasattr(dataset, "shapes") and hasattr(dataset, "labels")):
        raise ValueError("dataset: expected an object with .shapes and .labels (a LoadImagesAndLabels dataset)")
    rng = np.random.default_rng(seed)
    inv_thr = 1 / thr

    wh0 = label_wh(dataset, img_size)
    tiny = int((wh0 < 3.0).any(1).sum())
    if tiny:
        LOGGER.info(f"{PREFIX}WARNING ⚠️ Extremely small objects found: {tiny} of {len(wh0)} labels "
                    "are <3 pixels in size")
    wh = wh0[(wh0 >= 2.0).any(1)].astype(np.float32)  # boxes under 2 px in both sides would pull anchors to zero

    LOGGER.info(f"{PREFIX}Running kmeans for {n} anchors on {len(wh)} points...")
    k = None
    if n <= len(wh):
        sigma = wh.std(0)
        sigma[sigma == 0] = 1.0
        centres = _kmeans(wh / sigma, n, seed) * sigma  # k-means on whitened sizes
        if len(centres) == n:
            k = centres
    if k is None:  # too few points or kmeans merged clusters
        LOGGER.warning(f"{PREFIX}WARNING ⚠️ switching strategies from kmeans to random init")
        k = np.sort(rng.random(n * 2)).reshape(n, 2) * img_size

    wh_t = torch.tensor(wh, dtype=torch.float32)
    wh0_t = torch.tensor(wh0, dtype=torch.float32)

    def fitness_of(anchors):
        best = _ratio_fit(wh_t, torch.tensor(anchors, dtype=torch.float32)).max(1).values
        return float((best * (best > inv_thr).float()).mean())

    def report(anchors, log=True):
        anchors = anchors[np.argsort(anchors.prod(1))]
        fit = _ratio_fit(wh0_t, torch.tensor(anchors, dtype=torch.float32))
        best = fit.max(1).values
        bpr, aat = (best > inv_thr).float().mean(), (fit > inv_thr).float().mean() * n
        if log:
            sizes = ", ".join(f"{round(float(a[0]))},{round(float(a[1]))}" for a in anchors)
            LOGGER.info(f"{PREFIX}thr={inv_thr:.2f}: {bpr:.4f} best possible recall, {aat:.2f} anchors past thr\n"
                        f"{PREFIX}n={n}, img_size={img_size}, metric_all={fit.mean():.3f}/{best.mean():.3f}-mean/best, "
                        f"past_thr={fit[fit > inv_thr].mean():.3f}-mean: {sizes}")
        return anchors

    k = report(k, log=False)
    # Genetic evolution: multiply anchors by random factors (each entry mutated with probability mp), keep improvements
    f, mp, sigma = fitness_of(k), 0.9, 0.1
    for _ in range(gen):
        v = np.ones(k.shape)
        while (v == 1).all():  # insist on a change
            v = ((rng.random(k.shape) < mp) * rng.random() * rng.standard_normal(k.shape) * sigma + 1).clip(0.3, 3.0)
        candidate = (k * v).clip(min=2.0)
        fc = fitness_of(candidate)
        if fc > f:
            f, k = fc, candidate
            if verbose:
                LOGGER.info(f"{PREFIX}Evolving anchors with Genetic Algorithm: fitness = {f:.4f}")
                report(k)
    return report(k).astype(np.float32)
