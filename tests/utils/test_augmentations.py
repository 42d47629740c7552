"""letterbox, augment_hsv, random_perspective, box_candidates, mixup."""
import random

import cv2
import numpy as np
import pytest

from utils.augmentations import augment_hsv, box_candidates, letterbox, mixup, random_perspective


def _rect_image(h, w, box, value=255):
    im = np.zeros((h, w, 3), np.uint8)
    x1, y1, x2, y2 = box
    im[y1:y2, x1:x2] = value
    return im


def _pixel_box(im, thr=127):
    ys, xs = np.nonzero(im.max(2) > thr)
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)


class TestLetterbox:
    def test_fixed_shape_centres_and_pads(self):
        im = np.full((100, 200, 3), 7, np.uint8)  # h=100, w=200
        out, ratio, pad = letterbox(im, 320, auto=False)
        assert out.shape == (320, 320, 3)
        assert ratio == (1.6, 1.6) and pad == (0.0, 80.0)
        assert (out[:80] == 114).all() and (out[-80:] == 114).all() and (out[80:240] == 7).all()

    def test_auto_pads_to_stride_multiple_only(self):
        im = np.zeros((100, 200, 3), np.uint8)
        out, ratio, pad = letterbox(im, 320, auto=True, stride=32)
        assert out.shape == (160, 320, 3) and pad == (0.0, 0.0)
        im = np.zeros((90, 200, 3), np.uint8)  # resized to 144 x 320: pad 144 -> 160
        out, _, pad = letterbox(im, 320, auto=True, stride=32)
        assert out.shape == (160, 320, 3) and pad == (0.0, 8.0)

    def test_odd_padding_goes_bottom_right(self):
        im = np.full((100, 200, 3), 9, np.uint8)
        out, _, pad = letterbox(im, (321, 320), auto=False)
        assert out.shape == (321, 320, 3) and pad == (0.0, 80.5)
        assert (out[:80] == 114).all() and (out[80] == 9).all() and (out[240] == 114).all()
        assert (out[239] == 9).all() and (out[-81:] == 114).all()

    def test_scaleup_false_never_enlarges(self):
        im = np.full((100, 50, 3), 3, np.uint8)
        out, ratio, pad = letterbox(im, 320, auto=False, scaleup=False)
        assert ratio == (1.0, 1.0) and pad == (135.0, 110.0) and out.shape == (320, 320, 3)

    def test_scale_fill_stretches(self):
        im = np.zeros((100, 200, 3), np.uint8)
        out, ratio, pad = letterbox(im, 320, auto=False, scaleFill=True)
        assert out.shape == (320, 320, 3) and ratio == (1.6, 3.2) and pad == (0.0, 0.0)

    def test_boxes_map_through_ratio_and_pad(self):
        im = _rect_image(100, 200, (50, 20, 150, 60))
        out, (rw, rh), (pw, ph) = letterbox(im, 320, auto=False)
        expected = np.array([50 * rw + pw, 20 * rh + ph, 150 * rw + pw, 60 * rh + ph])
        np.testing.assert_allclose(_pixel_box(out), expected, atol=1)


def test_augment_hsv_zero_gain_is_identity():
    im = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    out = augment_hsv(im.copy(), 0, 0, 0)
    assert np.array_equal(out, im)


def test_augment_hsv_value_gain_scales_v_channel():
    rng = np.random.default_rng(1)
    im = rng.integers(20, 120, (16, 16, 3), dtype=np.uint8)
    np.random.seed(3)
    expected_gain = np.random.uniform(-1, 1, 3)[2] * 0.5 + 1
    np.random.seed(3)
    out = augment_hsv(im.copy(), hgain=0.0, sgain=0.0, vgain=0.5)
    v_in = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)[..., 2].astype(float)
    v_out = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)[..., 2].astype(float)
    assert abs(expected_gain - 1) > 0.05  # the seed gives a real change
    np.testing.assert_allclose(v_out, np.clip(v_in * expected_gain, 0, 255), atol=2.5)
    h_in = cv2.cvtColor(im, cv2.COLOR_BGR2HSV)[..., 0].astype(float)
    h_out = cv2.cvtColor(out, cv2.COLOR_BGR2HSV)[..., 0].astype(float)
    assert np.median(np.abs(h_out - h_in)) <= 2  # hue unchanged apart from rounding


