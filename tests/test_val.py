"""val.py end to end: the whole pipeline (letterbox, NMS, scale_boxes, matching, AP, pycocotools) on known answers.

Most tests feed the ground truth of each real dataloader batch back as the model's output (GroundTruthEcho), so the
right metrics are known exactly; the CLI tests run the reference checkpoint (random weights, 80 classes) on shapes.
"""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import reference

import val
from utils.dataloaders import create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import ROOT, yaml_load

torch.set_num_threads(1)
IOUV = np.linspace(0.5, 0.95, 10)
# Upstream's 101-point AP of a perfect detector: the recall sentinel (1.0, precision 0) makes the last interpolated
# point 0, so the trapezoid loses half of the last 0.01 step. YOLOv5 reports 0.995; COCOeval reports 1.0.
PERFECT_AP = 0.995
AP_LINE = "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]"
NAMES = {0: "disc", 1: "bar", 2: "dot"}

# Synthetic val set: stem -> ((width, height), [(cls, x1, y1, x2, y2) in pixels]). Four aspect ratios (so rect
# batches pad differently and 000003 is scaled by 320/300), boxes from 12 px to 100 px, none touching another and
# each with room on its right to be shifted by 40% of its width without leaving the image. 000005 is background.
IMAGES = {
    "000001": ((320, 256), [(0, 20, 30, 80, 90), (1, 150, 40, 250, 120), (2, 40, 150, 70, 230)]),
    "000002": ((256, 320), [(0, 30, 30, 130, 90), (2, 150, 200, 190, 300), (1, 20, 180, 60, 200)]),
    "000003": ((300, 200), [(1, 10, 10, 110, 110), (0, 150, 60, 200, 180), (2, 30, 150, 50, 170)]),
    "000004": ((320, 320), [(2, 100, 100, 200, 200), (0, 10, 250, 22, 262)]),
    "000005": ((240, 320), []),
}
N_LABELS = sum(len(b) for _, b in IMAGES.values())


