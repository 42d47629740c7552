"""Box geometry, NMS, COCO id mapping and intersect_dicts in utils/general.py."""
import numpy as np
import pytest
import torch
import torchvision

import utils.general as general
from utils.general import (
    clip_boxes,
    coco80_to_coco91_class,
    intersect_dicts,
    non_max_suppression,
    scale_boxes,
    xyn2xy,
    xywh2xyxy,
    xywhn2xyxy,
    xyxy2xywh,
    xyxy2xywhn,
)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------- boxes
def test_xyxy_xywh_known_values_and_round_trip():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0]])
    xywh = xyxy2xywh(xyxy)
    assert xywh.tolist() == [[30.0, 50.0, 40.0, 60.0]]
    assert xywh2xyxy(xywh).tolist() == xyxy.tolist()
    assert xyxy.tolist() == [[10.0, 20.0, 50.0, 80.0]]  # input untouched

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 100, (50, 4))
    a[:, 2:] += a[:, :2]  # valid corners
    np.testing.assert_allclose(xywh2xyxy(xyxy2xywh(a)), a, atol=1e-9)
    assert isinstance(xyxy2xywh(a), np.ndarray)


def test_converters_keep_extra_columns_and_batch_dims():
    x = torch.tensor([[[30.0, 50.0, 40.0, 60.0, 0.9, 3.0]]])  # (1, 1, 6)
    y = xywh2xyxy(x)
    assert y.shape == x.shape
    assert y[0, 0].tolist() == pytest.approx([10.0, 20.0, 50.0, 80.0, 0.9, 3.0])


def test_normalised_conversions():
    xywhn = np.array([[0.5, 0.25, 0.5, 0.1]])
    xyxy = xywhn2xyxy(xywhn, w=200, h=100, padw=7, padh=3)
    # x1 = 200 * (0.5 - 0.25) + 7 = 57, y1 = 100 * (0.25 - 0.05) + 3 = 23
    np.testing.assert_allclose(xyxy, [[57.0, 23.0, 157.0, 33.0]])
    back = xyxy2xywhn(xyxy - np.array([7, 3, 7, 3]), w=200, h=100)
    np.testing.assert_allclose(back, xywhn)

    pts = torch.tensor([[0.25, 0.5], [1.0, 0.0]])
    assert xyn2xy(pts, w=40, h=20, padw=1, padh=2).tolist() == [[11.0, 12.0], [41.0, 2.0]]


def test_xyxy2xywhn_clip_clips_input_in_place():
    xyxy = torch.tensor([[-10.0, 5.0, 120.0, 50.0]])
    out = xyxy2xywhn(xyxy, w=100, h=40, clip=True)
    assert xyxy.tolist() == [[0.0, 5.0, 100.0, 40.0]]
    assert out[0].tolist() == pytest.approx([0.5, 22.5 / 40, 1.0, 35.0 / 40])


@pytest.mark.parametrize("kind", ["torch", "numpy"])
def test_clip_boxes_in_place(kind):
    b = [[-5.0, -1.0, 30.0, 300.0], [10.0, 20.0, 15.0, 25.0]]
    boxes = torch.tensor(b) if kind == "torch" else np.array(b)
    ret = clip_boxes(boxes, (100, 20, 3))  # h=100, w=20
    expected = [[0.0, 0.0, 20.0, 100.0], [10.0, 20.0, 15.0, 25.0]]
    assert boxes.tolist() == expected
    assert ret is boxes


def test_scale_boxes_undoes_letterbox():
    # 400x800 (h, w) image letterboxed to 320x320: gain = min(320/400, 320/800) = 0.4, resized to 160x320,
    # padded by (320 - 160) / 2 = 80 rows on top. A box at x 100..300, y 50..300 in the original lands at
    # x 40..120, y 80 + 20 .. 80 + 120.
    boxes = torch.tensor([[40.0, 100.0, 120.0, 200.0]])
    out = scale_boxes((320, 320), boxes, (400, 800))
    assert out is boxes
    assert boxes[0].tolist() == pytest.approx([100.0, 50.0, 300.0, 300.0])

    # the same with a minimum-rectangle letterbox (192x320, 16 rows of padding) given through ratio_pad
    boxes = np.array([[40.0, 36.0, 120.0, 136.0]])
    scale_boxes((192, 320), boxes, (400, 800), ratio_pad=((0.4, 0.4), (0.0, 16.0)))
    np.testing.assert_allclose(boxes, [[100.0, 50.0, 300.0, 300.0]])

    # a box reaching into the padding is clipped to the original image
    boxes = torch.tensor([[-8.0, 60.0, 330.0, 250.0]])
    scale_boxes((320, 320), boxes, (400, 800))
    assert boxes[0].tolist() == pytest.approx([0.0, 0.0, 800.0, 400.0])


