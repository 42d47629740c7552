"""Dataset scanning, bad-data handling, label cache, rect batches, mosaic, loaders, LoadImages, check_dataset."""
import math
import random
import re
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import utils.dataloaders as dl
from utils import dataset_yaml
from utils.dataloaders import InfiniteDataLoader, LoadImages, LoadImagesAndLabels, create_dataloader, img2label_paths
from utils.dataset_yaml import check_dataset
from utils.general import ROOT, UserError

HYP = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=0.0, translate=0.1, scale=0.5, shear=0.0, perspective=0.0,
           flipud=0.0, fliplr=0.5, mosaic=1.0, mixup=0.0, copy_paste=0.0)
SUMMARY = re.compile(r"Scanning .*\.\.\. (\d+) images, (\d+) backgrounds, (\d+) corrupt")


def summary(records):
    found = [SUMMARY.search(m) for m in records if SUMMARY.search(m)]
    assert found, records
    return tuple(int(x) for x in found[-1].groups())


def write_image(f, w=64, h=48, seed=0):
    f = Path(f)
    f.parent.mkdir(parents=True, exist_ok=True)
    im = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    assert cv2.imwrite(str(f), im)
    return f


def write_label(root, stem, text, split="train"):
    f = Path(root) / "labels" / split / f"{stem}.txt"
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_text(text)
    return f


def make_dataset(root, items, split="train"):
    """items: {stem: label text or None (no label file)}; images are 64x48 jpgs."""
    for i, (stem, text) in enumerate(items.items()):
        write_image(Path(root) / "images" / split / f"{stem}.jpg", seed=i)
        if text is not None:
            write_label(root, stem, text, split)
    return Path(root) / "images" / split


# ----------------------------------------------------------------------------------------------------------------------
# Scanning and bad data
# ----------------------------------------------------------------------------------------------------------------------

def test_img2label_paths():
    assert img2label_paths(["/d/images/train/a.jpg", "/x/images/y/images/b.png", "/d/flat/c.jpeg"]) == [
        "/d/labels/train/a.txt", "/x/images/y/labels/b.txt", "/d/flat/c.txt"]


@pytest.mark.parametrize("name, label, reason", [
    ("columns", "0 0.5 0.5 0.2\n", "4 columns"),
    ("six_columns", "0 0.5 0.5 0.2 0.2 0.1\n", "6 columns"),
    ("out_of_range", "1 0.5 1.4 0.2 0.2\n", "outside [0, 1]"),
    ("negative_size", "1 0.5 0.5 -0.2 0.2\n", "must be positive"),
    ("zero_size", "1 0.5 0.5 0.2 0\n", "must be positive"),
    ("negative_coord", "1 -0.3 0.5 0.2 0.2\n", "outside [0, 1]"),
    ("text", "0 a b c d\n", "non-numeric"),
    ("bad_class", "-1 0.5 0.5 0.2 0.2\n", "non-negative integer"),
    ("fractional_class", "1.5 0.5 0.5 0.2 0.2\n", "non-negative integer"),
])
def test_bad_label_skips_image_with_warning(tmp_path, yolo_log, name, label, reason):
    good = "0 0.5 0.5 0.2 0.2\n"
    images = make_dataset(tmp_path, {"good": good, "bad": good + label})
    ds = LoadImagesAndLabels(images, img_size=64, prefix="train: ")
    assert summary(yolo_log) == (1, 0, 1)
    assert [Path(f).stem for f in ds.im_files] == ["good"]
    warning = [m for m in yolo_log if "bad.jpg" in m]
    assert len(warning) == 1 and reason in warning[0] and "bad.txt line 2" in warning[0]
    assert warning[0].startswith("train: WARNING")