def write_dataset(root: Path):
    """Images, YOLO labels, COCO annotations (image id = int(stem), category id = class + 1) and a dataset yaml."""
    rng = np.random.default_rng(0)
    (root / "images" / "val").mkdir(parents=True)
    (root / "labels" / "val").mkdir(parents=True)
    (root / "annotations").mkdir()
    coco = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": n} for c, n in NAMES.items()]}
    for stem, ((w, h), boxes) in IMAGES.items():
        cv2.imwrite(str(root / "images" / "val" / f"{stem}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        coco["images"].append({"id": int(stem), "file_name": f"{stem}.jpg", "width": w, "height": h})
        rows = []
        for c, x1, y1, x2, y2 in boxes:
            rows.append(f"{c} {(x1 + x2) / 2 / w:.8f} {(y1 + y2) / 2 / h:.8f} {(x2 - x1) / w:.8f} {(y2 - y1) / h:.8f}")
            coco["annotations"].append({"id": len(coco["annotations"]) + 1, "image_id": int(stem),
                                        "category_id": c + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                        "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
        if rows:
            (root / "labels" / "val" / f"{stem}.txt").write_text("\n".join(rows) + "\n")
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    spec = {"path": str(root), "train": "images/val", "val": "images/val", "names": NAMES,
            "annotations": "annotations/instances_val.json", "category_ids": [1, 2, 3]}
    (root / "data.yaml").write_text(yaml.safe_dump(spec))
    return root / "data.yaml"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    data = check_dataset(write_dataset(tmp_path_factory.mktemp("tiny")))
    loader = create_dataloader(data["val"], 320, 2, 32, pad=0.5, rect=True, workers=0, prefix="val: ")[0]
    return data, loader


class GroundTruthEcho(torch.nn.Module):
    """A model whose eval-mode output (bs, N, 5 + nc) is the labels of the batch val.run is looking at.

    Each label becomes a row [x, y, w, h (pixels of the letterboxed input), obj 1, one-hot class]. `shift` moves each
    box right by that fraction of its own width (IoU with its label = (1 - shift) / (1 + shift)); `class_offset` adds
    to the predicted class (modulo the model's nc); `duplicate_class` adds a second row per label at the same place
    with that class; `empty` returns no detection at all.
    """

    def __init__(self, nc, names, shift=0.0, class_offset=0, duplicate_class=None, empty=False):
        super().__init__()
        self.device_anchor = torch.nn.Parameter(torch.zeros(1))  # val.run takes the device from the parameters
        self.nc, self.names = nc, names
        self.shift, self.class_offset, self.duplicate_class, self.empty = shift, class_offset, duplicate_class, empty
        self.targets = None

    def forward(self, im, augment=False):
        bs, _, h, w = im.shape
        rows = [[] for _ in range(bs)]
        for i, c, x, y, bw, bh in self.targets.tolist():
            x, y, bw, bh = x * w + self.shift * bw * w, y * h, bw * w, bh * h
            classes = [(int(c) + self.class_offset) % self.nc]
            if self.duplicate_class is not None:
                classes.append(self.duplicate_class)
            for k in classes:
                row = [x, y, bw, bh, 1.0] + [0.0] * self.nc
                row[5 + k] = 1.0
                rows[int(i)].append(row)
        n = 0 if self.empty else max([len(r) for r in rows] + [1])
        out = torch.zeros(bs, n, 5 + self.nc, device=im.device)
        for i, r in enumerate(rows):
            if r and not self.empty:
                out[i, :len(r)] = torch.tensor(r)
        return out, []  # (inference output, raw head outputs) like an eval-mode DetectionModel


class Feed:
    """A real val dataloader that shows each batch's labels to the echo model before val.run receives the batch."""

    def __init__(self, loader, model):
        self.loader, self.model, self.dataset = loader, model, loader.dataset

    def __iter__(self):
        for im, targets, paths, shapes in self.loader:
            self.model.targets = targets.clone()  # val.run scales its targets in place
            yield im, targets, paths, shapes

    def __len__(self):
        return len(self.loader)


def run_echo(dataset, save_dir, plots=False, **kw):
    data, loader = dataset
    echo_kw = {k: kw.pop(k) for k in ("shift", "class_offset", "duplicate_class", "empty") if k in kw}
    nc_model = kw.pop("nc_model", len(NAMES))
    model = GroundTruthEcho(nc_model, NAMES, **echo_kw)
    return val.run(data, model=model, dataloader=Feed(loader, model), save_dir=save_dir, plots=plots, **kw)


def upstream_x_scale(stem, imgsz=320):
    """Upstream's scale_boxes divides x and y by one gain, h/h0 of the resized image; where ceil rounding of the
    resized size (upstream load_image) made w/w0 differ (000003: 300x200 -> 320x214), x comes back scaled by
    (w/w0)/(h/h0). Kept for parity with upstream (about 0.3% here); val.py's own metrics are unaffected (labels go
    through the same path)."""
    w0, h0 = IMAGES[stem][0]
    r = imgsz / max(w0, h0)
    return (math.ceil(w0 * r) / w0) / (math.ceil(h0 * r) / h0)


def shift_for_iou(iou):
    """Horizontal shift (fraction of the box width) that leaves an IoU of `iou` with the unshifted box."""
    return (1 - iou) / (1 + iou)


# --- metrics through the whole pipeline -----------------------------------------------------------------------------

def test_ground_truth_as_predictions_gives_maximum_map(dataset, tmp_path):
    (mp, mr, map50, map5095, *losses), maps, times = run_echo(dataset, tmp_path, plots=True)
    assert (mp, mr) == (pytest.approx(1.0), pytest.approx(1.0))
    assert map50 == pytest.approx(PERFECT_AP, abs=1e-9) and map5095 == pytest.approx(PERFECT_AP, abs=1e-9)
    assert losses == [0.0, 0.0, 0.0]  # no compute_loss given
    assert maps.tolist() == pytest.approx([PERFECT_AP] * 3, abs=1e-9)
    assert len(times) == 3 and all(t >= 0 for t in times)
    for f in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png",
              "val_batch0_labels.jpg", "val_batch0_pred.jpg"):
        assert (tmp_path / f).stat().st_size > 0, f


@pytest.mark.parametrize("iou", [0.925, 0.725, 0.525, 0.45])
def test_shifted_boxes_lose_exactly_the_thresholds_they_fail(dataset, tmp_path, iou):
    (mp, mr, map50, map5095, *_), maps, _ = run_echo(dataset, tmp_path, shift=shift_for_iou(iou))
    passed = int((IOUV <= iou).sum())  # thresholds 0.50, 0.55, ... that an IoU of `iou` still meets
    assert map5095 == pytest.approx(PERFECT_AP * passed / 10, abs=1e-6)
    assert map50 == pytest.approx(PERFECT_AP if passed else 0.0, abs=1e-6)
    assert (mp, mr) == (pytest.approx(1.0 if passed else 0.0), pytest.approx(1.0 if passed else 0.0))
    assert maps.tolist() == pytest.approx([PERFECT_AP * passed / 10] * 3, abs=1e-6)


def test_empty_predictions_give_zero(dataset, tmp_path, yolo_log):
    (mp, mr, map50, map5095, *_), maps, _ = run_echo(dataset, tmp_path, empty=True, save_json=True, plots=True)
    assert (mp, mr, map50, map5095) == (0.0, 0.0, 0.0, 0.0)
    assert maps.tolist() == [0.0, 0.0, 0.0]
    assert any("No predictions of the dataset's 3 classes above --conf-thres 0.001 to save as JSON" in m
               for m in yolo_log)
    assert (tmp_path / "PR_curve.png").is_file()  # curves are drawn (all zero) rather than silently missing


def test_wrong_class_is_never_a_true_positive(dataset, tmp_path):
    """Every box in its exact place but predicted as the next class: nothing matches."""
    (mp, mr, map50, map5095, *_), _, _ = run_echo(dataset, tmp_path, class_offset=1)
    assert (mp, mr, map50, map5095) == (0.0, 0.0, 0.0, 0.0)


def test_classes_beyond_the_dataset_never_match(dataset, tmp_path):
    """A model with more classes than the dataset: its extra classes are never true positives and change nothing."""
    nc = len(NAMES)
    only_extra = run_echo(dataset, tmp_path / "a", class_offset=nc, nc_model=nc + 5)[0]
    assert only_extra[:4] == (0.0, 0.0, 0.0, 0.0)  # perfectly placed boxes, but of classes 3..5
    (mp, mr, map50, map5095, *_), maps, _ = run_echo(dataset, tmp_path / "b", duplicate_class=nc + 2,
                                                      nc_model=nc + 5, save_json=True, plots=True)
    assert (mp, mr) == (pytest.approx(1.0), pytest.approx(1.0))
    assert (map50, map5095) == (1.0, 1.0)  # the pycocotools result: the extra classes have no category
    assert maps.tolist() == pytest.approx([PERFECT_AP] * nc, abs=1e-9)  # val.py's per-class APs
    preds = json.loads((tmp_path / "b" / "_predictions.json").read_text())
    assert len(preds) == N_LABELS and {p["category_id"] for p in preds} == {1, 2, 3}
    assert (tmp_path / "b" / "confusion_matrix.png").is_file()


def test_save_json_runs_cocoeval(dataset, tmp_path, capsys):
    (_, _, map50, map5095, *_), maps, _ = run_echo(dataset, tmp_path / "gt", save_json=True)
    out = capsys.readouterr().out
    assert AP_LINE + " = 1.000" in out
    assert "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000" in out
    assert (map50, map5095) == (1.0, 1.0)  # pycocotools' numbers replace val.py's 0.995
    assert maps.tolist() == pytest.approx([PERFECT_AP] * 3, abs=1e-9)  # per class: val.py's own APs, as upstream

    # the JSON boxes are the COCO annotations with letterbox and rect padding undone, ids and categories right
    preds = json.loads((tmp_path / "gt" / "_predictions.json").read_text())
    anno = json.loads((Path(dataset[0]["annotations"])).read_text())["annotations"]
    key = lambda a: (a["image_id"], a["category_id"], a["bbox"][1])  # noqa: E731
    assert len(preds) == len(anno) == N_LABELS
    for p, a in zip(sorted(preds, key=key), sorted(anno, key=key)):
        assert (p["image_id"], p["category_id"], p["score"]) == (a["image_id"], a["category_id"], 1.0)
        x_scale = upstream_x_scale(f"{a['image_id']:06d}")
        x, y, w, h = a["bbox"]
        assert p["bbox"] == pytest.approx([x * x_scale, y, w * x_scale, h], abs=0.01)

    # boxes at IoU 0.725 pass 5 of COCO's 10 thresholds: 0.5 from pycocotools (val.py's own: 0.995 * 5 / 10)
    (_, _, map50, map5095, *_), _, _ = run_echo(dataset, tmp_path / "shift", save_json=True,
                                                shift=shift_for_iou(0.725))
    out = capsys.readouterr().out
    assert AP_LINE + " = 0.500" in out
    assert "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ] = 0.000" in out
    assert (map50, map5095) == (1.0, pytest.approx(0.5, abs=1e-9))


def test_cocoeval_skipped_with_warning_when_annotations_miss_images(dataset, tmp_path, yolo_log):
    data, loader = dataset
    anno = json.loads(Path(data["annotations"]).read_text())
    anno["images"] = [im for im in anno["images"] if im["id"] != 3]
    bad = tmp_path / "partial.json"
    bad.write_text(json.dumps(anno))
    (_, _, map50, map5095, *_), _, _ = run_echo(({**data, "annotations": str(bad)}, loader), tmp_path,
                                                save_json=True)
    assert any(f"{bad} has no image with id 3" in m for m in yolo_log)
    assert (map50, map5095) == (pytest.approx(PERFECT_AP), pytest.approx(PERFECT_AP))  # val.py's own numbers stand


def test_save_txt_writes_the_labels_back(dataset, tmp_path):
    run_echo(dataset, tmp_path, save_txt=True, save_conf=True)
    written = sorted(p.name for p in (tmp_path / "labels").glob("*.txt"))
    assert written == [f"{s}.txt" for s, (_, b) in IMAGES.items() if b]
    for stem, (_, boxes) in IMAGES.items():
        if not boxes:
            continue
        got = np.loadtxt(tmp_path / "labels" / f"{stem}.txt", ndmin=2)
        want = np.loadtxt(dataset[0]["path"] / "labels" / "val" / f"{stem}.txt", ndmin=2)
        want[:, [1, 3]] *= upstream_x_scale(stem)
        assert got.shape == (len(boxes), 6) and (got[:, 5] == 1.0).all()  # class, xywh normalised, conf
        order = lambda a: a[np.lexsort((a[:, 1], a[:, 0]))]  # noqa: E731
        assert order(got[:, :5]) == pytest.approx(order(want), abs=2e-5)


def test_callbacks_see_every_stage(dataset, tmp_path):
    class Recorder:
        def __init__(self):
            self.calls = []

        def run(self, name, *args):
            self.calls.append(name)

    rec = Recorder()
    run_echo(dataset, tmp_path, callbacks=rec)
    n_batches, n_images = len(dataset[1]), len(IMAGES)
    assert rec.calls[0] == "on_val_start" and rec.calls[-1] == "on_val_end"
    assert rec.calls.count("on_val_batch_start") == rec.calls.count("on_val_batch_end") == n_batches
    assert rec.calls.count("on_val_image_end") == n_images - 1  # the background image has no prediction


# --- validation losses from train.py's call --------------------------------------------------------------------------

def test_run_returns_validation_losses_with_compute_loss(dataset, tmp_path):
    from models.yolo import DetectionModel
    from utils.loss import ComputeLoss

    data, loader = dataset
    torch.manual_seed(0)
    model = DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=len(NAMES))
    model.hyp, model.names = yaml_load(ROOT / "data" / "hyps" / "hyp.scratch-low.yaml"), NAMES
    compute_loss = ComputeLoss(model)

    results, maps, times = val.run(data, model=model, dataloader=loader, compute_loss=compute_loss, half=False,
                                   conf_thres=0.01, save_dir=tmp_path, plots=False)
    assert len(results) == 7 and maps.shape == (len(NAMES),) and len(times) == 3

    expected = torch.zeros(3)  # the same losses computed here, batch by batch, as train.py's numbers should be
    with torch.no_grad():
        model.eval()
        for im, targets, _, _ in loader:
            _, train_out = model(im.float() / 255)
            expected += compute_loss(train_out, targets)[1]
    expected /= len(loader)
    assert results[4:] == pytest.approx(expected.tolist(), rel=1e-5)
    assert all(x > 0 for x in results[4:])


# --- the CLI on the reference checkpoint -----------------------------------------------------------------------------

def reference_weights():
    return reference("yolov5n_relu.pt")


@pytest.fixture(scope="module")
def shapes_val6(tmp_path_factory):
    """A yaml for the first 6 shapes val images (generated on first use), with shapes' COCO annotations."""
    shapes = check_dataset("shapes.yaml")
    images = sorted(Path(shapes["val"]).glob("*.jpg"))[:6]
    root = tmp_path_factory.mktemp("shapes_val6")
    (root / "val.txt").write_text("".join(f"{p}\n" for p in images))
    spec = yaml_load(ROOT / "data" / "shapes.yaml")
    spec.update(path=str(shapes["path"]), train=str(root / "val.txt"), val=str(root / "val.txt"))
    spec.pop("download")
    (root / "shapes_val6.yaml").write_text(yaml.safe_dump(spec))
    labels = [shapes["path"] / "labels" / "val" / f"{p.stem}.txt" for p in images]
    n_instances = sum(len(np.loadtxt(f, ndmin=2)) for f in labels if f.is_file() and f.stat().st_size)
    return root / "shapes_val6.yaml", len(images), n_instances


def run_val_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "val.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, env={**os.environ, "NO_COLOR": "1"})


def test_cli_end_to_end_on_reference_checkpoint(shapes_val6, tmp_path):
    data_yaml, n_images, n_instances = shapes_val6
    r = run_val_cli("--weights", reference_weights(), "--data", data_yaml, "--img", 160, "--batch-size", 8,
                    "--workers", 1, "--conf-thres", 0.25, "--project", tmp_path, "--name", "exp", "--save-txt",
                    "--save-conf", "--save-json", "--verbose")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout
    assert re.search(r"Class\s+Images\s+Instances\s+P\s+R\s+mAP50\s+mAP50-95", out)
    assert re.search(rf"\n\s+all\s+{n_images}\s+{n_instances}\s", out)
    assert re.search(r"Speed: [\d.]+ms pre-process, [\d.]+ms inference, [\d.]+ms NMS per image at shape "
                     r"\(8, 3, 160, 160\)", out)
    assert "has 80 classes, the dataset 10: predictions of classes >= 10 match no label" in out
    assert len(re.findall(r"\n\s+(circle|ring|square|square_outline|diamond|triangle|pentagon|hexagon|star|cross)"
                          rf"\s+{n_images}\s+\d+\s", out)) >= 5  # per-class rows, with the dataset's class names
    save_dir = tmp_path / "exp"
    for f in ("PR_curve.png", "F1_curve.png", "P_curve.png", "R_curve.png", "confusion_matrix.png"):
        assert (save_dir / f).stat().st_size > 0, f

    txts = list((save_dir / "labels").glob("*.txt"))
    assert txts, "--save-txt wrote no label file"
    rows = np.concatenate([np.loadtxt(f, ndmin=2) for f in txts])
    assert rows.shape[1] == 6 and (rows[:, 1:5] >= 0).all() and (rows[:, 1:5] <= 1).all()
    assert (rows[:, 5] >= 0.25).all() and (rows[:, 0] < 80).all()

    # the JSON holds exactly the saved predictions of the dataset's classes (category = class + 1); with none,
    # val.py says why pycocotools did not run (this random model spends its confidence on classes >= 10)
    pred_json = save_dir / "yolov5n_relu_predictions.json"
    n_in_dataset = int((rows[:, 0] < 10).sum())
    if n_in_dataset:
        preds = json.loads(pred_json.read_text())
        assert len(preds) == n_in_dataset and {p["category_id"] for p in preds} <= set(range(1, 11))
        assert AP_LINE in out  # pycocotools ran on shapes' annotations, restricted to the evaluated images
    else:
        assert not pred_json.exists()
        assert "No predictions of the dataset's 10 classes above --conf-thres 0.25 to save as JSON" in out


def test_cli_task_speed(shapes_val6, tmp_path):
    data_yaml, _, _ = shapes_val6
    r = run_val_cli("--weights", reference_weights(), "--data", data_yaml, "--img", 160, "--batch-size", 8,
                    "--workers", 1, "--task", "speed", "--project", tmp_path, "--name", "exp")
    assert r.returncode == 0, r.stderr[-2000:]
    assert re.search(r"Speed: [\d.]+ms pre-process, [\d.]+ms inference, [\d.]+ms NMS per image", r.stdout)
    assert not (tmp_path / "exp" / "PR_curve.png").exists()  # speed runs make no plots


BAD_INPUTS = [
    (["--weights", "/nonexistent/w.pt", "--data", "shapes.yaml"], "/nonexistent/w.pt: weights file not found"),
    (["--data", "/nonexistent/d.yaml"], "/nonexistent/d.yaml: file not found"),
    (["--data", "shapes.yaml", "--conf-thres", "2"], "--conf-thres 2.0: must be between 0.0 and 1.0"),
    (["--data", "shapes.yaml", "--iou-thres", "-0.1"], "--iou-thres -0.1: must be between 0.0 and 1.0"),
    (["--data", "shapes.yaml", "--batch-size", "0"], "--batch-size 0: must be a positive integer"),
    (["--data", "shapes.yaml", "--imgsz", "100000"], "--imgsz 100000: each size must be at most 8192 pixels"),
    (["--data", "shapes.yaml", "--ptq", "--qat-recipe", "data/hyps/hyp.qat.yaml"],
     "hyp.qat.yaml: unknown key(s) ['anchor_t', 'box',"),
]


@pytest.mark.parametrize("args, message", BAD_INPUTS)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, message):
    """What `python val.py ...` runs (run_cli(main, parse_opt())), in-process to keep the test fast."""
    from utils.general import run_cli

    if "--weights" not in args:
        args = ["--weights", str(reference_weights()), *args]
    opt = val.parse_opt([*args, "--project", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        run_cli(val.main, opt)
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert err.count("\n") == 1 and err.startswith("ERROR: ") and message in err, err
    assert not list(tmp_path.iterdir())  # no empty run folder left behind


def test_unwritable_project_one_line(tmp_path, capsys):
    from utils.general import run_cli

    (tmp_path / "a_file").write_text("")
    opt = val.parse_opt(["--weights", str(reference_weights()), "--data", "shapes.yaml", "--img", "64",
                         "--project", str(tmp_path / "a_file" / "runs")])
    with pytest.raises(SystemExit) as e:
        run_cli(val.main, opt)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert "a_file/runs/exp: cannot write the run folder (Not a directory); choose a writable --project" in err


def test_bad_input_from_the_command_line(tmp_path):
    args, message = BAD_INPUTS[0]
    r = run_val_cli(*args, "--project", tmp_path)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("ERROR: ") and message in r.stderr, r.stderr


def test_label_of_an_unknown_class_leaves_its_image_out(tmp_path, yolo_log):
    """A val label with class 7 in a 3-class dataset: that image is left out with a warning and counted as corrupt
    (the metrics cannot index a class the dataset does not have); the rest is evaluated."""
    data = write_dataset(tmp_path / "d")
    (tmp_path / "d" / "labels" / "val" / "000002.txt").write_text("7 0.5 0.5 0.2 0.2\n")
    (mp, mr, map50, map5095, *_), maps, _ = val.run(data, weights=reference_weights(), imgsz=160, batch_size=2,
                                                     workers=0, project=str(tmp_path / "runs"), plots=False)
    assert len(maps) == 3 and all(math.isfinite(x) for x in (mp, mr, map50, map5095))
    assert any("ignoring" in m and "000002.jpg: label class 7 is not one of the dataset's classes 0-2 (nc=3)" in m
               for m in yolo_log), yolo_log
    assert any(re.search(r"Scanning .*\.\.\. 3 images, 1 backgrounds, 1 corrupt", m) for m in yolo_log), yolo_log


def test_model_with_fewer_classes_than_the_dataset_is_refused(dataset, tmp_path, capsys):
    from utils.general import run_cli

    spec = {"path": str(dataset[0]["path"]), "train": "images/val", "val": "images/val",
            "names": [f"c{i}" for i in range(81)]}
    (tmp_path / "d81.yaml").write_text(yaml.safe_dump(spec))
    opt = val.parse_opt(["--weights", str(reference_weights()), "--data", str(tmp_path / "d81.yaml"),
                         "--project", str(tmp_path / "runs")])
    with pytest.raises(SystemExit) as e:
        run_cli(val.main, opt)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "model has 80 classes but the dataset has 81; pass the --data the model was trained on" in err
    assert not (tmp_path / "runs").exists()


def test_ptq_quantizes_evaluates_and_saves_the_float_checkpoint(shapes_val6, tmp_path):
    """val.run(ptq=True), as `python val.py --ptq --ptq-save f`: the float .pt is calibrated on the train split and
    evaluated fake-quantized; the saved checkpoint is a QAT model, which a second --ptq refuses as not float."""
    from models.experimental import attempt_load
    from models.quant import is_quantized
    from utils.general import UserError

    data_yaml, _, _ = shapes_val6
    kw = dict(imgsz=160, batch_size=4, workers=0, conf_thres=0.25, plots=False, project=str(tmp_path / "runs"))
    saved = tmp_path / "ptq.pt"
    r, maps, t = val.run(str(data_yaml), weights=str(reference_weights()), ptq=True, calib_batches=1,
                         ptq_save=str(saved), **kw)
    assert len(r) == 7 and len(maps) == 10 and len(t) == 3 and all(math.isfinite(x) for x in r)
    assert is_quantized(attempt_load(str(saved), "cpu", fuse=False))
    with pytest.raises(UserError, match="needs a float PyTorch .pt checkpoint"):
        val.run(str(data_yaml), weights=str(saved), ptq=True, calib_batches=1, **kw)


def test_image_stats_give_back_the_metrics_and_bootstrap_the_spread(shapes_val6, tmp_path):
    """val.run(image_stats=[...]) records what each image contributed; benchmarks/val_batch.py recomputes mAP50-95
    from it (all weights 1: val.run's own number), and the bootstrap of two identical
    checkpoints gives a spread difference of 0 on every resample while a different one does not."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("val_batch", ROOT / "benchmarks" / "val_batch.py")
    vb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vb)
    data_yaml, n_images, _ = shapes_val6
    flats = []
    for b in (1, 4):
        image_stats = []
        r = val.run(str(data_yaml), weights=str(ROOT / "weights" / "shapes_yolov5n_relu.pt"), imgsz=256, batch_size=b,
                    workers=0, plots=False, project=tmp_path, name="v", exist_ok=True, device="cpu",
                    image_stats=image_stats)[0]
        assert r[3] > 0.2 and len(image_stats) == n_images and len({p for p, _ in image_stats}) == n_images
        flat = vb.flatten(image_stats)
        ones = np.ones(n_images, dtype=int)
        assert vb.weighted_map(flat, ones) == pytest.approx(r[3], abs=1e-12)
        flats.append(flat)
    same = vb.bootstrap_spreads([flats, flats], 5)
    assert same.shape == (5, 2) and (same[:, 0] == same[:, 1]).all()
    shuffled = [flats[0], (*flats[1][:1], flats[1][1][::-1].copy(), *flats[1][2:])]  # confidences of b4 reversed
    other = vb.bootstrap_spreads([flats, shuffled], 5)
    assert (other[:, 0] != other[:, 1]).any()
