"""utils/metrics.py against numbers derived by hand (YOLOv5 v7.0 semantics)."""
import math

import numpy as np
import pytest
import torch

from utils.metrics import (
    ConfusionMatrix,
    ap_per_class,
    bbox_ioa,
    bbox_iou,
    box_iou,
    compute_ap,
    fitness,
    process_batch,
    smooth,
)

torch.set_num_threads(1)
IOUV = torch.linspace(0.5, 0.95, 10)
# Upstream's 101-point AP of a perfect PR curve: the recall sentinel (1.0, precision 0) makes the last
# interpolated point 0, so the trapezoid loses half of the last 0.01 step. YOLOv5 reports 0.995 for perfect.
PERFECT_AP = 0.995


# --- IoU --------------------------------------------------------------------------------------------------------------

def test_box_iou_pairwise():
    a = torch.tensor([[0.0, 0, 2, 2], [10, 10, 12, 14]])
    b = torch.tensor([[1.0, 1, 3, 3], [2, 2, 4, 4], [0, 0, 2, 2]])
    iou = box_iou(a, b)
    assert iou.shape == (2, 3)
    # [0,0,2,2] vs [1,1,3,3]: intersection 1, union 4 + 4 - 1 = 7; touching corner -> 0; itself -> 1
    assert iou[0].tolist() == pytest.approx([1 / 7, 0.0, 1.0], abs=1e-6)
    assert iou[1].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)


def test_bbox_iou_variants_xyxy():
    a = torch.tensor([[0.0, 0, 2, 2]])
    b = torch.tensor([[1.0, 1, 3, 3]])
    assert bbox_iou(a, b, xywh=False).item() == pytest.approx(1 / 7, abs=1e-6)
    # enclosing box [0,0,3,3] area 9, union 7: 1/7 - 2/9
    assert bbox_iou(a, b, xywh=False, GIoU=True).item() == pytest.approx(-5 / 63, abs=1e-6)
    # centres (1,1),(2,2): rho^2 = 2; enclosing diagonal^2 = 18: 1/7 - 1/9
    assert bbox_iou(a, b, xywh=False, DIoU=True).item() == pytest.approx(2 / 63, abs=1e-6)
    # same aspect ratio: v = 0, CIoU = DIoU
    assert bbox_iou(a, b, xywh=False, CIoU=True).item() == pytest.approx(2 / 63, abs=1e-6)


def test_bbox_iou_ciou_aspect_term_and_xywh():
    # concentric 2x2 square and 4x2 box: IoU = 4/8, rho = 0, only the aspect term remains
    a = torch.tensor([[0.0, 0, 2, 2]])  # xywh
    b = torch.tensor([[0.0, 0, 4, 2]])
    v = 4 / math.pi**2 * (math.atan(4 / 2) - math.atan(2 / 2)) ** 2
    alpha = v / (v - 0.5 + 1)
    assert bbox_iou(a, b).item() == pytest.approx(0.5, abs=1e-6)
    assert bbox_iou(a, b, CIoU=True).item() == pytest.approx(0.5 - alpha * v, abs=1e-6)
    # same boxes as xyxy give the same answers
    a_xyxy, b_xyxy = torch.tensor([[-1.0, -1, 1, 1]]), torch.tensor([[-2.0, -1, 2, 1]])
    assert bbox_iou(a_xyxy, b_xyxy, xywh=False, CIoU=True).item() == pytest.approx(0.5 - alpha * v, abs=1e-6)


