"""utils/plots.py: colours, Annotator, crops, feature maps, batch mosaics, label and results plots."""
import cv2
import numpy as np
import pytest
import torch

from utils.general import UserError
from utils.plots import (
    RESULTS_COLUMNS,
    Annotator,
    Colors,
    colors,
    feature_visualization,
    output_to_target,
    plot_images,
    plot_labels,
    plot_results,
    save_one_box,
)

torch.set_num_threads(1)


def _read(path):
    im = cv2.imread(str(path))
    assert im is not None, f"{path} is not a readable image"
    return im


def test_colors_palette():
    assert colors(0) == (255, 56, 56)
    assert colors(0, bgr=True) == (56, 56, 255)
    assert colors(20) == colors(0)  # cycles through 20 colours
    assert len({Colors()(i) for i in range(20)}) == 20


@pytest.mark.parametrize("pil", [False, True])
def test_annotator_draws_box_and_label(pil):
    im = np.zeros((120, 160, 3), dtype=np.uint8)
    ann = Annotator(im, line_width=2, pil=pil)
    ann.box_label([40, 50, 100, 90], "cat 0.9", color=(0, 255, 0))
    out = ann.result()
    assert out.shape == im.shape and out.dtype == np.uint8
    assert (out[50:90, 40:42] == [0, 255, 0]).all(axis=-1).any()  # left edge drawn in the box colour
    assert (out[88:92, 40:100, 1] > 200).any()  # bottom edge
    assert out[60:80, 50:90].max() == 0  # box interior untouched
    assert out[35:50, 40:100].max() > 0  # label tab above the box
    assert out[100:, :].max() == 0 and out[:, 120:].max() == 0  # far away: untouched


@pytest.mark.parametrize("pil", [False, True])
def test_annotator_label_goes_inside_at_the_top_edge(pil):
    im = np.zeros((100, 100, 3), dtype=np.uint8)
    ann = Annotator(im, line_width=2, pil=pil)
    ann.box_label([10, 0, 90, 60], "dog", color=(255, 0, 0))
    out = ann.result()
    assert out[5:20, 15:30, 0].max() > 200  # the tab fills the box's top-left corner


@pytest.mark.parametrize("pil", [False, True])
def test_annotator_rectangle_and_text(pil):
    im = np.zeros((80, 80, 3), dtype=np.uint8)
    ann = Annotator(im, line_width=2, font_size=14, pil=pil)
    ann.rectangle([10, 10, 30, 30], fill=(0, 0, 255))
    ann.text((40, 40), "Hi", txt_color=(255, 255, 255))
    out = ann.result()
    assert (out[15:25, 15:25] == [0, 0, 255]).all()
    assert out[40:60, 40:70].max() > 0
    assert out[0:8, 40:80].max() == 0


def test_annotator_uses_pil_for_non_ascii_names():
    ann = Annotator(np.zeros((50, 50, 3), dtype=np.uint8), example="猫")
    assert ann.pil


def test_save_one_box(tmp_path):
    im = np.zeros((100, 200, 3), dtype=np.uint8)
    im[20:40, 50:90] = (255, 0, 0)  # blue in BGR
    f = tmp_path / "crops" / "person" / "img.jpg"
    crop = save_one_box([50, 20, 90, 40], im, file=f, gain=1.0, pad=0, BGR=True)
    assert crop.shape == (20, 40, 3)
    assert (crop == [255, 0, 0]).all()
    rgb = save_one_box([50, 20, 90, 40], im, file=f, gain=1.0, pad=0, BGR=False)
    assert (rgb == [0, 0, 255]).all()
    saved = _read(f)  # written in true colours
    assert saved.shape == (20, 40, 3)
    assert saved[..., 0].mean() > 200 and saved[..., 2].mean() < 50
    assert (tmp_path / "crops" / "person" / "img2.jpg").is_file()  # second save does not overwrite

    grown = save_one_box([50, 20, 90, 40], im, gain=1.0, pad=10, square=True, save=False)
    assert grown.shape == (50, 50, 3)  # 40x20 box squared to 40, plus 10 pixels
    clipped = save_one_box([0, 0, 30, 30], im, gain=1.0, pad=20, save=False)
    assert clipped.shape == (40, 40, 3)  # grown to -10..40 and clipped at 0