def test_every_kind_of_bad_input_counted(tmp_path, yolo_log):
    good = "0 0.5 0.5 0.2 0.2\n"
    images = make_dataset(tmp_path, {
        "a_good": good, "b_good": "1 0.25 0.25 0.1 0.1\n3 0.75 0.75 0.2 0.3\n",
        "c_dup": good + "1 0.3 0.3 0.1 0.1\n" + good,
        "d_nolabel": None, "e_empty": "\n",
        "f_cols": "0 0.5 0.5\n", "g_range": "0 0.5 0.5 1.5 0.2\n", "h_neg": "0 0.5 0.5 0.2 -0.1\n"})
    (images / "i_unreadable.jpg").write_bytes(b"this is not an image")
    write_label(tmp_path, "i_unreadable", good)
    data = (images / "a_good.jpg").read_bytes()
    (images / "j_truncated.jpg").write_bytes(data[: len(data) // 2])
    write_label(tmp_path, "j_truncated", good)
    write_image(images / "k_tiny.png", w=8, h=8)

    ds = LoadImagesAndLabels(str(images), img_size=64)
    assert summary(yolo_log) == (3, 2, 6)  # a, b, c labelled; d, e backgrounds; f..k corrupt
    assert len(ds) == ds.n == 5
    stems = [Path(f).stem for f in ds.im_files]
    assert stems == ["a_good", "b_good", "c_dup", "d_nolabel", "e_empty"]
    for bad in ("f_cols", "g_range", "h_neg", "i_unreadable", "j_truncated", "k_tiny"):
        assert sum(bad in m and "WARNING: ignoring" in m for m in yolo_log) == 1, bad
    dup = [m for m in yolo_log if "duplicate" in m]
    assert len(dup) == 1 and "c_dup.jpg" in dup[0] and "1 duplicate label rows removed" in dup[0]
    np.testing.assert_allclose(ds.labels[2], [[0, 0.5, 0.5, 0.2, 0.2], [1, 0.3, 0.3, 0.1, 0.1]])
    assert ds.labels[3].shape == (0, 5) and ds.labels[4].shape == (0, 5)
    np.testing.assert_array_equal(ds.shapes, [[64, 48]] * 5)


def test_small_tolerance_is_clipped_and_polygons_become_boxes(tmp_path, yolo_log):
    images = make_dataset(tmp_path, {"tol": "0 0.5 1.0005 0.2 0.2\n",
                                     "poly": "2 0.1 0.2 0.5 0.2 0.3 0.6\n"})
    ds = LoadImagesAndLabels(images, img_size=64)
    assert summary(yolo_log) == (2, 0, 0)
    np.testing.assert_allclose(ds.labels[0], [[2, 0.3, 0.4, 0.4, 0.4]], atol=1e-6)
    np.testing.assert_allclose(ds.labels[1], [[0, 0.5, 1.0, 0.2, 0.2]], atol=1e-6)


def test_no_usable_image_is_a_user_error(tmp_path):
    images = make_dataset(tmp_path, {"x": "0 0.5 0.5\n"})
    with pytest.raises(UserError, match="no usable images"):
        LoadImagesAndLabels(images, img_size=64)
    with pytest.raises(UserError, match="does not exist"):
        LoadImagesAndLabels(tmp_path / "nope", img_size=64)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        LoadImagesAndLabels(tmp_path / "empty", img_size=64)


def test_training_needs_labels(tmp_path):
    images = make_dataset(tmp_path, {"a": None, "b": ""})
    LoadImagesAndLabels(images, img_size=64)  # validation on backgrounds only is allowed
    with pytest.raises(UserError, match="no labels"):
        LoadImagesAndLabels(images, img_size=64, augment=True, hyp=HYP)
    with pytest.raises(UserError, match="missing"):
        LoadImagesAndLabels(images, img_size=64, augment=True, hyp={"hsv_h": 0.1})


def test_label_class_outside_nc_is_left_out_and_counted(tmp_path, yolo_log):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "3 0.5 0.5 0.2 0.2\n0 0.2 0.2 0.1 0.1\n",
                                     "c": "2 0.5 0.5 0.2 0.2\n"})
    ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=HYP, nc=3, prefix="train: ")
    assert [Path(f).name for f in ds.im_files] == ["a.jpg", "c.jpg"] and summary(yolo_log) == (2, 0, 1)
    assert any("ignoring" in m and "b.jpg: label class 3 is not one of the dataset's classes 0-2 (nc=3)" in m
               for m in yolo_log)
    ds = LoadImagesAndLabels(images, img_size=64, nc=4)  # the cache holds every image; nc applies afterwards
    assert len(ds) == 3 and summary(yolo_log) == (3, 0, 0)
    with pytest.raises(UserError, match=r"no usable images \(3 corrupt"):
        LoadImagesAndLabels(images, img_size=64, nc=0)


def test_binary_txt_list_is_one_line(tmp_path):
    lst = tmp_path / "train.txt"
    lst.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(UserError, match=r"train.txt: cannot read this image list \(not a text file\); a .txt list "
                                        r"holds one image path per line"):
        LoadImagesAndLabels(str(lst), img_size=64)


def test_txt_list_and_list_of_sources(tmp_path, yolo_log):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "1 0.5 0.5 0.2 0.2\n", "c": None})
    lst = tmp_path / "val.txt"
    lst.write_text("./images/train/a.jpg\nimages/train/b.jpg\n\n")
    ds = LoadImagesAndLabels(str(lst), img_size=64)
    assert [Path(f).name for f in ds.im_files] == ["a.jpg", "b.jpg"]
    assert ds.cache_path == tmp_path / "val.cache"
    ds = LoadImagesAndLabels([str(images / "c.jpg"), str(lst)], img_size=64)
    assert len(ds) == 3 and summary(yolo_log) == (2, 1, 0)