def test_bbox_iou_broadcast_and_alpha_has_no_gradient():
    box1 = torch.tensor([[1.0, 1.0, 2.0, 2.0]], requires_grad=True)  # xywh
    box2 = torch.tensor([[1.0, 1.0, 2.0, 2.0], [1.5, 1.0, 2.0, 2.0], [1.0, 1.0, 1.0, 3.0]])
    out = bbox_iou(box1, box2, CIoU=True)
    assert out.shape == (3, 1)
    assert out[0].item() == pytest.approx(1.0, abs=1e-6)
    # box 2: shifted by 0.5 in x -> IoU = 1.5*2 / (4+4-3) = 0.6; enclosing 2.5 x 2 -> rho^2/c^2 = 0.25/10.25
    assert out[1].item() == pytest.approx(0.6 - 0.25 / 10.25, abs=1e-6)

    # gradient of CIoU treats alpha as a constant: compare with the formula written out, alpha detached
    out[2].sum().backward()
    x = torch.tensor([1.0, 1.0, 2.0, 2.0], requires_grad=True)
    w1, h1, w2, h2 = x[2], x[3], 1.0, 3.0
    inter = torch.minimum(x[0] + w1 / 2, torch.tensor(1.5)) - torch.maximum(x[0] - w1 / 2, torch.tensor(0.5))
    inter = inter * (torch.minimum(x[1] + h1 / 2, torch.tensor(2.5)) - torch.maximum(x[1] - h1 / 2, torch.tensor(-0.5)))
    iou = inter / (w1 * h1 + w2 * h2 - inter)
    cw = torch.maximum(x[0] + w1 / 2, torch.tensor(1.5)) - torch.minimum(x[0] - w1 / 2, torch.tensor(0.5))
    ch = torch.maximum(x[1] + h1 / 2, torch.tensor(2.5)) - torch.minimum(x[1] - h1 / 2, torch.tensor(-0.5))
    rho2 = (x[0] - 1.0) ** 2 + (x[1] - 1.0) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / h2) - torch.atan(w1 / h1)) ** 2
    alpha = (v / (v - iou + 1)).detach()
    (iou - rho2 / (cw**2 + ch**2) - alpha * v).backward()
    assert torch.allclose(box1.grad[0], x.grad, atol=1e-5)


def test_bbox_ioa():
    box = np.array([0.0, 0, 10, 10])
    others = np.array([[5.0, 5, 15, 15], [0, 0, 5, 5], [20, 20, 30, 30]])
    assert bbox_ioa(box, others) == pytest.approx([0.25, 1.0, 0.0], abs=1e-6)


# --- AP ---------------------------------------------------------------------------------------------------------------

def test_compute_ap_known_curves():
    assert compute_ap(np.array([0.5, 1.0]), np.array([1.0, 1.0]))[0] == pytest.approx(PERFECT_AP, abs=1e-9)
    # 3 labels; ranked detections TP, FP, TP, TP. Envelope: 1 up to recall 1/3, then 0.75 up to recall 1, then the
    # sentinel 0 at x=1. Grid points 0..0.33 -> 1 (34 points), 0.34..0.99 -> 0.75 (66), 1.0 -> 0.
    # trapezoid = 0.01 * (34 + 66 * 0.75 - (1 + 0) / 2) = 0.83
    recall = np.array([1, 1, 2, 3]) / 3
    precision = np.array([1, 1 / 2, 2 / 3, 3 / 4])
    ap, mpre, mrec = compute_ap(recall, precision)
    assert ap == pytest.approx(0.83, abs=1e-9)
    assert mpre.tolist() == pytest.approx([1, 1, 0.75, 0.75, 0.75, 0])
    assert mrec.tolist() == pytest.approx([0, 1 / 3, 1 / 3, 2 / 3, 1, 1])
    # 3 labels, two perfect detections: precision 1 to recall 2/3, then linear to 0 at recall 1.
    # [0, .66]: 0.66; [.66, .67] trapezoid (1 + 0.99) / 2 * 0.01; [.67, 1]: 1.5 * 0.33^2
    ap = compute_ap(np.array([1 / 3, 2 / 3]), np.array([1.0, 1.0]))[0]
    assert ap == pytest.approx(0.66 + 0.00995 + 1.5 * 0.33**2, abs=1e-9)


def test_smooth_box_filter():
    y = np.zeros(1000)
    y[500:] = 1.0
    ys = smooth(y, 0.1)  # window 101: index 500 sees 51 ones
    assert ys.shape == (1000,)
    assert ys[500] == pytest.approx(51 / 101)
    assert ys[0] == 0 and ys[-1] == pytest.approx(1.0)
    assert smooth(np.full(1000, 0.3), 0.05) == pytest.approx(np.full(1000, 0.3))


