"""YOLOv5 v7.0 training loss: CIoU box loss, IoU-aware objectness, BCE classification, anchor/cell assignment.

The numbers must reproduce upstream's ComputeLoss (to ~1e-5), so the target assignment keeps upstream's rules and
even its order of targets (which decides the winner when two targets write the same objectness cell).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from utils.general import UserError
from utils.metrics import bbox_iou
from utils.torch_utils import de_parallel

REQUIRED_HYP = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "fl_gamma")

# Cell offsets (in cells) for the centre cell and its 4 neighbours: the target is also assigned to the neighbour
# on the side of the cell its centre is closer to (left/up when the fractional part < 0.5, right/down otherwise).
_NEIGHBOUR_OFFSETS = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
_NEIGHBOUR_BIAS = 0.5


def smooth_BCE(eps=0.1):
    """Label smoothing targets (positive, negative) for BCE, https://arxiv.org/abs/1902.04103 eq. 3."""
    return 1.0 - 0.5 * eps, 0.5 * eps


class _ModulatedBCE(nn.Module):
    """Wraps an nn.BCEWithLogitsLoss; subclasses weight its element-wise loss, then the wrapped reduction applies."""

    def __init__(self, loss_fcn, gamma=1.5, alpha=0.25):
        super().__init__()
        self.loss_fcn = loss_fcn
        self.gamma = gamma
        self.alpha = alpha
        self.reduction = loss_fcn.reduction
        self.loss_fcn.reduction = "none"  # we need the per-element loss

    def weight(self, prob, true):
        raise NotImplementedError

    def forward(self, pred, true):
        loss = self.loss_fcn(pred, true)
        loss = loss * self.weight(torch.sigmoid(pred), true)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


class FocalLoss(_ModulatedBCE):
    """Focal loss (https://arxiv.org/abs/1708.02002): BCE * alpha_t * (1 - p_t)^gamma."""

    def weight(self, prob, true):
        p_t = true * prob + (1 - true) * (1 - prob)
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        return alpha_t * (1.0 - p_t) ** self.gamma


class QFocalLoss(_ModulatedBCE):
    """Quality focal loss (https://arxiv.org/abs/2006.04388): BCE * alpha_t * |true - p|^gamma."""

    def weight(self, prob, true):
        alpha_t = true * self.alpha + (1 - true) * (1 - self.alpha)
        return alpha_t * (true - prob).abs() ** self.gamma