# ----------------------------------------------------------------------------------------------------------------------
# Label cache
# ----------------------------------------------------------------------------------------------------------------------

def test_cache_reused_then_rebuilt_when_a_file_changes(tmp_path, yolo_log, monkeypatch):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": "0 0.5 0.5 0.4 0.4\n", "c": "bad\n"})
    LoadImagesAndLabels(images, img_size=64)
    cache = tmp_path / "labels" / "train.cache"
    assert cache.is_file() and any("New cache created" in m for m in yolo_log)
    yolo_log.clear()

    def no_scan(args):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dl, "verify_image_label", no_scan)
    ds = LoadImagesAndLabels(images, img_size=64)
    assert any("(cached)" in m for m in yolo_log) and summary(yolo_log) == (2, 0, 1)
    assert any("c.jpg" in m and "WARNING" in m for m in yolo_log)  # cached warnings are shown again
    np.testing.assert_allclose(ds.labels[1], [[0, 0.5, 0.5, 0.4, 0.4]])
    monkeypatch.undo()

    yolo_log.clear()
    write_label(tmp_path, "b", "0 0.5 0.5 0.4 0.4\n2 0.2 0.2 0.1 0.1\n")  # edit a label
    ds = LoadImagesAndLabels(images, img_size=64)
    assert any("New cache created" in m for m in yolo_log)
    assert ds.labels[1].shape == (2, 5)

    yolo_log.clear()
    write_label(tmp_path, "c", "1 0.5 0.5 0.1 0.1\n")  # fix the bad one
    ds = LoadImagesAndLabels(images, img_size=64)
    assert summary(yolo_log) == (3, 0, 0)

    yolo_log.clear()
    (images / "a.jpg").unlink()  # remove an image
    ds = LoadImagesAndLabels(images, img_size=64)
    assert len(ds) == 2 and summary(yolo_log) == (2, 0, 0)


def test_cache_same_size_edit_is_detected(tmp_path, yolo_log):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    LoadImagesAndLabels(images, img_size=64)
    f = write_label(tmp_path, "a", "3 0.5 0.5 0.2 0.2\n")  # same size, other content
    st = f.stat()
    import os
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    ds = LoadImagesAndLabels(images, img_size=64)
    assert ds.labels[0][0, 0] == 3


def test_cache_version_mismatch_rebuilds(tmp_path, yolo_log, monkeypatch):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    LoadImagesAndLabels(images, img_size=64)
    yolo_log.clear()
    monkeypatch.setattr(dl, "CACHE_VERSION", "some-other-version")
    LoadImagesAndLabels(images, img_size=64)
    assert any("New cache created" in m for m in yolo_log)


def test_cache_write_failure_is_a_warning(tmp_path, yolo_log):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "labels" / "train.cache").mkdir()  # a folder where the cache file should go
    ds = LoadImagesAndLabels(images, img_size=64)
    assert len(ds) == 1
    assert any("WARNING" in m and "not written" in m for m in yolo_log)


def test_corrupt_cache_file_rebuilds(tmp_path, yolo_log):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    (tmp_path / "labels" / "train.cache").write_bytes(b"garbage")
    ds = LoadImagesAndLabels(images, img_size=64)
    assert len(ds) == 1 and any("New cache created" in m for m in yolo_log)


# ----------------------------------------------------------------------------------------------------------------------
# Items, rect batches, mosaic, collate
# ----------------------------------------------------------------------------------------------------------------------

def test_letterboxed_item_labels_and_shapes(tmp_path):
    images = make_dataset(tmp_path, {"a": "2 0.5 0.5 0.5 0.5\n"})  # 64 x 48 image
    ds = LoadImagesAndLabels(images, img_size=128)
    im, labels, f, shapes = ds[0]
    assert im.dtype == torch.uint8 and im.shape == (3, 128, 128) and im.is_contiguous()
    # resized to 128 x 96, padded by 16 top and bottom
    np.testing.assert_allclose(labels.numpy(), [[0, 2, 0.5, 0.5, 0.5, 0.375]], atol=1e-6)
    assert shapes == ((48, 64), ((2.0, 2.0), (0.0, 16.0)))
    bgr = cv2.imread(f)
    rgb = im.numpy().transpose(1, 2, 0)[16:112]
    expected = cv2.resize(bgr, (128, 96), interpolation=cv2.INTER_LINEAR)[..., ::-1]
    np.testing.assert_array_equal(rgb, expected)


