"""The embedded shapes dataset: determinism, content, COCO json consistency, yaml agreement, CLI."""
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from utils import shapes
from utils.general import ROOT, UserError, yaml_load


def _digest(root):
    """Hash of every file (relative name + bytes) under root."""
    h = hashlib.sha256()
    for f in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(str(f.relative_to(root)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def _read_labels(f):
    rows = [[float(v) for v in line.split()] for line in Path(f).read_text().splitlines() if line.strip()]
    return np.array(rows, dtype=np.float64).reshape(-1, 5)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return shapes.generate(tmp_path_factory.mktemp("gen") / "shapes", n_train=8, n_val=60, seed=0)


def test_same_seed_same_bytes_other_seed_differs(tmp_path, dataset):
    again = shapes.generate(tmp_path / "a", n_train=8, n_val=60, seed=0)
    assert _digest(again) == _digest(dataset)
    other = shapes.generate(tmp_path / "b", n_train=8, n_val=60, seed=1)
    assert _digest(other) != _digest(dataset)


def test_images_do_not_depend_on_split_size(tmp_path, dataset):
    small = shapes.generate(tmp_path / "s", n_train=3, n_val=5, seed=0)
    for split in ("train", "val"):
        for f in sorted((small / "images" / split).iterdir()):
            assert f.read_bytes() == (dataset / "images" / split / f.name).read_bytes()


def test_layout_counts_and_image_sizes(dataset):
    for split, n in (("train", 8), ("val", 60)):
        ims = sorted((dataset / "images" / split).glob("*.jpg"))
        lbs = sorted((dataset / "labels" / split).glob("*.txt"))
        assert len(ims) == len(lbs) == n
        assert [p.stem for p in ims] == [f"{i:06d}" for i in range(1, n + 1)]
    sizes = [cv2.imread(str(f)).shape[:2] for f in sorted((dataset / "images" / "val").glob("*.jpg"))]
    hs, ws = zip(*sizes)
    assert min(hs) >= 256 and max(hs) <= 384 and min(ws) >= 256 and max(ws) <= 384
    aspects = {round(w / h, 2) for h, w in sizes}
    assert len(aspects) > 20  # varied aspect ratios, not one fixed shape


def test_classes_sizes_and_backgrounds(dataset):
    rows, n_background = [], 0
    for lf in sorted((dataset / "labels" / "val").glob("*.txt")):
        lb = _read_labels(lf)
        if not len(lb):
            n_background += 1
            continue
        h, w = cv2.imread(str(dataset / "images" / "val" / f"{lf.stem}.jpg")).shape[:2]
        for c, xc, yc, bw, bh in lb:
            rows.append((int(c), bw * w, bh * h, min(w, h)))
            assert 0 <= xc - bw / 2 + 1e-6 and xc + bw / 2 <= 1 + 1e-6  # inside the image
            assert 0 <= yc - bh / 2 + 1e-6 and yc + bh / 2 <= 1 + 1e-6
    rows = np.array(rows)
    assert len(shapes.CLASS_NAMES) >= 8
    assert set(rows[:, 0].astype(int)) == set(range(len(shapes.CLASS_NAMES)))  # every class occurs
    side = rows[:, 1:3].max(1)
    assert side.min() <= 10  # small objects of about 6 px exist
    assert rows[:, 1:3].min() >= 4
    assert (side / rows[:, 3]).max() >= 0.4  # and objects of almost half the image
    assert (side / rows[:, 3]).max() <= 0.62
    assert n_background >= 1
    assert len(rows) / 60 > 3  # several objects per image on average: clutter and overlaps


def test_objects_overlap_somewhere(dataset):
    overlaps = 0
    for lf in sorted((dataset / "labels" / "val").glob("*.txt")):
        lb = _read_labels(lf)
        b = np.stack([lb[:, 1] - lb[:, 3] / 2, lb[:, 2] - lb[:, 4] / 2, lb[:, 1] + lb[:, 3] / 2,
                      lb[:, 2] + lb[:, 4] / 2], 1)
        for i in range(len(b)):
            for j in range(i + 1, len(b)):
                iw = min(b[i, 2], b[j, 2]) - max(b[i, 0], b[j, 0])
                ih = min(b[i, 3], b[j, 3]) - max(b[i, 1], b[j, 1])
                overlaps += iw > 0 and ih > 0
    assert overlaps >= 5


def test_coco_json_matches_label_files(dataset):
    coco = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    assert [c["id"] for c in coco["categories"]] == list(shapes.CATEGORY_IDS)
    assert [c["name"] for c in coco["categories"]] == list(shapes.CLASS_NAMES)
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 60
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert min(ann_ids) >= 1 and len(set(ann_ids)) == len(ann_ids)
    by_image = {}
    for a in coco["annotations"]:
        by_image.setdefault(a["image_id"], []).append(a)
    total = 0
    for lf in sorted((dataset / "labels" / "val").glob("*.txt")):
        image_id = int(lf.stem)  # val.py maps predictions to ids this way
        im = images[image_id]
        assert im["file_name"] == f"{lf.stem}.jpg"
        h, w = cv2.imread(str(dataset / "images" / "val" / im["file_name"])).shape[:2]
        assert (im["width"], im["height"]) == (w, h)
        lb = _read_labels(lf)
        anns = by_image.get(image_id, [])
        assert len(anns) == len(lb)
        for (c, xc, yc, bw, bh), a in zip(lb, anns):
            assert a["category_id"] == shapes.CATEGORY_IDS[int(c)]
            x, y, aw, ah = a["bbox"]
            np.testing.assert_allclose([x, y, aw, ah], [(xc - bw / 2) * w, (yc - bh / 2) * h, bw * w, bh * h],
                                       atol=1e-3)
            assert a["area"] == pytest.approx(aw * ah) and a["iscrowd"] == 0
        total += len(lb)
    assert total == len(coco["annotations"])


def test_label_box_is_tight_box_of_drawn_pixels(monkeypatch):
    """One object on a flat background without strokes: the changed pixels fill the label box to its edges."""
    monkeypatch.setattr(shapes, "MAX_OBJECTS", 1)
    monkeypatch.setattr(shapes, "_draw_distractors", lambda *a, **k: None)
    monkeypatch.setattr(shapes, "_background", lambda rng, w, h: np.full((h, w, 3), 128, np.uint8))
    for seed in range(30):
        img, boxes = shapes.render_image(np.random.default_rng(seed))
        assert len(boxes) == 1
        _, x1, y1, x2, y2 = boxes[0]
        ys, xs = np.nonzero(np.abs(img.astype(int) - 128).max(2) > 0)
        # faint anti-aliased fringe pixels may round back to the background value: allow 1 px inside
        assert x1 <= xs.min() <= x1 + 1 and x2 - 1 >= xs.max() >= x2 - 2
        assert y1 <= ys.min() <= y1 + 1 and y2 - 1 >= ys.max() >= y2 - 2


def test_yaml_agrees_with_generator():
    data = yaml_load(ROOT / "data" / "shapes.yaml")
    assert [data["names"][i] for i in range(len(data["names"]))] == list(shapes.CLASS_NAMES)
    assert data["category_ids"] == list(shapes.CATEGORY_IDS)
    assert data["download"] == "generate:shapes"
    assert (data["train"], data["val"]) == ("images/train", "images/val")


def test_existing_output_needs_overwrite(tmp_path):
    out = shapes.generate(tmp_path / "d", n_train=1, n_val=1)
    with pytest.raises(UserError, match="overwrite"):
        shapes.generate(out, n_train=1, n_val=1)
    shapes.generate(out, n_train=2, n_val=1, overwrite=True)
    assert len(list((out / "images" / "train").iterdir())) == 2
    assert not [p for p in tmp_path.iterdir() if "partial" in p.name]  # temporary folder cleaned up


def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, str(ROOT / "utils" / "shapes.py"), "--out", str(out), "--n-train", "2", "--n-val", "3"]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert len(list((out / "images" / "val").glob("*.jpg"))) == 3
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)  # exists: one line, exit 2
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "overwrite" in r.stderr