def test_fitness():
    assert fitness(np.array([[0.5, 0.6, 0.7, 0.4, 9.0]])) == pytest.approx([0.1 * 0.7 + 0.9 * 0.4])
    assert fitness(np.array([[1, 1, 0, 0], [0, 0, 1, 1]])).tolist() == pytest.approx([0.0, 1.0])


def _labels():
    # (cls, xyxy) for two images' worth of objects, classes 0 and 1
    return torch.tensor([[0, 10, 10, 60, 60], [0, 100, 100, 200, 180], [1, 20, 150, 80, 230], [1, 300, 40, 400, 90.0]])


def _stats(detections, labels):
    correct = process_batch(detections, labels, IOUV)
    return correct.numpy(), detections[:, 4].numpy(), detections[:, 5].numpy(), labels[:, 0].numpy()


def test_ground_truth_as_predictions_is_perfect():
    labels = _labels()
    conf = torch.tensor([0.9, 0.8, 0.7, 0.6])
    detections = torch.cat((labels[:, 1:], conf[:, None], labels[:, :1]), 1)
    tp, fp, p, r, f1, ap, classes = ap_per_class(*_stats(detections, labels))
    assert classes.tolist() == [0, 1]
    assert ap == pytest.approx(np.full((2, 10), PERFECT_AP))
    assert p.tolist() == [1.0, 1.0] and r == pytest.approx([1.0, 1.0])
    assert tp.tolist() == [2, 2] and fp.tolist() == [0, 0]


def test_shifted_box_counts_only_up_to_its_iou():
    labels = torch.tensor([[0, 0, 0, 100, 100.0]])
    detections = torch.tensor([[0, 0, 100, 72, 0.9, 0]])  # IoU 0.72: correct at 0.50, 0.55, ..., 0.70 only
    correct, conf, pcls, tcls = _stats(detections, labels)
    assert correct[0].tolist() == [True] * 5 + [False] * 5
    _, _, p, r, _, ap, _ = ap_per_class(correct, conf, pcls, tcls)
    assert ap[0, 0] == pytest.approx(PERFECT_AP)  # mAP50
    assert ap[0].mean() == pytest.approx(PERFECT_AP * 5 / 10)  # mAP50-95


def test_empty_predictions_give_zero():
    tcls = np.array([0, 0, 1])
    tp, fp, p, r, f1, ap, classes = ap_per_class(np.zeros((0, 10), bool), np.zeros(0), np.zeros(0), tcls)
    assert classes.tolist() == [0, 1]
    assert ap.shape == (2, 10) and not ap.any()
    assert not p.any() and not r.any() and not tp.any()
    # no labels at all: nothing to report
    out = ap_per_class(np.ones((2, 10), bool), np.array([0.5, 0.4]), np.array([0, 0]), np.zeros(0))
    assert out[5].shape == (0, 10) and out[6].shape == (0,)


def test_ap_per_class_ranked_detections_and_operating_point(tmp_path):
    # class 0: 3 labels, detections ranked TP, FP, TP, TP -> AP 0.83 (see test_compute_ap_known_curves).
    # Below conf 0.6 precision is 3/4 and recall 1 -> F1 = 6/7 is the maximum of the (smoothed) mean F1.
    # class 1: 1 label, no prediction -> AP 0 and P = R = 0.
    conf = np.array([0.6, 0.9, 0.8, 0.7])  # unsorted on purpose
    tp = np.array([[1], [1], [0], [1]], dtype=bool)  # sorted by conf: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 TP
    tpn, fpn, p, r, f1, ap, classes = ap_per_class(tp, conf, np.zeros(4), np.array([0, 0, 0, 1]), plot=True,
                                                   save_dir=tmp_path, names={0: "circle", 1: "square"})
    assert ap[:, 0] == pytest.approx([0.83, 0.0])
    assert p == pytest.approx([0.75, 0.0]) and r == pytest.approx([1.0, 0.0])
    assert f1[0] == pytest.approx(6 / 7)
    assert tpn.tolist() == [3, 0] and fpn.tolist() == [1, 0]
    for name in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png"):
        assert (tmp_path / name).stat().st_size > 1000