def test_rect_batch_shapes(tmp_path):
    root = tmp_path
    sizes = {"p2": (32, 64), "l2": (64, 32), "p1": (48, 64), "l1": (64, 48)}  # (w, h)
    for i, (stem, (w, h)) in enumerate(sizes.items()):
        write_image(root / "images" / "val" / f"{stem}.jpg", w=w, h=h, seed=i)
        write_label(root, stem, "0 0.5 0.5 0.5 0.5\n", "val")
    ds = LoadImagesAndLabels(root / "images" / "val", img_size=128, batch_size=2, rect=True, stride=32)
    assert [Path(f).stem for f in ds.im_files] == ["l2", "l1", "p1", "p2"]  # by h / w
    np.testing.assert_array_equal(ds.batch_shapes, [[96, 128], [128, 96]])
    assert [tuple(ds[i][0].shape[1:]) for i in range(4)] == [(96, 128)] * 2 + [(128, 96)] * 2
    ds = LoadImagesAndLabels(root / "images" / "val", img_size=128, batch_size=2, rect=True, stride=32, pad=0.5)
    np.testing.assert_array_equal(ds.batch_shapes, [[128, 160], [160, 128]])  # ceil(3 + 0.5) * 32, ceil(4.5) * 32
    ds = LoadImagesAndLabels(root / "images" / "val", img_size=128, batch_size=4, rect=True, stride=32)
    np.testing.assert_array_equal(ds.batch_shapes, [[128, 128]])  # mixed orientations: square
    loader, _ = create_dataloader(str(root / "images" / "val"), 128, 2, 32, rect=True, workers=0)
    assert [tuple(b[0].shape) for b in loader] == [(2, 3, 96, 128), (2, 3, 128, 96)]


def test_mosaic_shape_and_labels_inside(tmp_path):
    items = {f"{i:02d}": f"{i % 3} 0.3 0.4 0.3 0.4\n{(i + 1) % 3} 0.7 0.7 0.2 0.3\n" for i in range(8)}
    images = make_dataset(tmp_path, items)
    hyp = dict(HYP, degrees=10.0, shear=2.0, perspective=0.0005, flipud=0.5)
    ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=hyp)
    assert ds.mosaic
    random.seed(0)
    np.random.seed(0)
    n_labels = 0
    for i in range(16):
        im, labels, _, shapes = ds[i % len(ds)]
        assert im.shape == (3, 64, 64) and im.dtype == torch.uint8 and shapes is None
        lb = labels.numpy()
        assert (lb[:, 0] == 0).all() and set(lb[:, 1].tolist()) <= {0, 1, 2}
        x1, y1 = lb[:, 2] - lb[:, 4] / 2, lb[:, 3] - lb[:, 5] / 2
        x2, y2 = lb[:, 2] + lb[:, 4] / 2, lb[:, 3] + lb[:, 5] / 2
        assert (x1 >= -1e-6).all() and (y1 >= -1e-6).all() and (x2 <= 1 + 1e-6).all() and (y2 <= 1 + 1e-6).all()
        assert (lb[:, 4] > 0).all() and (lb[:, 5] > 0).all()
        n_labels += len(lb)
    assert n_labels > 16  # most mosaics keep several boxes


def test_mosaic_boxes_cover_the_drawn_objects(tmp_path):
    """White squares on black images: every mosaic label box holds white pixels at its centre."""
    root = tmp_path
    for i in range(4):
        im = np.zeros((64, 64, 3), np.uint8)
        im[16:48, 8:40] = 255  # box centre (24, 32), size 32 x 32
        f = root / "images" / "train" / f"{i}.png"
        f.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(f), im)
        write_label(root, str(i), "0 0.375 0.5 0.5 0.5\n")
    hyp = dict(HYP, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0.5)
    ds = LoadImagesAndLabels(root / "images" / "train", img_size=64, augment=True, hyp=hyp)
    random.seed(1)
    for k in range(10):
        im, labels, _, _ = ds[k % 4]
        img = im.numpy()[0].astype(int)
        for _, _, xc, yc, w, h in labels.numpy():
            assert img[int(yc * 64), int(xc * 64)] > 200
            assert img[min(int((yc + h / 2) * 64) + 1, 63), int(xc * 64)] < 200 or yc + h / 2 > 0.97