def test_feature_visualization(tmp_path):
    x = torch.randn(1, 5, 8, 8)
    f = feature_visualization(x, "models.common.C3", stage=2, n=4, save_dir=tmp_path)
    assert f == tmp_path / "stage2_C3_features.png"
    assert f.stat().st_size > 0
    assert np.load(f.with_suffix(".npy")).shape == (5, 8, 8)
    assert feature_visualization(x, "models.yolo.Detect", 24, save_dir=tmp_path) is None
    assert feature_visualization(torch.randn(1, 5, 1, 1), "Conv", 3, save_dir=tmp_path) is None


def test_output_to_target():
    out = [torch.tensor([[10.0, 20.0, 30.0, 60.0, 0.9, 2.0]]), torch.zeros(0, 6),
           torch.tensor([[0.0, 0.0, 4.0, 4.0, 0.5, 1.0], [1.0, 1.0, 3.0, 3.0, 0.4, 0.0]])]
    t = output_to_target(out)
    np.testing.assert_allclose(t, [[0, 2, 20, 40, 20, 40, 0.9], [2, 1, 2, 2, 4, 4, 0.5], [2, 0, 2, 2, 2, 2, 0.4]],
                               rtol=1e-6)
    assert output_to_target(out, max_det=1).shape == (2, 7)


def test_plot_images_labels_and_predictions(tmp_path):
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (2, 3, 64, 96), dtype=np.uint8))
    targets = torch.tensor([[0, 0, 0.5, 0.5, 0.4, 0.4], [1, 3, 0.3, 0.6, 0.2, 0.3]])
    f = plot_images(images, targets, paths=["a.jpg", "b.jpg"], fname=tmp_path / "train_batch0.jpg",
                    names=["a", "b", "c", "d"])
    mosaic = _read(f)
    assert f.stat().st_size > 0
    assert mosaic.shape == (128, 192, 3)  # 2x2 tiles
    empty = _read(plot_images(images, torch.zeros(0, 6), fname=tmp_path / "empty.jpg"))
    assert np.abs(mosaic.astype(int) - empty.astype(int)).sum() > 0  # boxes were drawn

    preds = np.array([[0, 1, 48, 32, 30, 20, 0.9], [1, 2, 20, 20, 10, 10, 0.1]])  # pixels, with conf
    f = plot_images(images.float() / 255, preds, fname=tmp_path / "val_batch0_pred.jpg", names={1: "x", 2: "y"})
    assert _read(f).shape == (128, 192, 3)


def test_plot_images_downscales_large_batches(tmp_path):
    images = np.zeros((5, 3, 640, 640), dtype=np.uint8)
    f = plot_images(images, np.zeros((0, 6)), fname=tmp_path / "big.jpg")
    h, w = _read(f).shape[:2]
    assert h == w and h <= 1920 + 3  # 3x3 tiles scaled to fit max_size


def test_plot_labels(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.column_stack([rng.integers(0, 3, 50), rng.uniform(0.1, 0.9, (50, 2)), rng.uniform(0.05, 0.3, (50, 2))])
    before = labels.copy()
    f = plot_labels(labels, names={0: "a", 1: "b", 2: "c"}, save_dir=tmp_path)
    assert f == tmp_path / "labels.jpg" and f.stat().st_size > 0
    assert _read(f).shape[0] > 500
    np.testing.assert_array_equal(labels, before)  # caller's labels untouched


def _write_results_csv(path, epochs=3):
    cols = ["epoch", *("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
                       "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss",
                       "x/lr0", "x/lr1", "x/lr2")]
    lines = [",".join(f"{c:>20s}" for c in cols)]  # train.py pads names and values to 20 characters
    for e in range(epochs):
        vals = [e] + [0.1 / (e + 1) + 0.01 * k for k in range(len(cols) - 1)]
        lines.append(",".join(f"{v:20.5g}" for v in vals))
    path.write_text("\n".join(lines) + "\n")


def test_plot_results(tmp_path):
    csv = tmp_path / "results.csv"
    _write_results_csv(csv)
    f = plot_results(file=csv)
    assert f == tmp_path / "results.png" and f.stat().st_size > 0
    assert _read(f).shape[:2] == (1200, 2400)  # 12x6 inches at 200 dpi
    assert len(RESULTS_COLUMNS) == 10


def test_plot_results_without_csv_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="results"):
        plot_results(file=tmp_path / "results.csv")