# --- val matching -----------------------------------------------------------------------------------------------------

def test_process_batch_one_to_one_matching():
    labels = torch.tensor([[0, 0, 0, 100, 100.0]])
    # two detections of the same object: det0 (higher conf) IoU 0.62, det1 IoU 0.88
    detections = torch.tensor([[0, 0, 100, 62, 0.9, 0], [0, 0, 100, 88, 0.8, 0], [0, 0, 100, 100, 0.7, 1]])
    correct = process_batch(detections, labels, IOUV)
    assert correct.dtype == torch.bool and correct.shape == (3, 10)
    # thresholds .50 .55 .60: both qualify; each label goes to the first (most confident) claimant -> det0
    # .65 ... .85: only det1 qualifies; .90, .95: neither. det2 has the wrong class: never correct.
    assert correct[0].tolist() == [True] * 3 + [False] * 7
    assert correct[1].tolist() == [False] * 3 + [True] * 5 + [False] * 2
    assert not correct[2].any()


def test_process_batch_detection_takes_its_best_label():
    labels = torch.tensor([[0, 0, 0, 100, 100.0], [0, 0, 0, 100, 60]])
    # det0 overlaps label0 with IoU 0.82 and label1 with IoU 0.6/0.82 = 0.73 -> takes label0;
    # det1 equals label1 (IoU 1; 0.6 with label0)
    detections = torch.tensor([[0, 0, 100, 82, 0.9, 0], [0, 0, 100, 60, 0.8, 0]])
    correct = process_batch(detections, labels, IOUV)
    assert correct[0].tolist() == [True] * 7 + [False] * 3  # IoU 0.82 >= .50 ... .80
    assert correct[1].all()
    assert not process_batch(torch.zeros((0, 6)), labels, IOUV).any()
    assert process_batch(detections, torch.zeros((0, 5)), IOUV).shape == (2, 10)


# --- confusion matrix -------------------------------------------------------------------------------------------------

def test_confusion_matrix_counts(tmp_path, capsys):
    cm = ConfusionMatrix(nc=2, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([[0, 0, 0, 10, 10], [1, 20, 20, 30, 30], [1, 50, 50, 60, 60.0]])
    detections = torch.tensor([
        [0, 0, 10, 10, 0.9, 0],  # on label 0, right class
        [20, 20, 30, 29, 0.8, 0],  # on label 1 (true 1), predicted 0
        [80, 80, 90, 90, 0.7, 1],  # nothing there: background false positive
        [50, 50, 60, 60, 0.1, 1],  # below conf: ignored, so label 2 is missed
    ])
    cm.process_batch(detections, labels)
    expected = np.array([[1, 1, 0], [0, 0, 1], [0, 1, 0]])  # rows predicted, cols true, last = background
    assert cm.matrix.tolist() == expected.tolist()
    tp, fp = cm.tp_fp()
    assert tp.tolist() == [1, 0] and fp.tolist() == [1, 1]

    cm.process_batch(None, torch.tensor([0, 1]))  # image without detections: both labels missed
    assert cm.matrix[2].tolist() == [1, 2, 0]
    cm.process_batch(torch.tensor([[0, 0, 5, 5, 0.9, 1]]), torch.tensor([[0, 50, 50, 60, 60.0]]))  # nothing matches
    assert cm.matrix[1, 2] == 2 and cm.matrix[2, 0] == 2

    cm.plot(save_dir=tmp_path, names={0: "circle", 1: "square"})
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 1000
    cm.print()
    assert capsys.readouterr().out.splitlines()[0] == "1.0 1.0 0.0"


def test_confusion_matrix_one_to_one():
    cm = ConfusionMatrix(nc=1, conf=0.25, iou_thres=0.45)
    labels = torch.tensor([[0, 0, 0, 10, 10.0]])
    detections = torch.tensor([[0, 0, 10, 9, 0.6, 0], [0, 0, 10, 10, 0.9, 0]])  # duplicate: one matches, one FP
    cm.process_batch(detections, labels)
    assert cm.matrix.tolist() == [[1, 1], [0, 0]]