# ------------------------------------------------------------------------------------------------------------- NMS
def _pred(rows, nc):
    """rows: (x, y, w, h, obj, {cls: score}) -> (1, n, 5 + nc) prediction."""
    p = torch.zeros(1, len(rows), 5 + nc)
    for i, (x, y, w, h, obj, scores) in enumerate(rows):
        p[0, i, :5] = torch.tensor([x, y, w, h, obj])
        for c, s in scores.items():
            p[0, i, 5 + c] = s
    return p


# two boxes with IoU 0.82: xyxy (30, 30, 70, 70) and (32, 32, 72, 72)
A = (50.0, 50.0, 40.0, 40.0)
B = (52.0, 52.0, 40.0, 40.0)


def test_nms_same_class_keeps_the_best_box():
    p = _pred([(*B, 0.8, {1: 0.8}), (*A, 0.9, {1: 0.9})], nc=3)
    (out,) = non_max_suppression(p, conf_thres=0.25, iou_thres=0.45)
    assert out.shape == (1, 6)
    assert out[0, :4].tolist() == pytest.approx([30.0, 30.0, 70.0, 70.0])
    assert out[0, 4].item() == pytest.approx(0.81)
    assert out[0, 5].item() == 1.0


def test_nms_conf_is_obj_times_cls_and_orders_by_it():
    # obj*cls: first 0.9 * 0.5 = 0.45, second 0.6 * 0.9 = 0.54 -> the second (higher product) survives
    p = _pred([(*A, 0.9, {0: 0.5}), (*B, 0.6, {0: 0.9})], nc=2)
    (out,) = non_max_suppression(p, conf_thres=0.25, iou_thres=0.45)
    assert out.shape == (1, 6)
    assert out[0, 4].item() == pytest.approx(0.54)
    assert out[0, :4].tolist() == pytest.approx([32.0, 32.0, 72.0, 72.0])


def test_nms_different_classes_agnostic_or_not():
    p = _pred([(*A, 0.9, {0: 0.9}), (*B, 0.9, {2: 0.8})], nc=3)
    (out,) = non_max_suppression(p, iou_thres=0.45)
    assert sorted(out[:, 5].tolist()) == [0.0, 2.0]
    assert out[:, 4].tolist() == pytest.approx([0.81, 0.72])  # sorted by confidence
    (out,) = non_max_suppression(p, iou_thres=0.45, agnostic=True)
    assert out.shape == (1, 6) and out[0, 5].item() == 0.0


def test_nms_iou_threshold_decides_overlap():
    p = _pred([(*A, 0.9, {0: 0.9}), (*B, 0.9, {0: 0.8})], nc=1)
    assert len(non_max_suppression(p, iou_thres=0.85)[0]) == 2  # IoU 0.82 < 0.85: both kept
    assert len(non_max_suppression(p, iou_thres=0.80)[0]) == 1


def test_nms_confidence_threshold():
    p = _pred([
        (10.0, 10.0, 8.0, 8.0, 0.2, {0: 1.0}),    # obj below threshold
        (40.0, 40.0, 8.0, 8.0, 0.5, {0: 0.4}),    # obj ok, obj * cls = 0.2 below threshold
        (80.0, 80.0, 8.0, 8.0, 0.6, {0: 0.5}),    # 0.3 kept
    ], nc=1)
    (out,) = non_max_suppression(p, conf_thres=0.25)
    assert out.shape == (1, 6)
    assert out[0, 4].item() == pytest.approx(0.3)
    (out,) = non_max_suppression(p, conf_thres=0.19)  # all three pass both tests
    assert out[:, 4].tolist() == pytest.approx([0.3, 0.2, 0.2])


