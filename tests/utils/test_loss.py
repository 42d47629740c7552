"""utils/loss.py: target assignment and loss components checked against hand computation."""
import math

import pytest
import torch
import torch.nn as nn

from utils.general import UserError
from utils.loss import ComputeLoss, FocalLoss, QFocalLoss, smooth_BCE

torch.set_num_threads(1)

ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]  # yolov5 P3-P5
HYP = dict(box=0.05, cls=0.5, cls_pw=1.0, obj=1.0, obj_pw=1.0, anchor_t=4.0, fl_gamma=0.0, label_smoothing=0.0)


class FakeDetect(nn.Module):
    def __init__(self, nc):
        super().__init__()
        self.nc, self.nl, self.na = nc, 3, 3
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.register_buffer("anchors", torch.tensor(ANCHORS_PX).float().view(3, 3, 2) / self.stride.view(-1, 1, 1))
        self.conv = nn.Conv2d(1, 1, 1)  # gives the model a parameter (device)


class FakeModel(nn.Module):
    def __init__(self, nc=2, **hyp):
        super().__init__()
        self.model = nn.ModuleList([nn.Identity(), FakeDetect(nc)])
        self.hyp = {**HYP, **hyp}


def head_outputs(bs, nc, img=64, fill=0.0):
    """Raw head outputs for an img x img input: levels of 8, 16, 32 px cells."""
    return [torch.full((bs, 3, img // s, img // s, nc + 5), fill) for s in (8, 16, 32)]


def ciou_xywh(p, t):
    """CIoU of two (x, y, w, h) boxes, from the definition (eps-free)."""
    (px, py, pw, ph), (tx, ty, tw, th) = p, t
    iw = max(0.0, min(px + pw / 2, tx + tw / 2) - max(px - pw / 2, tx - tw / 2))
    ih = max(0.0, min(py + ph / 2, ty + th / 2) - max(py - ph / 2, ty - th / 2))
    inter = iw * ih
    iou = inter / (pw * ph + tw * th - inter)
    cw = max(px + pw / 2, tx + tw / 2) - min(px - pw / 2, tx - tw / 2)
    ch = max(py + ph / 2, ty + th / 2) - min(py - ph / 2, ty - th / 2)
    rho2 = (px - tx) ** 2 + (py - ty) ** 2
    v = 4 / math.pi**2 * (math.atan(tw / th) - math.atan(pw / ph)) ** 2
    alpha = v / (v - iou + 1)
    return iou - rho2 / (cw**2 + ch**2) - alpha * v


# One object on a 64x64 image: centre (19.2, 35.2) px, 16 x 12.8 px, class 1
ONE = torch.tensor([[0, 1, 0.3, 0.55, 0.25, 0.2]])
# Level 0 (8 px cells, 8x8): centre (2.4, 4.4) cells, size (2, 1.6). Anchors (1.25,1.625) (2,3.75) (4.125,2.875):
#   worst ratios 1.6, 2.34, 2.06, all < 4 -> all 3 anchors. Fractions .4,.4 < .5 and centre > 1 cell from the
#   left/top -> also the left cell (1,4) and the upper cell (2,3); right/bottom fractions .6 -> no.
# Level 1 (16 px, 4x4): centre (1.2, 2.2), size (1, .8). Anchors (1.875,3.8125) (3.875,2.8125) (3.6875,7.4375):
#   worst ratios 4.77, 3.875, 9.3 -> anchor 1 only; fractions .2,.2 -> left (0,2) and upper (1,1) cells.
# Level 2 (32 px, 2x2): size (.5, .4) vs anchors >= 2.8 cells: ratios > 4 -> nothing.
EXPECTED = {
    0: dict(cells=[(2, 4), (1, 4), (2, 3)], anchors=[0, 1, 2], xy=[(0.4, 0.4), (1.4, 0.4), (0.4, 1.4)], wh=(2.0, 1.6)),
    1: dict(cells=[(1, 2), (0, 2), (1, 1)], anchors=[1], xy=[(0.2, 0.2), (1.2, 0.2), (0.2, 1.2)], wh=(1.0, 0.8)),
}


def test_build_targets_one_object_by_hand():
    loss = ComputeLoss(FakeModel(nc=2))
    tcls, tbox, indices, anch = loss.build_targets(head_outputs(1, 2), ONE)
    assert [len(t) for t in tcls] == [9, 3, 0]
    for level, exp in EXPECTED.items():
        b, a, gj, gi = (x.tolist() for x in indices[level])
        # order: cell offset (centre, left, up), then anchor
        want = [(gx, gy, ai) for (gx, gy) in exp["cells"] for ai in exp["anchors"]]
        assert list(zip(gi, gj, a)) == want
        assert b == [0] * len(want) and tcls[level].tolist() == [1] * len(want)
        want_box = [(*xy, *exp["wh"]) for xy in exp["xy"] for _ in exp["anchors"]]
        assert torch.allclose(tbox[level], torch.tensor(want_box), atol=1e-5)
        assert torch.allclose(anch[level], loss.anchors[level][a])


def test_build_targets_neighbours_right_below_and_border():
    loss = ComputeLoss(FakeModel(nc=2))
    # level 0: centre (2.7, 4.6) cells -> fractions >= .5: right cell (3,4) and lower cell (2,5)
    # size 2 x 1.6 cells (16 x 12.8 px) as before, so all three anchors of level 0
    t = torch.tensor([[0, 0, 2.7 / 8, 4.6 / 8, 0.25, 0.2]])
    _, tbox, indices, _ = loss.build_targets(head_outputs(1, 2), t)
    b, a, gj, gi = indices[0]
    assert sorted(set(zip(gi.tolist(), gj.tolist()))) == [(2, 4), (2, 5), (3, 4)]
    # centre in the first cell column (x = 0.3 cells): no left neighbour even though the fraction is < .5
    t = torch.tensor([[0, 0, 0.3 / 8, 4.6 / 8, 0.25, 0.2]])
    _, _, indices, _ = loss.build_targets(head_outputs(1, 2), t)
    assert sorted(set(zip(indices[0][3].tolist(), indices[0][2].tolist()))) == [(0, 4), (0, 5)]
    # centre exactly on the right edge (x = 1.0): the cell index is clamped to the last column, and the box
    # offset is taken relative to that clamped cell (x = 1.0), as upstream does
    t = torch.tensor([[0, 0, 1.0, 0.5, 0.25, 0.2]])
    _, tbox, indices, _ = loss.build_targets(head_outputs(1, 2), t)
    assert indices[0][3].max().item() == 7
    assert tbox[0][0, 0].item() == pytest.approx(1.0)


def test_build_targets_no_targets():
    loss = ComputeLoss(FakeModel(nc=2))
    tcls, tbox, indices, anch = loss.build_targets(head_outputs(2, 2), torch.zeros((0, 6)))
    assert all(len(t) == 0 for t in tcls) and all(tb.shape == (0, 4) for tb in tbox)


def test_loss_components_by_hand():
    """Box/class logits 0 and objectness logits 1 everywhere: every term follows from the assignment above.

    With xywh logits 0 the predicted box of a cell is (0.5, 0.5, anchor) in cell units. BCE(logit 0, t) = log 2
    for any t; BCE(logit 1, t) = log(1 + e) - t, so each level's objectness loss is log(1 + e) - sum(tobj)/cells.
    """
    nc = 2
    loss = ComputeLoss(FakeModel(nc=nc))
    p = head_outputs(1, nc)
    for pi in p:
        pi[..., 4] = 1.0
    total, parts = loss(p, ONE)

    anchors = loss.anchors
    ciou = {}
    for level, exp in EXPECTED.items():
        ciou[level] = [ciou_xywh((0.5, 0.5, *anchors[level][ai].tolist()), (*xy, *exp["wh"]))
                       for xy in exp["xy"] for ai in exp["anchors"]]
    lbox = HYP["box"] * sum(sum(1 - c for c in ciou[lv]) / len(ciou[lv]) for lv in ciou)
    softplus1 = math.log(1 + math.e)
    cells = [3 * 8 * 8, 3 * 4 * 4, 3 * 2 * 2]
    tobj_sum = [sum(max(c, 0.0) for c in ciou.get(lv, [])) for lv in range(3)]
    lobj = HYP["obj"] * sum(w * (softplus1 - s / n) for w, s, n in zip([4.0, 1.0, 0.4], tobj_sum, cells))
    lcls = HYP["cls"] * 2 * math.log(2)  # two levels with targets, each a mean BCE of log 2

    assert parts.tolist() == pytest.approx([lbox, lobj, lcls], abs=1e-6)
    assert total.shape == (1,)
    assert total.item() == pytest.approx(lbox + lobj + lcls, abs=1e-6)  # times batch size 1


def test_loss_scales_with_batch_and_single_class_has_no_cls_loss():
    p = head_outputs(2, 1, fill=0.3)
    t = torch.tensor([[0, 0, 0.3, 0.55, 0.25, 0.2], [1, 0, 0.6, 0.4, 0.5, 0.5]])
    total, parts = ComputeLoss(FakeModel(nc=1))(p, t)
    assert parts[2].item() == 0.0 and parts[0].item() > 0 and parts[1].item() > 0
    assert total.item() == pytest.approx(2 * parts.sum().item(), rel=1e-6)
    # no targets: only objectness, all cells pushed to 0: softplus(0.3) weighted by the level balance
    total, parts = ComputeLoss(FakeModel(nc=1))(p, torch.zeros((0, 6)))
    assert parts.tolist() == pytest.approx([0.0, 5.4 * math.log(1 + math.exp(0.3)), 0.0], abs=1e-6)


def test_loss_gradient_reaches_predictions():
    p = [x.requires_grad_() for x in head_outputs(1, 3, fill=0.1)]
    total, _ = ComputeLoss(FakeModel(nc=3))(p, ONE)
    total.backward()
    cell = p[0].grad[0, 0, 4, 2]  # level 0, anchor 0, gy 4, gx 2: an assigned prediction
    assert cell[:4].abs().sum() > 0 and cell[5:].abs().sum() > 0
    assert p[0].grad[0, 0, 0, 7, :4].abs().sum() == 0  # unassigned: no box gradient


def test_label_smoothing_and_focal_losses():
    assert smooth_BCE(0.1) == pytest.approx((0.95, 0.05))
    loss = ComputeLoss(FakeModel(nc=2, label_smoothing=0.2))
    assert (loss.cp, loss.cn) == pytest.approx((0.9, 0.1))

    pred, true = torch.tensor([0.0, 2.0]), torch.tensor([1.0, 0.0])
    bce = nn.functional.binary_cross_entropy_with_logits(pred, true, reduction="none")
    p1 = 1 / (1 + math.exp(-2.0))
    # focal: alpha_t (0.25 for positives, 0.75 for negatives) * (1 - p_t)^gamma, p_t = 0.5 and 1 - p1
    fl = FocalLoss(nn.BCEWithLogitsLoss(), gamma=2.0, alpha=0.25)(pred, true)
    assert fl.item() == pytest.approx(((bce[0] * 0.25 * 0.25) + bce[1] * 0.75 * p1**2).item() / 2, rel=1e-6)
    qfl = QFocalLoss(nn.BCEWithLogitsLoss(reduction="sum"), gamma=1.5, alpha=0.25)(pred, true)
    assert qfl.item() == pytest.approx((bce[0] * 0.25 * 0.5**1.5 + bce[1] * 0.75 * p1**1.5).item(), rel=1e-6)
    assert isinstance(ComputeLoss(FakeModel(nc=2, fl_gamma=1.5)).BCEobj, FocalLoss)


def test_missing_hyp_is_a_user_error():
    model = FakeModel()
    del model.hyp["anchor_t"]
    with pytest.raises(UserError, match="anchor_t"):
        ComputeLoss(model)


def test_autobalance_updates_level_weights():
    loss = ComputeLoss(FakeModel(nc=2), autobalance=True)
    assert loss.ssi == 1
    loss(head_outputs(1, 2, fill=0.5), ONE)
    assert loss.balance[1] == pytest.approx(1.0)  # renormalised to the stride-16 level
    assert loss.balance != [4.0, 1.0, 0.4]


def test_with_detection_model():
    yolo = pytest.importorskip("models.yolo")
    model = yolo.DetectionModel("yolov5n.yaml", nc=3)
    model.hyp = dict(HYP)
    model.train()
    p = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert [tuple(x.shape) for x in p] == [(1, 3, 8, 8, 8), (1, 3, 4, 4, 8), (1, 3, 2, 2, 8)]
    loss = ComputeLoss(model)
    _, _, indices, _ = loss.build_targets(p, ONE)
    fake = ComputeLoss(FakeModel(nc=3))
    _, _, fake_indices, _ = fake.build_targets(p, ONE)
    for ours, theirs in zip(indices, fake_indices):  # the yaml's anchors and strides give the same assignment
        assert all(torch.equal(x, y) for x, y in zip(ours, theirs))
    total, parts = loss(p, ONE)
    total.backward()
    assert torch.isfinite(parts).all()
    assert model.model[-1].m[0].weight.grad.abs().sum() > 0
