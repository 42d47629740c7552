"""workflow/autoanchor.py: the anchor-fit metric on hand-made datasets, anchor order, and re-fitting poor anchors."""
import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn

from utils.general import LOGGER
from workflow.autoanchor import anchor_metrics, check_anchor_order, check_anchors, kmean_anchors, label_wh

torch.set_num_threads(1)
ANCHORS_PX = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]


class FakeDetect(nn.Module):
    def __init__(self, anchors_px):
        super().__init__()
        self.nc, self.nl, self.na = 2, 3, 3
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.register_buffer("anchors", torch.tensor(anchors_px).float().view(3, 3, 2) / self.stride.view(-1, 1, 1))


class FakeModel(nn.Module):
    def __init__(self, anchors_px=ANCHORS_PX):
        super().__init__()
        self.model = nn.ModuleList([nn.Identity(), FakeDetect(anchors_px)])


@pytest.fixture
def log_lines():
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    LOGGER.addHandler(handler)
    yield lines
    LOGGER.removeHandler(handler)


def two_image_dataset():
    # image 0: 640 x 480, one box 25% x 50% -> 160 x 240 px at imgsz 640
    # image 1: 320 x 320 (scaled to 640 x 640), one box 10% x 5% -> 64 x 32 px; image 2: background only
    return SimpleNamespace(shapes=np.array([[640, 480], [320, 320], [500, 400]]),
                           labels=[np.array([[0, 0.5, 0.5, 0.25, 0.5]]), np.array([[1, 0.5, 0.5, 0.1, 0.05]]),
                                   np.zeros((0, 5))])


def test_label_wh_and_metric_by_hand():
    wh = label_wh(two_image_dataset(), imgsz=640)
    assert wh == pytest.approx(np.array([[160, 240], [64, 32]]))
    # one anchor equal to box 0: box 0 fits (1.0); box 1: worst ratio 32/240 = 0.133 < 1/4 -> unreachable
    assert anchor_metrics(wh, [[160, 240]], thr=4.0) == pytest.approx((0.5, 0.5))
    # add an anchor equal to box 1: both reachable; box 0 vs anchor (64,32): 32/240 < 1/4, so 1 anchor per box
    assert anchor_metrics(wh, [[160, 240], [64, 32]], thr=4.0) == pytest.approx((1.0, 1.0))
    # anchor (100, 100): box 0 worst ratio 100/240 = .417 > .25; box 1 32/100 = .32 > .25 -> reachable at thr 4,
    # but not at thr 2 (both below 0.5)
    assert anchor_metrics(wh, [[100, 100]], thr=4.0) == pytest.approx((1.0, 1.0))
    assert anchor_metrics(wh, [[100, 100]], thr=2.0) == pytest.approx((0.0, 0.0))


def test_check_anchor_order_flips_reversed_levels(log_lines):
    m = FakeDetect(ANCHORS_PX[::-1])  # largest anchors on the stride-8 level
    before = m.anchors.clone()
    check_anchor_order(m)
    assert torch.equal(m.anchors, before.flip(0))
    assert any("Reversing anchor order" in s for s in log_lines)
    check_anchor_order(m)  # already in order: untouched
    assert torch.equal(m.anchors, before.flip(0))


def test_check_anchors_good_fit_leaves_anchors(log_lines):
    model = FakeModel()
    before = model.model[-1].anchors.clone()
    bpr, aat = check_anchors(two_image_dataset(), model, thr=4.0, imgsz=640)
    assert bpr == 1.0
    assert torch.equal(model.model[-1].anchors, before)
    line = [s for s in log_lines if "Best Possible Recall" in s][0]
    assert line.strip().endswith(f"{aat:.2f} anchors/target, 1.000 Best Possible Recall (BPR). "
                                 "Current anchors are a good fit to dataset ✅")


def clustered_dataset(n_images=40, seed=0):
    """Square 640 px images, each with boxes around 12x12, 60x40 and 200x300 px (+-10%)."""
    rng = np.random.default_rng(seed)
    centres = np.array([[12, 12], [60, 40], [200, 300]]) / 640
    labels = []
    for _ in range(n_images):
        wh = centres * rng.uniform(0.9, 1.1, (3, 2))
        labels.append(np.c_[np.arange(3), np.full((3, 2), 0.5), wh])
    return SimpleNamespace(shapes=np.full((n_images, 2), 640), labels=labels)


def test_check_anchors_replaces_poor_anchors(log_lines):
    tiny = [[1, 1] * 3] * 3  # 1 px anchors: no box is within a factor 4
    model = FakeModel(tiny)
    data = clustered_dataset()
    bpr0, _ = anchor_metrics(label_wh(data, 640), torch.tensor(tiny).view(-1, 2).float(), 4.0)
    assert bpr0 == 0.0
    bpr, aat = check_anchors(data, model, thr=4.0, imgsz=640)
    assert bpr == 1.0 and aat > 1
    m = model.model[-1]
    px = (m.anchors * m.stride.view(-1, 1, 1)).view(-1, 2)
    assert anchor_metrics(label_wh(data, 640), px, 4.0)[0] == 1.0  # stored in grid units, fit in pixels
    area = px.prod(1)
    assert torch.all(area[1:] >= area[:-1])  # small anchors on the small-stride level
    assert any("anchors/target" in s and "poor fit" in s for s in log_lines)
    assert any("Done ✅" in s for s in log_lines)


def test_kmean_anchors_deterministic_and_fits():
    data = clustered_dataset()
    k1 = kmean_anchors(data, n=9, img_size=640, thr=4.0, gen=50, verbose=False, seed=3)
    k2 = kmean_anchors(data, n=9, img_size=640, thr=4.0, gen=50, verbose=False, seed=3)
    assert k1.dtype == np.float32 and k1.shape == (9, 2)
    assert np.array_equal(k1, k2)
    assert np.all(np.diff(k1.prod(1)) >= 0)  # sorted small to large
    assert anchor_metrics(label_wh(data, 640), k1, 4.0)[0] == 1.0
    # three clusters: some anchor lies within 20% of each cluster centre
    for centre in ([12, 12], [60, 40], [200, 300]):
        assert np.abs(k1 / np.array(centre) - 1).max(1).min() < 0.2
    with pytest.raises(ValueError, match="dataset"):
        kmean_anchors("data/coco128.yaml", gen=1)


def test_kmean_anchors_too_few_boxes_falls_back_to_random(log_lines):
    data = SimpleNamespace(shapes=np.array([[640, 640]]), labels=[np.array([[0, 0.5, 0.5, 0.1, 0.1]])])
    k = kmean_anchors(data, n=9, img_size=640, gen=20, verbose=False)
    assert k.shape == (9, 2) and np.all(k >= 0)
    assert any("random init" in s for s in log_lines)


def test_check_anchors_with_detection_model():
    yolo = pytest.importorskip("models.yolo")
    model = yolo.DetectionModel("yolov5n.yaml", nc=3)
    before = model.model[-1].anchors.clone()
    bpr, _ = check_anchors(two_image_dataset(), model, thr=4.0, imgsz=640)
    assert bpr == 1.0 and torch.equal(model.model[-1].anchors, before)
