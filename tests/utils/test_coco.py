"""COCO JSON: ground truth written from YOLO labels equals the dataset's own annotations file, and val.py
--save-json scores a dataset without one (the real val2017 images, when ../shared is present, as upstream does)."""
import json
import re
import subprocess
import sys

import pytest
from conftest import ROOT, SHARED
from test_val import IMAGES, write_dataset

from utils.coco import category_ids, json_from_labels
from utils.dataloaders import LoadImagesAndLabels
from utils.dataset_yaml import check_dataset


def test_ground_truth_from_labels_equals_the_annotations_file(tmp_path):
    data = check_dataset(write_dataset(tmp_path))
    ds = LoadImagesAndLabels(data["val"], img_size=320, batch_size=2, rect=True, stride=32)
    made = json.loads(json_from_labels(ds, category_ids(data), data["names"], tmp_path / "gt.json").read_text())
    given = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert sorted(made["images"], key=lambda i: i["id"]) == sorted(given["images"], key=lambda i: i["id"])
    assert made["categories"] == given["categories"]
    key = lambda a: (a["image_id"], a["category_id"], a["bbox"][0])  # noqa: E731
    assert len(made["annotations"]) == len(given["annotations"]) == sum(len(b) for _, b in IMAGES.values())
    for a, b in zip(sorted(made["annotations"], key=key), sorted(given["annotations"], key=key)):
        assert (a["image_id"], a["category_id"], a["iscrowd"]) == (b["image_id"], b["category_id"], b["iscrowd"])
        assert a["bbox"] == pytest.approx(b["bbox"], abs=1e-3) and a["area"] == pytest.approx(b["area"], rel=1e-4)


def test_release_checkpoint_on_real_val2017_images_as_upstream(tmp_path):
    """Upstream v7.0's val.py prints P 0.56, R 0.506, mAP50 0.532, mAP50-95 0.346 for the official yolov5n on these
    128 val2017 images at 640, batch 1; no trust switch is needed, and --save-json scores against labels."""
    weights, images = SHARED / "release" / "yolov5n.pt", SHARED / "coco128" / "images" / "val2017"
    if not weights.is_file() or not images.is_dir():
        pytest.skip("the release checkpoint and the coco128 val2017 images are in ../shared only")
    root = tmp_path / "coco128"  # its own images/ and labels/ folders, so the label cache is written here
    for kind in ("images", "labels"):
        (root / kind).mkdir(parents=True)
        (root / kind / "val2017").symlink_to(SHARED / "coco128" / kind / "val2017")
    data = tmp_path / "coco128_val2017.yaml"
    text = (ROOT / "data" / "coco128_val2017.yaml").read_text()
    data.write_text(text.replace("path: ../datasets/coco128", f"path: {root}"))
    r = subprocess.run([sys.executable, "val.py", "--weights", str(weights), "--data", str(data), "--img", "640",
                        "--batch-size", "1", "--save-json", "--workers", "1", "--project", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr[-2000:]
    row = re.search(r"^\s+all\s+128\s+898\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", r.stdout, re.M)
    assert row and row.groups() == ("0.56", "0.506", "0.532", "0.346"), r.stdout[-1500:]
    assert "ground truth written from the labels" in r.stdout
    assert re.search(r"IoU=0.50:0.95 \| area=   all \| maxDets=100 \] = 0.3\d\d", r.stdout)