def test_nms_classes_filter():
    rows = [(10.0 + 30 * i, 10.0, 8.0, 8.0, 0.9, {i: 0.9}) for i in range(4)]
    (out,) = non_max_suppression(_pred(rows, nc=4), classes=[1, 3])
    assert sorted(out[:, 5].tolist()) == [1.0, 3.0]
    (out,) = non_max_suppression(_pred(rows, nc=4), classes=[2])
    assert out[:, 5].tolist() == [2.0]


def test_nms_max_det_keeps_the_most_confident():
    rows = [(10.0 + 30 * i, 10.0, 8.0, 8.0, 0.3 + 0.1 * i, {0: 1.0}) for i in range(6)]
    (out,) = non_max_suppression(_pred(rows, nc=1), max_det=3)
    assert out[:, 4].tolist() == pytest.approx([0.8, 0.7, 0.6])


def test_nms_multi_label():
    p = _pred([(*A, 1.0, {0: 0.9, 1: 0.6, 2: 0.1})], nc=3)
    (out,) = non_max_suppression(p, conf_thres=0.25, multi_label=True)
    assert out[:, 5].tolist() == [0.0, 1.0]
    assert out[:, 4].tolist() == pytest.approx([0.9, 0.6])
    assert out[0, :4].tolist() == out[1, :4].tolist()
    (out,) = non_max_suppression(p, conf_thres=0.25, multi_label=False)
    assert out[:, 5].tolist() == [0.0]


def test_nms_apriori_labels_are_added_with_confidence_one():
    p = _pred([(10.0, 10.0, 8.0, 8.0, 0.9, {0: 0.9})], nc=3)
    labels = [torch.tensor([[2.0, 100.0, 60.0, 20.0, 10.0]])]  # cls, x, y, w, h in pixels
    (out,) = non_max_suppression(p, labels=labels)
    assert out.shape == (2, 6)
    assert out[0].tolist() == pytest.approx([90.0, 55.0, 110.0, 65.0, 1.0, 2.0])


def test_nms_mask_coefficients_travel_with_their_box():
    p = torch.zeros(1, 2, 5 + 2 + 3)
    p[0, 0, :7] = torch.tensor([*A, 0.9, 0.9, 0.0])
    p[0, 0, 7:] = torch.tensor([1.0, 2.0, 3.0])
    p[0, 1, :7] = torch.tensor([150.0, 150.0, 10.0, 10.0, 0.9, 0.0, 0.5])
    p[0, 1, 7:] = torch.tensor([4.0, 5.0, 6.0])
    (out,) = non_max_suppression(p, nm=3)
    assert out.shape == (2, 9)
    assert out[0, 5:].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert out[1, 5:].tolist() == [1.0, 4.0, 5.0, 6.0]


@pytest.mark.parametrize("kw", [dict(conf_thres=1.5), dict(conf_thres=-0.1), dict(iou_thres=1.01), dict(iou_thres=-1)])
def test_nms_rejects_bad_thresholds(kw):
    with pytest.raises(ValueError, match="thres"):
        non_max_suppression(torch.zeros(1, 1, 6), **kw)


def test_nms_accepts_tuple_and_returns_one_tensor_per_image():
    p = torch.cat((_pred([(*A, 0.9, {0: 0.9})], nc=2), torch.zeros(1, 1, 7)), 0)  # image 1 has nothing
    raw = [torch.zeros(1)]
    out = non_max_suppression((p, raw))
    assert isinstance(out, list) and len(out) == 2
    assert out[0].shape == (1, 6)
    assert out[1].shape == (0, 6)
    assert torch.equal(out[0], non_max_suppression([p, raw])[0])


def test_nms_never_drops_images_by_default_even_on_a_slow_clock(monkeypatch):
    """The val/training path: no wall-clock limit, so a slow or loaded machine gives the same detections."""
    clock = iter(range(0, 1000, 10))  # every call to time.time() advances 10 s
    monkeypatch.setattr(general.time, "time", lambda: float(next(clock)))
    warnings = []
    monkeypatch.setattr(general.LOGGER, "warning", lambda msg: warnings.append(msg))
    p = torch.cat([_pred([(*A, 0.9, {0: 0.9})], nc=1)] * 3, 0)
    out = non_max_suppression(p)
    assert [len(o) for o in out] == [1, 1, 1]
    assert warnings == []