def test_box_candidates():
    before = np.array([[0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 10, 10], [0, 0, 100, 100]], float).T
    after = np.array([[0, 0, 9, 9],  # kept
                      [0, 0, 2, 9],  # too narrow (<= 2 px)
                      [0, 0, 3, 3],  # 9% of the area left
                      [0, 0, 100, 0.9]], float).T  # flat: too thin and aspect > 100
    assert box_candidates(before, after).tolist() == [True, False, False, False]
    assert box_candidates(before, after, area_thr=0.05).tolist() == [True, False, True, False]


def test_random_perspective_identity_keeps_everything():
    im = _rect_image(64, 96, (10, 20, 50, 40))
    targets = np.array([[3, 10, 20, 50, 40]], np.float32)
    out, t = random_perspective(im, targets, degrees=0, translate=0, scale=0, shear=0, perspective=0)
    assert np.array_equal(out, im)
    np.testing.assert_allclose(t, targets)


@pytest.mark.parametrize("seed", range(6))
def test_random_perspective_box_follows_pixels(seed):
    """Scale + translate only: the transformed box is the box of the transformed pixels."""
    random.seed(seed)
    im = _rect_image(128, 128, (30, 40, 90, 80))
    targets = np.array([[1, 30, 40, 90, 80]], np.float32)
    out, t = random_perspective(im, targets, degrees=0, translate=0.1, scale=0.3, shear=0, perspective=0)
    assert out.shape == im.shape and len(t) == 1 and t[0, 0] == 1
    np.testing.assert_allclose(t[0, 1:], _pixel_box(out), atol=1.5)


@pytest.mark.parametrize("seed", range(6))
def test_random_perspective_rotation_box_encloses_pixels(seed):
    random.seed(seed)
    im = _rect_image(128, 128, (44, 54, 84, 74))
    targets = np.array([[0, 44, 54, 84, 74]], np.float32)
    out, t = random_perspective(im, targets, degrees=30, translate=0.05, scale=0.2, shear=5, perspective=0.0005)
    assert len(t) == 1
    px = _pixel_box(out)
    x1, y1, x2, y2 = t[0, 1:]
    assert x1 - 1.5 <= px[0] and y1 - 1.5 <= px[1] and px[2] <= x2 + 1.5 and px[3] <= y2 + 1.5


def test_random_perspective_border_crops_and_filters():
    """The mosaic path: a 2s canvas comes out s x s; a box left outside the output is dropped."""
    random.seed(0)
    s = 64
    canvas = np.zeros((2 * s, 2 * s, 3), np.uint8)
    targets = np.array([[0, 60, 60, 70, 70],  # centre of the canvas: stays
                        [1, 0, 0, 6, 6]], np.float32)  # far corner: cropped away
    out, t = random_perspective(canvas, targets, degrees=0, translate=0.0, scale=0.0, shear=0, perspective=0,
                                border=(-s // 2, -s // 2))
    assert out.shape == (s, s, 3)
    assert t[:, 0].tolist() == [0]
    np.testing.assert_allclose(t[0, 1:], [28, 28, 38, 38])  # shifted by the border


def test_mixup_blends_and_concatenates():
    np.random.seed(0)
    a, b = np.zeros((8, 8, 3), np.uint8), np.full((8, 8, 3), 200, np.uint8)
    la, lb = np.ones((2, 5), np.float32), np.zeros((1, 5), np.float32)
    im, labels = mixup(a, la, b, lb)
    assert labels.shape == (3, 5)
    assert 60 < im.mean() < 140  # Beta(32, 32) weights stay near 0.5
