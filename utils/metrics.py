"""Detection metrics with YOLOv5 v7.0 semantics: IoU variants, COCO-style AP, P/R/F1, confusion matrix, fitness.

The numbers must agree with upstream's val.py, so every formula (sentinels, precision envelope, 101-point
interpolation, the max-F1 operating point on the smoothed mean F1 curve, the greedy matching order) follows
upstream exactly; only the code is our own.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch

from utils.general import LOGGER

_trapezoid = getattr(np, "trapezoid", None) or np.trapz  # numpy >= 2 renamed trapz


# ---------------------------------------------------------------------------------------------------------------------
# Fitness and smoothing


def fitness(x):
    """Model fitness per row of [P, R, mAP@.5, mAP@.5:.95, ...]: 0.1 * mAP@.5 + 0.9 * mAP@.5:.95."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    return x[:, :4] @ np.array([0.0, 0.0, 0.1, 0.9])


def smooth(y, f=0.05):
    """Box-filter y with a window of about a fraction f of its length (odd width, edges padded with end values)."""
    y = np.asarray(y, dtype=np.float64)
    width = round(len(y) * f * 2) // 2 + 1
    padded = np.pad(y, width // 2, mode="edge")
    return np.convolve(padded, np.full(width, 1.0 / width), mode="valid")


# ---------------------------------------------------------------------------------------------------------------------
# Box overlap


def _corners(box, xywh):
    """Split (..., 4) boxes into x1, y1, x2, y2 columns (each (..., 1))."""
    a, b, c, d = box.chunk(4, -1)
    if xywh:
        return a - c / 2, b - d / 2, a + c / 2, b + d / 2
    return a, b, c, d


def bbox_iou(box1, box2, xywh=True, GIoU=False, DIoU=False, CIoU=False, eps=1e-7):
    """IoU (or GIoU/DIoU/CIoU) of box1 (1,4) or (n,4) against box2 (n,4), element-wise with broadcasting -> (n,1).

    CIoU = IoU - rho^2/c^2 - alpha*v with v = 4/pi^2 (atan(w2/h2) - atan(w1/h1))^2 and alpha = v / (v - IoU + 1 + eps),
    alpha treated as a constant (no gradient), as in upstream.
    """
    ax1, ay1, ax2, ay2 = _corners(box1, xywh)
    bx1, by1, bx2, by2 = _corners(box2, xywh)
    if xywh:
        w1, h1 = box1[..., 2:3], box1[..., 3:4]
        w2, h2 = box2[..., 2:3], box2[..., 3:4]
    else:
        w1, h1 = ax2 - ax1, (ay2 - ay1).clamp(eps)
        w2, h2 = bx2 - bx1, (by2 - by1).clamp(eps)

    overlap_w = (torch.minimum(ax2, bx2) - torch.maximum(ax1, bx1)).clamp(0)
    overlap_h = (torch.minimum(ay2, by2) - torch.maximum(ay1, by1)).clamp(0)
    inter = overlap_w * overlap_h
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    if not (GIoU or DIoU or CIoU):
        return iou

    # smallest box enclosing both
    enc_w = torch.maximum(ax2, bx2) - torch.minimum(ax1, bx1)
    enc_h = torch.maximum(ay2, by2) - torch.minimum(ay1, by1)
    if GIoU and not (DIoU or CIoU):
        enc_area = enc_w * enc_h + eps
        return iou - (enc_area - union) / enc_area

    diag2 = enc_w**2 + enc_h**2 + eps
    centre_dist2 = ((bx1 + bx2 - ax1 - ax2) ** 2 + (by1 + by2 - ay1 - ay2) ** 2) / 4
    if not CIoU:
        return iou - centre_dist2 / diag2
    v = (4 / math.pi**2) * (torch.atan(w2 / h2) - torch.atan(w1 / h1)).pow(2)
    with torch.no_grad():
        alpha = v / (v - iou + (1 + eps))
    return iou - (centre_dist2 / diag2 + v * alpha)


def box_iou(box1, box2, eps=1e-7):
    """Pairwise IoU of xyxy boxes: box1 (N,4), box2 (M,4) -> (N,M)."""
    lt = torch.maximum(box1[:, None, :2], box2[None, :, :2])
    rb = torch.minimum(box1[:, None, 2:], box2[None, :, 2:])
    inter = (rb - lt).clamp(0).prod(2)
    area1 = (box1[:, 2:] - box1[:, :2]).prod(1)
    area2 = (box2[:, 2:] - box2[:, :2]).prod(1)
    return inter / (area1[:, None] + area2[None, :] - inter + eps)


def bbox_ioa(box1, box2, eps=1e-7):
    """Intersection of one xyxy box (4,) with each of box2 (n,4), over box2's area (numpy) -> (n,)."""
    box1, box2 = np.asarray(box1), np.asarray(box2)
    w = (np.minimum(box1[2], box2[:, 2]) - np.maximum(box1[0], box2[:, 0])).clip(0)
    h = (np.minimum(box1[3], box2[:, 3]) - np.maximum(box1[1], box2[:, 1])).clip(0)
    area2 = (box2[:, 2] - box2[:, 0]) * (box2[:, 3] - box2[:, 1]) + eps
    return w * h / area2


# ---------------------------------------------------------------------------------------------------------------------
# Matching detections to labels


def _greedy_matches(iou, allowed):
    """Upstream's one-to-one matching: returns (label_idx, det_idx) arrays.

    Candidates (iou where `allowed`) are ranked by IoU, highest first; each detection keeps its best label; then,
    walking detections in index order (= confidence order after NMS), each label keeps the first detection that
    claimed it. The second step deliberately does not re-rank by IoU: that is what upstream's val.py does.
    """
    li, di = torch.nonzero(allowed, as_tuple=True)
    if li.numel() == 0:
        return np.zeros(0, dtype=int), np.zeros(0, dtype=int)
    li, di = li.cpu().numpy(), di.cpu().numpy()
    if li.size > 1:
        scores = iou[allowed].detach().cpu().numpy()
        order = scores.argsort()[::-1]
        li, di = li[order], di[order]
        _, first = np.unique(di, return_index=True)  # best label per detection, sorted by detection index
        li, di = li[first], di[first]
        _, first = np.unique(li, return_index=True)  # first detection per label
        li, di = li[first], di[first]
    return li, di


def process_batch(detections, labels, iouv):
    """Which detections are true positives at each IoU threshold.

    detections (n,6) xyxy, conf, cls (sorted by confidence, as NMS returns them); labels (m,5) cls, xyxy;
    iouv (t,) IoU thresholds. Returns a bool tensor (n,t) on iouv's device. A detection is correct at threshold
    thr when it is matched one-to-one to a label of the same class with IoU >= thr.
    """
    correct = np.zeros((detections.shape[0], iouv.shape[0]), dtype=bool)
    if detections.shape[0] and labels.shape[0]:
        iou = box_iou(labels[:, 1:], detections[:, :4])
        same_class = labels[:, 0:1] == detections[:, 5]
        for k, thr in enumerate(iouv):
            _, det_idx = _greedy_matches(iou, (iou >= thr) & same_class)
            correct[det_idx, k] = True
    return torch.tensor(correct, dtype=torch.bool, device=iouv.device)


# ---------------------------------------------------------------------------------------------------------------------
# Average precision


def compute_ap(recall, precision):
    """AP of one PR curve by COCO's 101-point interpolation -> (ap, envelope precision, recall with sentinels)."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope: max precision at any higher recall
    x = np.linspace(0, 1, 101)
    ap = _trapezoid(np.interp(x, mrec, mpre), x)
    return ap, mpre, mrec


def _names_dict(names):
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    return {i: str(v) for i, v in enumerate(names or ())}


def ap_per_class(tp, conf, pred_cls, target_cls, plot=False, save_dir=".", names=(), eps=1e-16, prefix=""):
    """Per-class AP at each IoU threshold and P/R/F1 at the confidence that maximises the (smoothed) mean F1.

    tp (n,t) bool per detection and IoU threshold, conf (n,), pred_cls (n,), target_cls (m,) class of every label.
    Returns tp, fp, p, r, f1 (each (nc,)), ap (nc,t), classes (nc,) int, for the nc classes present in target_cls.
    """
    tp = np.asarray(tp, dtype=np.float64)
    if tp.ndim == 1:
        tp = tp[:, None]
    conf, pred_cls, target_cls = (np.asarray(a).reshape(-1) for a in (conf, pred_cls, target_cls))
    order = np.argsort(-conf)
    tp, conf, pred_cls = tp[order], conf[order], pred_cls[order]

    classes, n_labels = np.unique(target_cls, return_counts=True)
    nc, nt = classes.shape[0], tp.shape[1]
    if nc == 0:
        empty = np.zeros(0)
        return empty, empty, empty, empty, empty, np.zeros((0, nt)), classes.astype(int)

    px = np.linspace(0, 1, 1000)
    ap, p, r = np.zeros((nc, nt)), np.zeros((nc, 1000)), np.zeros((nc, 1000))
    pr_curves = {}  # class row -> precision at recall px (IoU 0.5), for the plot
    for ci, c in enumerate(classes):
        mine = pred_cls == c
        if not mine.any():
            continue
        tpc = tp[mine].cumsum(0)
        fpc = (1 - tp[mine]).cumsum(0)
        recall = tpc / (n_labels[ci] + eps)
        precision = tpc / (tpc + fpc)
        # conf is decreasing, so interpolate on -conf; before the first detection recall is 0 and precision 1
        r[ci] = np.interp(-px, -conf[mine], recall[:, 0], left=0)
        p[ci] = np.interp(-px, -conf[mine], precision[:, 0], left=1)
        for j in range(nt):
            ap[ci, j], mpre, mrec = compute_ap(recall[:, j], precision[:, j])
            if j == 0 and plot:
                pr_curves[ci] = np.interp(px, mrec, mpre)

    f1 = 2 * p * r / (p + r + eps)
    if plot:
        all_names = _names_dict(names)
        labels = [all_names.get(int(c), str(int(c))) for c in classes]
        save_dir = Path(save_dir)
        _plot_pr_curve(px, pr_curves, ap, save_dir / f"{prefix}PR_curve.png", labels)
        _plot_metric_curve(px, f1, save_dir / f"{prefix}F1_curve.png", labels, ylabel="F1")
        _plot_metric_curve(px, p, save_dir / f"{prefix}P_curve.png", labels, ylabel="Precision")
        _plot_metric_curve(px, r, save_dir / f"{prefix}R_curve.png", labels, ylabel="Recall")

    best = smooth(f1.mean(0), 0.1).argmax()
    p, r, f1 = p[:, best], r[:, best], f1[:, best]
    tp_count = (r * n_labels).round()
    fp_count = (tp_count / (p + eps) - tp_count).round()
    return tp_count, fp_count, p, r, f1, ap, classes.astype(int)


# ---------------------------------------------------------------------------------------------------------------------
# Confusion matrix


class ConfusionMatrix:
    """(nc+1) x (nc+1) counts: rows predicted class, columns true class; the last row/column is background."""

    def __init__(self, nc, conf=0.25, iou_thres=0.45):
        self.nc = int(nc)
        self.conf = conf
        self.iou_thres = iou_thres
        self.matrix = np.zeros((self.nc + 1, self.nc + 1))

    def process_batch(self, detections, labels):
        """Add one image: detections (n,6) xyxy, conf, cls or None (no detections); labels (m,5) cls, xyxy.

        When detections is None, labels may also be given as a 1-D tensor of classes (as upstream's val.py does).
        Detections are matched to labels class-agnostically at IoU > iou_thres, one-to-one, best IoU first.
        """
        bg = self.nc
        if detections is None:
            classes = labels[:, 0] if labels.ndim == 2 else labels
            for gc in classes.int().tolist():
                self.matrix[bg, gc] += 1  # missed: true class predicted as background
            return

        detections = detections[detections[:, 4] > self.conf]
        gt_classes = labels[:, 0].int().tolist()
        det_classes = detections[:, 5].int().tolist()
        iou = box_iou(labels[:, 1:], detections[:, :4])
        label_idx, det_idx = self._match(iou)
        matched_det_of_label = dict(zip(label_idx.tolist(), det_idx.tolist()))
        for i, gc in enumerate(gt_classes):
            if i in matched_det_of_label:
                self.matrix[det_classes[matched_det_of_label[i]], gc] += 1
            else:
                self.matrix[bg, gc] += 1  # missed
        matched_dets = set(det_idx.tolist())
        for i, dc in enumerate(det_classes):
            if i not in matched_dets:
                self.matrix[dc, bg] += 1  # detection of nothing
        # Upstream v7.0 skips this last loop when no detection matched at all, so an image whose detections all
        # miss adds no false positives; we count them (as the Ultralytics successor does). Only plots read this.

    def _match(self, iou):
        """Upstream's confusion-matrix matching: best IoU per detection, then best IoU per label."""
        allowed = iou > self.iou_thres
        li, di = torch.nonzero(allowed, as_tuple=True)
        li, di = li.cpu().numpy(), di.cpu().numpy()
        if li.size > 1:
            scores = iou[allowed].detach().cpu().numpy()
            order = scores.argsort()[::-1]
            li, di, scores = li[order], di[order], scores[order]
            _, first = np.unique(di, return_index=True)
            li, di, scores = li[first], di[first], scores[first]
            order = scores.argsort()[::-1]  # unlike val matching, re-rank by IoU before de-duplicating labels
            li, di = li[order], di[order]
            _, first = np.unique(li, return_index=True)
            li, di = li[first], di[first]
        return li, di

    def tp_fp(self):
        """True and false positives per class (background row/column excluded)."""
        tp = self.matrix.diagonal()
        fp = self.matrix.sum(1) - tp
        return tp[:-1], fp[:-1]

    def plot(self, normalize=True, save_dir="", names=()):
        """Save confusion_matrix.png (seaborn heatmap, columns normalised to 1 when normalize) in save_dir."""
        try:
            import seaborn as sn
            from matplotlib.figure import Figure

            array = self.matrix / ((self.matrix.sum(0).reshape(1, -1) + 1e-9) if normalize else 1)
            array[array < 0.005] = np.nan  # leave near-zero cells blank instead of printing 0.00
            names = list(_names_dict(names).values())
            ticklabels = names + ["background"] if 0 < len(names) < 99 and len(names) == self.nc else "auto"
            with sn.plotting_context("notebook", font_scale=1.0 if self.nc < 50 else 0.8), warnings.catch_warnings():
                warnings.simplefilter("ignore")  # an all-NaN matrix warns
                fig = Figure(figsize=(12, 9), tight_layout=True)
                ax = fig.subplots(1, 1)
                sn.heatmap(array, ax=ax, annot=self.nc < 30, annot_kws={"size": 8}, cmap="Blues", fmt=".2f",
                           square=True, vmin=0.0, xticklabels=ticklabels,
                           yticklabels=ticklabels).set_facecolor((1, 1, 1))
                ax.set_xlabel("True")
                ax.set_ylabel("Predicted")
                ax.set_title("Confusion Matrix")
                fig.savefig(Path(save_dir) / "confusion_matrix.png", dpi=250)
        except Exception as e:  # a plot must never end a validation run
            LOGGER.warning(f"WARNING ⚠️ ConfusionMatrix plot failure: {e}")

    def print(self):
        for row in self.matrix:
            print(" ".join(map(str, row)))


# ---------------------------------------------------------------------------------------------------------------------
# Curves


def _new_axes():
    from matplotlib.figure import Figure  # no pyplot: no global figure state, works without a display

    fig = Figure(figsize=(9, 6), tight_layout=True)
    return fig, fig.subplots(1, 1)


def _finish(fig, ax, file, xlabel, ylabel, title):
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")
    ax.set_title(title)
    fig.savefig(file, dpi=250)


def _plot_pr_curve(px, curves, ap, file, labels):
    """Precision-recall curve at IoU 0.5 for each class with predictions, and their mean."""
    try:
        fig, ax = _new_axes()
        if curves:
            stacked = np.stack(list(curves.values()), 1)
            if len(labels) < 21:
                for ci, y in curves.items():
                    ax.plot(px, y, linewidth=1, label=f"{labels[ci]} {ap[ci, 0]:.3f}")
            else:
                ax.plot(px, stacked, linewidth=1, color="grey")
            ax.plot(px, stacked.mean(1), linewidth=3, color="blue", label=f"all classes {ap[:, 0].mean():.3f} mAP@0.5")
        _finish(fig, ax, file, "Recall", "Precision", "Precision-Recall Curve")
    except Exception as e:
        LOGGER.warning(f"WARNING ⚠️ {Path(file).name} plot failure: {e}")


def _plot_metric_curve(px, py, file, labels, xlabel="Confidence", ylabel="Metric"):
    """A metric against confidence for each class, plus the smoothed mean and where it peaks."""
    try:
        fig, ax = _new_axes()
        if len(labels) < 21:
            for label, y in zip(labels, py):
                ax.plot(px, y, linewidth=1, label=label)
        else:
            ax.plot(px, py.T, linewidth=1, color="grey")
        y = smooth(py.mean(0), 0.05)
        ax.plot(px, y, linewidth=3, color="blue", label=f"all classes {y.max():.2f} at {px[y.argmax()]:.3f}")
        _finish(fig, ax, file, xlabel, ylabel, f"{ylabel}-Confidence Curve")
    except Exception as e:
        LOGGER.warning(f"WARNING ⚠️ {Path(file).name} plot failure: {e}")