class ComputeLoss:
    """Loss of a YOLOv5 DetectionModel; gains and anchor threshold come from `model.hyp`."""

    sort_obj_iou = False  # when True, the highest IoU wins a shared objectness cell

    def __init__(self, model, autobalance=False):
        device = next(model.parameters()).device
        h = getattr(model, "hyp", None)
        if not isinstance(h, dict):
            raise UserError("model.hyp: not set, pass a hyperparameter yaml with --hyp "
                            "(e.g. data/hyps/hyp.scratch-low.yaml)")
        missing = [k for k in REQUIRED_HYP if k not in h]
        if missing:
            raise UserError(f"hyp: missing keys {missing}, add them to the --hyp yaml "
                            "(see data/hyps/hyp.scratch-low.yaml)")

        bce_cls = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["cls_pw"]], device=device))
        bce_obj = nn.BCEWithLogitsLoss(pos_weight=torch.tensor([h["obj_pw"]], device=device))
        if h["fl_gamma"] > 0:
            bce_cls, bce_obj = FocalLoss(bce_cls, h["fl_gamma"]), FocalLoss(bce_obj, h["fl_gamma"])
        self.BCEcls, self.BCEobj = bce_cls, bce_obj
        self.cp, self.cn = smooth_BCE(eps=h.get("label_smoothing", 0.0))

        det = de_parallel(model).model[-1]  # Detect
        self.na, self.nc, self.nl = det.na, det.nc, det.nl
        self.anchors = det.anchors  # (nl, na, 2) in grid cells of each level
        self.balance = {3: [4.0, 1.0, 0.4]}.get(self.nl, [4.0, 1.0, 0.25, 0.06, 0.02])  # objectness weight per level
        self.ssi = [float(s) for s in det.stride].index(16.0) if autobalance else 0
        self.gr = 1.0  # objectness target = (1 - gr) + gr * IoU
        self.hyp = h
        self.autobalance = autobalance
        self.device = device

    def __call__(self, p, targets):
        """p: list of nl raw head outputs (bs, na, ny, nx, nc+5); targets (nt,6) image, class, x, y, w, h normalised.

        Returns (total loss * batch size, shape (1,)) and the detached (box, obj, cls) components, shape (3,).
        """
        lbox = torch.zeros(1, device=self.device)
        lobj = torch.zeros(1, device=self.device)
        lcls = torch.zeros(1, device=self.device)
        tcls, tbox, indices, anchors = self.build_targets(p, targets)

        for i, pi in enumerate(p):
            b, a, gj, gi = indices[i]
            tobj = torch.zeros(pi.shape[:4], dtype=pi.dtype, device=self.device)
            n = b.shape[0]
            if n:
                ps = pi[b, a, gj, gi]  # (n, nc+5) predictions at the assigned anchors/cells
                pxy = ps[:, :2].sigmoid() * 2 - 0.5  # centre offset within (-0.5, 1.5) of the cell
                pwh = (ps[:, 2:4].sigmoid() * 2) ** 2 * anchors[i]  # (0, 4) x anchor
                iou = bbox_iou(torch.cat((pxy, pwh), 1), tbox[i], CIoU=True).squeeze()
                lbox += (1.0 - iou).mean()

                score = iou.detach().clamp(0).type(tobj.dtype)  # objectness target: how well the box fits
                if self.sort_obj_iou:
                    order = score.argsort()
                    b, a, gj, gi, score = b[order], a[order], gj[order], gi[order], score[order]
                if self.gr < 1:
                    score = (1.0 - self.gr) + self.gr * score
                tobj[b, a, gj, gi] = score  # on a shared cell the last write wins, as upstream

                if self.nc > 1:  # a single class needs no class loss
                    t = torch.full_like(ps[:, 5:], self.cn)
                    t[torch.arange(n, device=t.device), tcls[i]] = self.cp
                    lcls += self.BCEcls(ps[:, 5:], t)

            obji = self.BCEobj(pi[..., 4], tobj)
            lobj += obji * self.balance[i]
            if self.autobalance:
                self.balance[i] = self.balance[i] * 0.9999 + 0.0001 / obji.detach().item()

        if self.autobalance:
            self.balance = [x / self.balance[self.ssi] for x in self.balance]
        lbox *= self.hyp["box"]
        lobj *= self.hyp["obj"]
        lcls *= self.hyp["cls"]
        bs = tobj.shape[0]
        return (lbox + lobj + lcls) * bs, torch.cat((lbox, lobj, lcls)).detach()

    def build_targets(self, p, targets):
        """Assign each target to anchors and cells of every level.

        A target goes to every anchor whose width and height ratios to it are both within anchor_t (in either
        direction), in the cell containing its centre and in up to two neighbour cells (the horizontally and
        vertically nearer ones, when the centre lies in the near half and not in the border cell).
        Per level returns tcls (n,), tbox (n,4) xywh with xy relative to the assigned cell, indices
        (image, anchor, gy, gx) and the anchors (n,2), all in grid units. Order: offset, then anchor, then target.
        """
        na, nt = self.na, targets.shape[0]
        tcls, tbox, indices, anch = [], [], [], []
        anchor_idx = torch.arange(na, device=self.device, dtype=targets.dtype).view(na, 1, 1).expand(na, nt, 1)
        per_anchor = torch.cat((targets[None].expand(na, nt, 6), anchor_idx), 2)  # (na, nt, 7)
        offsets_table = _NEIGHBOUR_OFFSETS.to(self.device, targets.dtype) * _NEIGHBOUR_BIAS
        g = _NEIGHBOUR_BIAS

        for i in range(self.nl):
            anchors = self.anchors[i]
            ny, nx = p[i].shape[2], p[i].shape[3]
            gain = torch.tensor([1, 1, nx, ny, nx, ny, 1], device=self.device, dtype=targets.dtype)
            t = per_anchor * gain  # boxes in grid units of this level
            if nt:
                ratio = t[..., 4:6] / anchors[:, None]
                t = t[torch.max(ratio, 1 / ratio).max(2).values < self.hyp["anchor_t"]]  # (n, 7)

                gxy = t[:, 2:4]
                gxy_inv = gain[[2, 3]] - gxy  # distance to the right/bottom edge
                near_low = (gxy % 1 < g) & (gxy > 1)  # also use the cell to the left (x) / above (y)
                near_high = (gxy_inv % 1 < g) & (gxy_inv > 1)  # also use the cell to the right / below
                use = torch.cat((torch.ones_like(near_low[:, :1]), near_low, near_high), 1).T  # (5, n)
                t = t[None].expand(5, -1, -1)[use]
                offsets = offsets_table[:, None].expand(5, gxy.shape[0], 2)[use]
            else:
                t = per_anchor[0]
                offsets = torch.zeros_like(t[:, 2:4])

            img, cls = t[:, 0].long(), t[:, 1].long()
            gxy, gwh, a = t[:, 2:4], t[:, 4:6], t[:, 6].long()
            cell = (gxy - offsets).long()
            cell[:, 0].clamp_(0, nx - 1)
            cell[:, 1].clamp_(0, ny - 1)  # clamped before tbox: upstream's in-place clamp also moves tbox
            indices.append((img, a, cell[:, 1], cell[:, 0]))
            tbox.append(torch.cat((gxy - cell, gwh), 1))
            anch.append(anchors[a])
            tcls.append(cls)
        return tcls, tbox, indices, anch