def test_nms_explicit_time_limit_warns_with_what_was_dropped(monkeypatch):
    clock = iter(range(0, 1000, 10))
    monkeypatch.setattr(general.time, "time", lambda: float(next(clock)))
    warnings = []
    monkeypatch.setattr(general.LOGGER, "warning", lambda msg: warnings.append(msg))
    p = torch.cat([_pred([(*A, 0.9, {0: 0.9})], nc=1)] * 3, 0)
    out = non_max_suppression(p, time_limit=1.0)
    assert [len(o) for o in out] == [1, 0, 0]
    assert len(warnings) == 1 and "time limit" in warnings[0] and "other 2 images" in warnings[0]


def _reference_nms(pred, conf_thres, iou_thres):
    """Plain greedy NMS per class, one box at a time, for comparison."""
    result = []
    for x in pred:
        obj = x[:, 4]
        conf, cls = (x[:, 5:] * obj[:, None]).max(1)
        ok = (obj > conf_thres) & (conf > conf_thres)
        boxes, conf, cls = xywh2xyxy(x[ok, :4]), conf[ok], cls[ok]
        order = conf.argsort(descending=True).tolist()
        kept = []
        for i in order:
            same = [k for k in kept if cls[k] == cls[i]]
            if not same or torchvision.ops.box_iou(boxes[i:i + 1], boxes[same]).max() <= iou_thres:
                kept.append(i)
        result.append(torch.cat((boxes[kept], conf[kept, None], cls[kept, None].float()), 1))
    return result


def test_nms_matches_a_greedy_reference_on_random_boxes():
    g = torch.Generator().manual_seed(0)
    pred = torch.rand(2, 300, 5 + 4, generator=g)
    pred[..., :2] *= 200
    pred[..., 2:4] = pred[..., 2:4] * 60 + 5
    ours = non_max_suppression(pred, conf_thres=0.1, iou_thres=0.5)
    ref = _reference_nms(pred, 0.1, 0.5)
    for o, r in zip(ours, ref):
        assert len(o) > 20
        assert torch.allclose(o, r)


# ----------------------------------------------------------------------------------------------------- misc helpers
def test_coco80_to_coco91_class():
    ids = coco80_to_coco91_class()
    assert len(ids) == 80 and len(set(ids)) == 80
    assert ids[0] == 1 and ids[79] == 90
    assert ids[11] == 13  # 'stop sign': id 12 is unused
    assert ids == sorted(ids)
    for unused in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83):
        assert unused not in ids


def test_intersect_dicts():
    da = {"a.weight": torch.zeros(3, 2), "b.weight": torch.zeros(4), "c.anchors": torch.zeros(2), "d": torch.zeros(1)}
    db = {"a.weight": torch.ones(3, 2), "b.weight": torch.ones(5), "c.anchors": torch.ones(2)}
    out = intersect_dicts(da, db, exclude=("anchor",))
    assert list(out) == ["a.weight"]
    assert out["a.weight"] is da["a.weight"]  # values come from the first dict
    assert set(intersect_dicts(da, db)) == {"a.weight", "c.anchors"}


def test_one_run_per_run_folder_and_orphan_temporaries_go(tmp_path):
    import os

    from utils.general import UserError, claim_run_folder

    run = tmp_path / "exp"
    (run / "weights").mkdir(parents=True)
    orphans = [run / "weights" / ".last.pt.k3j2.tmp", run / "results.csv.tmp"]
    kept = [run / "weights" / "last.pt", run / "results.csv", run / "weights" / "notes.tmp.txt"]
    for f in orphans + kept:
        f.write_bytes(b"x" * 10)
    with claim_run_folder(run):
        assert not any(f.exists() for f in orphans) and all(f.exists() for f in kept)
        assert (run / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(UserError, match=rf"exp: another training run \(pid {os.getpid()}\) is using this run "
                                            "folder; wait for it to finish, or give this run another --name"):
            with claim_run_folder(run):
                pass
        (run / "weights" / ".best.pt.x.tmp").write_bytes(b"x")  # the holder's own save in progress: kept
    assert (run / "weights" / ".best.pt.x.tmp").exists()
    with claim_run_folder(run):  # released when the first run ended
        assert not (run / "weights" / ".best.pt.x.tmp").exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the run folder .*; choose a writable --project"):
        with claim_run_folder(blocker / "exp"):
            pass