def test_collate_fns(tmp_path):
    images = make_dataset(tmp_path, {f"{i}": "0 0.5 0.5 0.5 0.5\n1 0.2 0.2 0.1 0.1\n" for i in range(4)})
    ds = LoadImagesAndLabels(images, img_size=64)
    batch = [ds[i] for i in range(4)]
    ims, targets, paths, shapes = LoadImagesAndLabels.collate_fn(batch)
    assert ims.shape == (4, 3, 64, 64) and targets.shape == (8, 6)
    assert targets[:, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3] and len(paths) == len(shapes) == 4
    random.seed(0)  # first draw 0.84 >= 0.5: a 2x2 tile
    ims, targets, paths, shapes = LoadImagesAndLabels.collate_fn4([ds[i] for i in range(4)])
    assert ims.shape == (1, 3, 128, 128) and targets.shape == (8, 6) and len(paths) == 1
    assert (targets[:, 0] == 0).all()
    one = ds[0][1][:, 2:].numpy()  # every image has the same labels: [[0.5, 0.5, 0.5, 0.375], [0.2, ...]]
    np.testing.assert_allclose(targets[:2, 2:].numpy(), one * 0.5)  # 1st image: top left, half size
    np.testing.assert_allclose(targets[2:4, 2:].numpy(), (one + [0, 1, 0, 0]) * 0.5)  # 2nd: bottom left
    np.testing.assert_allclose(targets[4:6, 2:].numpy(), (one + [1, 0, 0, 0]) * 0.5)  # 3rd: top right
    np.testing.assert_allclose(targets[6:, 2:].numpy(), (one + [1, 1, 0, 0]) * 0.5)  # 4th: bottom right
    assert torch.equal(ims[0, :, 64:, :64], ds[1][0]) and torch.equal(ims[0, :, :64, 64:], ds[2][0])
    random.seed(1)  # first draw 0.13 < 0.5: the first image upscaled 2x
    ims, targets, _, _ = LoadImagesAndLabels.collate_fn4([ds[i] for i in range(4)])
    assert ims.shape == (1, 3, 128, 128) and targets.shape == (2, 6)
    np.testing.assert_allclose(targets[:, 2:].numpy(), ds[0][1][:, 2:].numpy())


def test_single_cls_min_items_and_image_weights_indices(tmp_path):
    images = make_dataset(tmp_path, {"a": "3 0.5 0.5 0.2 0.2\n", "b": "5 0.5 0.5 0.2 0.2\n4 0.2 0.2 0.1 0.1\n"})
    ds = LoadImagesAndLabels(images, img_size=64, single_cls=True)
    assert all((lb[:, 0] == 0).all() for lb in ds.labels)
    ds = LoadImagesAndLabels(images, img_size=64, min_items=2)
    assert [Path(f).stem for f in ds.im_files] == ["b"]
    ds = LoadImagesAndLabels(images, img_size=64, image_weights=True, rect=True)
    assert not ds.rect
    ds.indices = [1, 1]
    assert Path(ds[0][2]).stem == "b"


@pytest.mark.parametrize("cache", ["ram", "disk"])
def test_image_cache_gives_same_items(tmp_path, cache):
    images = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n", "b": None})
    plain = LoadImagesAndLabels(images, img_size=96)
    cached = LoadImagesAndLabels(images, img_size=96, cache_images=cache)
    for i in range(2):
        assert torch.equal(plain[i][0], cached[i][0]) and torch.equal(plain[i][1], cached[i][1])
    if cache == "ram":
        assert all(im is not None for im in cached.ims)
    else:
        assert sorted(p.name for p in images.glob("*.npy")) == ["a.npy", "b.npy"]
    with pytest.raises(UserError, match="ram or disk"):
        LoadImagesAndLabels(images, img_size=96, cache_images="gpu")


def test_infinite_loader_keeps_workers(tmp_path):
    images = make_dataset(tmp_path, {f"{i}": "0 0.5 0.5 0.2 0.2\n" for i in range(4)})
    loader, ds = create_dataloader(str(images), 64, 2, 32, workers=1, shuffle=True, seed=3)
    assert isinstance(loader, InfiniteDataLoader) and loader.num_workers == 1
    first = [p for _, _, paths, _ in loader for p in paths]
    it1 = loader._iterator
    second = [p for _, _, paths, _ in loader for p in paths]
    assert loader._iterator is it1  # the same worker processes served both epochs
    assert sorted(first) == sorted(second) == sorted(ds.im_files)
    loader, _ = create_dataloader(str(images), 64, 2, 32, workers=1, image_weights=True)
    assert not isinstance(loader, InfiniteDataLoader)
    loader, _ = create_dataloader(str(images), 64, 1, 32, workers=4)
    assert loader.num_workers == 0  # batch size 1 loads in the main process



def test_training_batches_depend_on_seed_and_epoch_only(tmp_path):
    """EpochSampler: the batches of an epoch (order and augmentations) are the same with 0 or 2 workers and when the
    epoch is reached by set_epoch instead of by iterating; other epochs and other seeds differ; the caller's own
    random streams are left as they were."""
    images = make_dataset(tmp_path, {f"{i}": "0 0.5 0.5 0.2 0.2\n1 0.3 0.3 0.1 0.2\n" for i in range(6)})

    def epoch(workers, e, seed=3, iterate=False):
        loader, _ = create_dataloader(str(images), 64, 2, 32, hyp=HYP, augment=True, workers=workers, shuffle=True,
                                      seed=seed)
        if iterate:
            for _ in range(e):
                list(loader)
        else:
            loader.sampler.set_epoch(e)
        return [(im.clone(), t.clone(), p) for im, t, p, _ in loader]

    def same(a, b):
        return all(p1 == p2 and torch.equal(i1, i2) and torch.equal(t1, t2) for (i1, t1, p1), (i2, t2, p2) in zip(a, b))

    random.seed(11)
    np.random.seed(11)
    state, np_state = random.random(), np.random.random()
    random.seed(11)
    np.random.seed(11)
    e2 = epoch(0, 2)
    assert (random.random(), np.random.random()) == (state, np_state)  # loading drew nothing from them
    assert same(e2, epoch(2, 2)) and same(e2, epoch(0, 2, iterate=True))
    assert not same(e2, epoch(0, 1)) and not same(e2, epoch(0, 2, seed=4))


# ----------------------------------------------------------------------------------------------------------------------
# LoadImages
# ----------------------------------------------------------------------------------------------------------------------

def test_load_images_skips_unreadable_file(tmp_path, yolo_log):
    write_image(tmp_path / "a.jpg", w=100, h=50)
    (tmp_path / "b.jpg").write_bytes(b"broken")
    write_image(tmp_path / "c.png", w=40, h=80)
    (tmp_path / "notes.md").write_text("not an image")
    ds = LoadImages(tmp_path, img_size=64, stride=32)
    assert len(ds) == 3
    out = list(ds)
    assert [Path(p).name for p, *_ in out] == ["a.jpg", "c.png"]
    assert sum("b.jpg" in m and "WARNING" in m for m in yolo_log) == 1
    path, im, im0, cap, s = out[0]
    assert im0.shape == (50, 100, 3) and cap is None
    assert im.shape == (3, 32, 64) and im.flags["C_CONTIGUOUS"] and im.dtype == np.uint8
    assert s == f"image 1/3 {path}: "
    assert out[1][1].shape == (3, 64, 32) and out[1][4].startswith("image 3/3")
    expected = cv2.resize(im0, (64, 32), interpolation=cv2.INTER_LINEAR)[..., ::-1].transpose(2, 0, 1)
    np.testing.assert_array_equal(im, expected)  # resized, RGB, CHW; no padding needed at 64 x 32


def test_load_images_sources(tmp_path):
    a, b = write_image(tmp_path / "x" / "a.jpg"), write_image(tmp_path / "y" / "b.png")
    lst = tmp_path / "list.txt"
    lst.write_text(f"{a}\n{b}\n")
    assert len(LoadImages(str(lst), 64)) == 2
    assert len(LoadImages(str(tmp_path / "*" / "*.*"), 64)) == 2
    assert len(LoadImages([str(a), str(b)], 64)) == 2
    assert len(LoadImages(str(a), 64, auto=False)) == 1
    assert next(iter(LoadImages(str(a), 64, auto=False)))[1].shape == (3, 64, 64)
    with pytest.raises(UserError, match="does not exist"):
        LoadImages(tmp_path / "missing.jpg")
    (tmp_path / "z").mkdir()
    with pytest.raises(UserError, match="no images or videos"):
        LoadImages(tmp_path / "z")


def test_load_images_video(tmp_path):
    f = str(tmp_path / "v.avi")
    writer = cv2.VideoWriter(f, cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG video")
    for i in range(5):
        writer.write(np.full((48, 64, 3), 40 * i, np.uint8))
    writer.release()
    frames = list(LoadImages(f, img_size=64))
    assert len(frames) == 5
    assert frames[0][3] is not None and frames[0][4].startswith("video 1/1 (1/5)")
    assert frames[0][1].shape == (3, 64, 64) or frames[0][1].shape == (3, 48, 64)
    assert len(list(LoadImages(f, img_size=64, vid_stride=2))) == 2


# ----------------------------------------------------------------------------------------------------------------------
# check_dataset
# ----------------------------------------------------------------------------------------------------------------------

def write_yaml(path, text):
    path.write_text(text)
    return str(path)


def test_check_dataset_resolves_and_normalises(tmp_path):
    make_dataset(tmp_path / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"}, "val")
    f = write_yaml(tmp_path / "d.yaml", f"path: {tmp_path / 'ds'}\ntrain: images/val\nval: [images/val]\n"
                                       "names: [cat, dog]\nannotations: annotations/x.json\n")
    data = check_dataset(f)
    assert data["names"] == {0: "cat", 1: "dog"} and data["nc"] == 2
    assert data["train"] == str(tmp_path / "ds" / "images" / "val") and data["val"] == [data["train"]]
    assert data["test"] is None and data["path"] == tmp_path / "ds"
    assert data["annotations"] == str(tmp_path / "ds" / "annotations" / "x.json")


@pytest.mark.parametrize("text, match", [
    ("train: a\nval: b\n", "missing key 'names'"),
    ("train: a\nnames: [x]\n", "missing key 'val'"),
    ("val: a\nnames: [x]\n", "missing key 'train'"),
    ("train: a\nval: b\nnames: [x, y]\nnc: 3\n", "nc=3"),
    ("train: a\nval: b\nnames: [x, y]\nnc: ten\n", "nc 'ten' must be an integer"),
    ("train: a\nval: b\nnames: {0: x, 2: y}\n", "without gaps"),
    ("- just a list\n", "mapping"),
    ("train: a\nval: [b\n", "not valid YAML"),
])
def test_check_dataset_bad_yaml(tmp_path, text, match):
    f = write_yaml(tmp_path / "bad.yaml", text)
    with pytest.raises(UserError, match=re.escape(match)) as e:
        check_dataset(f)
    assert "bad.yaml" in str(e.value)


def test_check_dataset_missing_val_without_download(tmp_path):
    f = write_yaml(tmp_path / "d.yaml", f"path: {tmp_path}\ntrain: images/train\nval: images/val\nnames: [a]\n")
    with pytest.raises(UserError, match="no 'download' step") as e:
        check_dataset(f)
    assert str(tmp_path / "images" / "val") in str(e.value)
    f = write_yaml(tmp_path / "e.yaml", f"path: {tmp_path}\ntrain: t\nval: v\nnames: [a]\ndownload: generate:shapes\n")
    with pytest.raises(UserError, match="autodownload is off"):
        check_dataset(f, autodownload=False)


def test_check_dataset_never_executes_download_code(tmp_path):
    marker = tmp_path / "ran"
    f = write_yaml(tmp_path / "d.yaml", f"path: {tmp_path}\ntrain: t\nval: v\nnames: [a]\n"
                                       f"download: |\n  open('{marker}', 'w').write('x')\n")
    with pytest.raises(UserError, match="not supported"):
        check_dataset(f)
    assert not marker.exists()
    f = write_yaml(tmp_path / "g.yaml", f"path: {tmp_path}\ntrain: t\nval: v\nnames: [a]\ndownload: generate:nope\n")
    with pytest.raises(UserError, match="no generator named 'nope'"):
        check_dataset(f)


def test_download_list_is_checked_before_any_entry_runs(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setitem(dataset_yaml.GENERATORS, "shapes", lambda root: ran.append(root))
    f = write_yaml(tmp_path / "l.yaml", f"path: {tmp_path}\ntrain: t\nval: v\nnames: [a]\n"
                                       f"download: ['generate:shapes', 'rm -rf x']\n")
    with pytest.raises(UserError, match="download entry 'rm -rf x' is not supported"):
        check_dataset(f)
    assert ran == []  # the good first entry did not run either


def test_check_dataset_generates_shapes(tmp_path, monkeypatch):
    from utils.shapes import generate
    monkeypatch.setitem(dataset_yaml.GENERATORS, "shapes", lambda root: generate(root, n_train=2, n_val=3))
    data = check_dataset({"path": str(tmp_path / "shapes"), "train": "images/train", "val": "images/val",
                          "names": {i: str(i) for i in range(10)}, "download": "generate:shapes"})
    assert len(list(Path(data["val"]).glob("*.jpg"))) == 3
    ds = LoadImagesAndLabels(data["val"], img_size=64)
    assert len(ds) == 3


def test_check_dataset_downloads_and_unzips_url(tmp_path):
    src = tmp_path / "src"
    make_dataset(src / "ds", {"a": "0 0.5 0.5 0.2 0.2\n"}, "val")
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in (src / "ds").rglob("*"):
            z.write(p, p.relative_to(src))
    root = tmp_path / "datasets" / "ds"
    data = check_dataset({"path": str(root), "train": "images/val", "val": "images/val", "names": ["a"],
                          "download": [archive.as_uri()]})
    assert (root / "images" / "val" / "a.jpg").is_file() and (root / "labels" / "val" / "a.txt").is_file()
    assert not (tmp_path / "datasets" / "ds.zip").exists()  # archive removed after unpacking
    assert Path(data["val"]).is_dir()


def test_repo_yamls_are_valid():
    from utils.general import ROOT, yaml_load
    for name, nc in (("coco.yaml", 80), ("coco128.yaml", 80), ("shapes.yaml", 10),
                     ("shapes_val1200.yaml", 10)):
        raw = yaml_load(ROOT / "data" / name)
        assert len(raw["names"]) == nc and len(raw["category_ids"]) == nc
        with pytest.raises(UserError, match="autodownload is off"):  # not present here; nothing is fetched
            check_dataset(dict(raw, path=str(ROOT / "no-such-dir" / name)), autodownload=False)
    coco = yaml_load(ROOT / "data" / "coco.yaml")
    assert coco["path"] == "../datasets/coco" and coco["val"] == "val2017.txt"
    assert coco["names"][0] == "person" and coco["names"][79] == "toothbrush"
    assert coco["download"][0].endswith("coco2017labels.zip")


def test_distributed_sampler_when_rank_given(tmp_path):
    import torch.distributed as dist
    images = make_dataset(tmp_path, {f"{i}": "0 0.5 0.5 0.2 0.2\n" for i in range(4)})
    dist.init_process_group("gloo", init_method=(tmp_path / "pg").as_uri(), rank=0, world_size=1)
    try:
        loader, ds = create_dataloader(str(images), 64, 2, 32, rank=0, workers=0, shuffle=True, seed=5)
        assert isinstance(loader.sampler, torch.utils.data.distributed.DistributedSampler)
        assert loader.sampler.shuffle and loader.sampler.seed == 5
        loader.sampler.set_epoch(1)
        assert sorted(p for _, _, paths, _ in loader for p in paths) == sorted(ds.im_files)
    finally:
        dist.destroy_process_group()


def test_mixup_merges_two_mosaics(tmp_path):
    items = {f"{i}": "0 0.5 0.5 0.4 0.4\n1 0.3 0.3 0.2 0.2\n" for i in range(4)}
    images = make_dataset(tmp_path, items)
    ds = LoadImagesAndLabels(images, img_size=64, augment=True, hyp=dict(HYP, mixup=1.0))
    made = []
    real = ds.load_mosaic

    def recording(index):
        out = real(index)
        made.append(out)
        return out

    ds.load_mosaic = recording
    random.seed(0)
    np.random.seed(0)
    im, labels, _, shapes = ds[0]
    assert len(made) == 2 and im.shape == (3, 64, 64) and shapes is None
    assert len(labels) == len(made[0][1]) + len(made[1][1])  # boxes of both mosaics
    ds.hyp = dict(HYP, mixup=1.0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)  # no colour change or flip after mixup
    made.clear()
    im, _, _, _ = ds[0]
    blend = im.numpy().transpose(1, 2, 0)[..., ::-1].astype(float)
    lo = np.minimum(made[0][0], made[1][0]).astype(float) - 1
    hi = np.maximum(made[0][0], made[1][0]).astype(float) + 1
    assert ((blend >= lo) & (blend <= hi)).all()  # every pixel lies between the two mosaics


@pytest.mark.parametrize("w, h", [(269, 245), (242, 361), (301, 17), (1000, 999)])
def test_load_image_rounds_resized_sides_up_as_upstream(tmp_path, w, h):
    """Upstream v7.0 resizes to ceil(side * r); int() made odd-sized images one pixel short and changed predictions."""
    write_image(tmp_path / "images" / "val" / "odd.jpg", w=w, h=h)
    write_label(tmp_path, "odd", "0 0.5 0.5 0.5 0.5\n", "val")
    ds = LoadImagesAndLabels(tmp_path / "images" / "val", img_size=256, batch_size=1, rect=True, stride=32)
    im, hw0, hw = ds.load_image(0)
    r = 256 / max(w, h)
    assert hw0 == (h, w)
    assert hw == im.shape[:2] == (math.ceil(h * r), math.ceil(w * r))


def test_shapes_val1200_is_shapes_with_more_val_images(tmp_path, monkeypatch):
    """data/shapes_val1200.yaml: shapes' train split and val images, then more val images from the same stream."""
    from utils.shapes import generate
    small, big = generate(tmp_path / "small", n_train=1, n_val=2), generate(tmp_path / "big", n_train=1, n_val=4)
    for split, n in (("train", 1), ("val", 2)):
        for i in range(1, n + 1):
            for kind, ext in (("images", "jpg"), ("labels", "txt")):
                f = f"{kind}/{split}/{i:06d}.{ext}"
                assert (small / f).read_bytes() == (big / f).read_bytes(), f
    assert len(list((big / "images/val").glob("*.jpg"))) == 4

    calls = []
    monkeypatch.setattr(dataset_yaml, "generate", lambda root, **kw: calls.append((Path(root), kw)))
    yaml_text = (ROOT / "data" / "shapes_val1200.yaml").read_text().replace("datasets/shapes_val1200",
                                                                           str(tmp_path / "v1200"))
    f = write_yaml(tmp_path / "v.yaml", yaml_text)
    with pytest.raises(UserError):  # the monkeypatched generator wrote nothing, so the val split is still missing
        check_dataset(f)
    assert calls == [(tmp_path / "v1200", {"n_val": 1200})]
