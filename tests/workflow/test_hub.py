"""torch.hub.load(repo, ..., source='local'): hubconf.py's entry points and workflow/hub.py's AutoShape / Detections.

The boxes AutoShape returns for an image are the ones detect.py writes for it (float and QAT checkpoints, ONNX).
"""
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error

import cv2
import numpy as np
import pytest
import torch
from conftest import ROOT, reference
from PIL import Image

from utils.general import LOGGER, UserError, xywh2xyxy

IMGSZ = 256  # the shapes checkpoint's training size
FLOAT = ROOT / "weights" / "shapes_yolov5n_relu.pt"
IMAGES = [ROOT / "data" / "images" / "shapes1.jpg", ROOT / "data" / "images" / "shapes2.jpg"]
# one thread per subprocess (2 shared cores); no PYTHONPATH, so the repo is found only the way torch.hub finds it
ENV = {**{k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, "OMP_NUM_THREADS": "1"}


def hub(path, **kw):
    return torch.hub.load(str(ROOT), "custom", path=str(path), source="local", _verbose=False, **kw)


@pytest.fixture(scope="module")
def model():
    return hub(FLOAT)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """The two sample images and a wide strip of the first (150x377: a .pt model runs it at 128x256, not square)."""
    folder = tmp_path_factory.mktemp("src")
    for f in IMAGES:
        shutil.copy(f, folder / f.name)
    cv2.imwrite(str(folder / "wide.jpg"), cv2.imread(str(IMAGES[0]))[60:210])
    return folder


@pytest.fixture(scope="module")
def qat_pt(tmp_path_factory):
    """The shapes ReLU checkpoint prepared for pow2 QAT, calibrated on the two sample images and saved (no training)."""
    from models.checkpoint import save_checkpoint
    from models.quant import QATConfig, calibrate, prepare_yolo_qat
    from utils.augmentations import letterbox
    from workflow.backend import load_pytorch_model

    m = load_pytorch_model(FLOAT, fuse=False).float().train()
    prepare_yolo_qat(m, QATConfig(pow2=True))
    ims = [letterbox(cv2.imread(str(f)), IMGSZ, auto=False)[0][..., ::-1].transpose(2, 0, 1) for f in IMAGES]
    calibrate(m, [(torch.from_numpy(np.ascontiguousarray(np.stack(ims))),)], 1, torch.device("cpu"))
    path = tmp_path_factory.mktemp("qat") / "qat.pt"
    save_checkpoint({"model": m.eval(), "ema": None, "epoch": -1, "best_fitness": None}, path)
    return path


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    """http://127.0.0.1:<port> serving data/images from a thread (no internet needed)."""
    handler = functools.partial(_QuietHandler, directory=str(ROOT / "data" / "images"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def assert_same_boxes(df, labels_txt, image):
    """The rows of a pandas().xyxy frame are detect.py's --save-txt --save-conf rows for the same image: detect.py
    rounds boxes to whole pixels, so each AutoShape box rounds to its box; confidences agree to 1e-4."""
    h, w = cv2.imread(str(image)).shape[:2]
    ref = np.loadtxt(labels_txt, ndmin=2) if labels_txt.is_file() else np.zeros((0, 6))
    want = np.concatenate([xywh2xyxy(ref[:, 1:5] * [w, h, w, h]), ref[:, 5:6], ref[:, :1]], 1)
    got = df[["xmin", "ymin", "xmax", "ymax", "confidence", "class"]].to_numpy(dtype=float)
    assert len(got) == len(want), (got, want)
    for row in got:
        dist = np.abs(want[:, :4] - row[:4]).max(1) + 1e6 * (want[:, 5] != row[5])
        j = int(dist.argmin())
        assert dist[j] <= 0.5 + 1e-3, (row, want)
        assert np.abs(want[j, :4] - np.round(row[:4])).max() < 0.01, (row, want[j])
        assert abs(want[j, 4] - row[4]) <= 1e-4, (row, want[j])
        want = np.delete(want, j, 0)
    return len(got)


@pytest.mark.parametrize("kind", ["float", "qat"])
def test_boxes_are_detect_py_boxes(kind, sources, request, tmp_path):
    weights = FLOAT if kind == "float" else request.getfixturevalue("qat_pt")
    r = subprocess.run([sys.executable, "detect.py", "--weights", str(weights), "--source", str(sources),
                        "--imgsz", str(IMGSZ), "--conf-thres", "0.25", "--iou-thres", "0.45", "--save-txt",
                        "--save-conf", "--nosave", "--project", str(tmp_path), "--name", "exp"],
                       cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = hub(weights)
    assert m.model.quantized == (kind == "qat") and (m.conf, m.iou) == (0.25, 0.45)
    n = 0
    for f in sorted(sources.iterdir()):
        results = m(str(f), size=IMGSZ)
        assert results.s == (1, 3, 128 if f.stem == "wide" else IMGSZ, IMGSZ)
        n += assert_same_boxes(results.pandas().xyxy[0], tmp_path / "exp" / "labels" / f"{f.stem}.txt", f)
    assert n >= 4, "the shapes model finds several shapes in the sample images"


def test_mixed_batch_and_results(model, server, sources, tmp_path, yolo_log, monkeypatch):
    f1, f2 = IMAGES
    rgb = cv2.imread(str(f1))[..., ::-1]
    batch = [str(f1), f1, Image.open(f1), Image.open(f1).convert("RGBA"), rgb.copy(), f"{server}/{f1.name}", str(f2),
             cv2.imread(str(f2), cv2.IMREAD_GRAYSCALE), sources / "wide.jpg"]
    r = model(batch, size=IMGSZ)
    single = model(str(f1), size=IMGSZ)
    assert len(r) == 9 and r.s == (9, 3, IMGSZ, IMGSZ)
    assert r.files == ["shapes1.jpg", "shapes1_2.jpg", "shapes1_3.jpg", "image3.jpg", "image4.jpg", "shapes1_4.jpg",
                       "shapes2.jpg", "image7.jpg", "wide.jpg"]
    # the wide strip alone runs at 128x256; here it is padded to the batch's 256x256: its boxes still land in place
    wide = model(sources / "wide.jpg", size=IMGSZ)
    assert wide.s == (1, 3, 128, IMGSZ) and len(wide.pred[0]) >= 1 and len(r.pred[8]) == len(wide.pred[0])
    assert torch.allclose(r.pred[8][:, :4], wide.pred[0][:, :4], atol=1.0)
    assert torch.equal(r.pred[8][:, 5], wide.pred[0][:, 5])
    # path, Path, PIL, RGBA PIL, RGB numpy and URL are the same pixels: the same detections, as the image alone
    assert len(single.pred[0]) >= 1 and len(r.pred[6]) >= 1
    for p in r.pred[:6]:
        assert torch.allclose(p, single.pred[0], atol=1e-3)
    assert np.array_equal(r.ims[0], rgb) and r.ims[7].shape == (272, 273, 3)  # ims: RGB; grey made 3-channel

    # coordinates, tables
    h, w = rgb.shape[:2]
    gain = torch.tensor([w, h, w, h])
    assert torch.allclose(r.xyxyn[0][:, :4] * gain, r.xyxy[0][:, :4])
    assert torch.allclose(r.xywh[0][:, 2], r.xyxy[0][:, 2] - r.xyxy[0][:, 0])
    assert torch.allclose(r.xywhn[0][:, :4] * gain, r.xywh[0][:, :4])
    assert torch.equal(r.xyxy[0][:, 4:], r.pred[0][:, 4:])
    d = r.pandas()
    assert isinstance(r.xyxy[0], torch.Tensor) and len(d.xyxy) == 9
    assert list(d.xyxy[0].columns) == ["xmin", "ymin", "xmax", "ymax", "confidence", "class", "name"]
    assert list(d.xywhn[6].columns) == ["xcenter", "ycenter", "width", "height", "confidence", "class", "name"]
    assert np.allclose(d.xyxy[0].iloc[:, :5].to_numpy(float), r.xyxy[0][:, :5].numpy())
    assert list(d.xyxy[6]["name"]) == [model.names[c] for c in d.xyxy[6]["class"]]
    assert ((d.xywhn[6].iloc[:, :4] >= 0) & (d.xywhn[6].iloc[:, :4] <= 1)).all().all()

    # print / str / tolist
    yolo_log.clear()
    r.print()
    text = "\n".join(yolo_log)
    assert text == str(r) and text.startswith("image 1/9: 336x377 ") and "image 7/9: 272x273 " in text
    assert text.splitlines()[-1].startswith("Speed: ") and text.endswith(f"at shape (9, 3, {IMGSZ}, {IMGSZ})")
    assert repr(r).startswith("YOLOv5 <class 'workflow.hub.Detections'> instance\nimage 1/9")
    parts = r.tolist()
    assert len(parts) == 9 and all(len(p) == 1 for p in parts) and torch.equal(parts[6].pred[0], r.pred[6])
    assert parts[6].files == ["shapes2.jpg"] and str(parts[6]).startswith("image 1/1: 272x273 ")

    # save: annotated images under save_dir, the next save in exp2
    r.save(save_dir=tmp_path / "exp")
    r.save(save_dir=tmp_path / "exp", labels=False)
    for run in ("exp", "exp2"):
        assert sorted(p.name for p in (tmp_path / run).iterdir()) == sorted(r.files)
    saved = cv2.imread(str(tmp_path / "exp" / "shapes2.jpg"))
    assert saved.shape == cv2.imread(str(f2)).shape and np.abs(saved.astype(int) - cv2.imread(str(f2))).max() > 100

    # crop: one dict per detection, the crop in BGR order (as upstream), written under save_dir/crops/<class>/
    from utils.plots import save_one_box

    crops = r.crop(save_dir=tmp_path / "crops")
    assert len(crops) == sum(len(p) for p in r.pred)
    assert len(list((tmp_path / "crops" / "crops").rglob("*.jpg"))) == len(crops)
    c = next(c for c in crops if c["label"].startswith(model.names[int(r.pred[6][0, 5])]))
    assert set(c) == {"box", "conf", "cls", "label", "im"} and c["label"].endswith(f"{float(c['conf']):.2f}")
    assert any(np.array_equal(c["im"], save_one_box(torch.stack(c["box"]), cv2.imread(str(f)), save=False, BGR=True))
               for f in IMAGES)
    assert len(r.crop(save=False)) == len(crops) and not (tmp_path / "runs").exists()

    # show without a display: one warning line
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    yolo_log.clear()
    r.show()
    assert len(yolo_log) == 1 and "no display" in yolo_log[0]

    # render: the annotated images, also kept as ims
    before = [im.copy() for im in r.ims]
    out = r.render()
    assert out is r.ims and [o.shape for o in out] == [b.shape for b in before]
    assert not np.array_equal(out[6], before[6])

    # a BCHW tensor goes to the model as it is: its raw output (bs, N, 5 + nc)
    raw = model(torch.zeros(2, 3, 64, 64))
    assert isinstance(raw, torch.Tensor) and raw.shape[0] == 2 and raw.shape[2] == 5 + len(model.names)


def test_profile_logs_each_stage(model, yolo_log):
    r = model(str(ROOT / "data/images/shapes1.jpg"), size=160, profile=True)
    assert any(re.search(r"AutoShape: pre-process [\d.]+ms, inference [\d.]+ms, NMS [\d.]+ms for 1 image\(s\) at "
                         r"shape \(1, 3, \d+, \d+\)", m) for m in yolo_log), yolo_log
    assert len(r) == 1


def test_settings_are_honoured(model):
    src = str(IMAGES[1])
    base = model(src, size=IMGSZ).pred[0]
    assert len(base) >= 3
    try:
        model.conf = float(base[1, 4])  # strictly above: drops all but the best
        p = model(src, size=IMGSZ).pred[0]
        assert len(p) == int((base[:, 4] > model.conf).sum()) and (p[:, 4] > model.conf).all()
        del model.conf
        model.classes = [int(base[-1, 5])]
        p = model(src, size=IMGSZ).pred[0]
        assert len(p) >= 1 and (p[:, 5] == base[-1, 5]).all()
        model.classes = None
        model.max_det = 1
        assert torch.equal(model(src, size=IMGSZ).pred[0], base[:1])
        model.max_det = 1000
        model.agnostic = True  # overlapping boxes of different classes now suppress each other
        assert len(model(src, size=IMGSZ).pred[0]) < len(base)
        model.conf = 1.5
        with pytest.raises(UserError, match=r"model.conf=1.5: must be a number in \[0, 1\]"):
            model(src)
        del model.conf
        with pytest.raises(UserError, match=r"size=\(0, 64\): give an int or \(height, width\), each >= 1"):
            model(src, size=(0, 64))
    finally:
        for k in ("conf", "classes", "max_det", "agnostic"):
            model.__dict__.pop(k, None)
    assert model.conf == 0.25 and model.classes is None


@pytest.mark.parametrize("src, message", [
    ("{tmp}/nothere.jpg", "{tmp}/nothere.jpg: image file not found"),
    ("{tmp}/text.jpg", "{tmp}/text.jpg: not a readable image"),
    ("{server}/nothere.jpg", "{server}/nothere.jpg: download failed (HTTP 404"),
    ("http://127.0.0.1:9/x.jpg", "http://127.0.0.1:9/x.jpg: download failed ("),
    (np.zeros(5), "image 0: numpy array of shape (5,)"),
    (3.5, "image 0: cannot read a float"),
    ([], "no images given"),
])
def test_bad_input_is_one_line(model, server, tmp_path, src, message):
    (tmp_path / "text.jpg").write_text("not an image")
    fill = functools.partial(str.format, tmp=tmp_path, server=server)
    with pytest.raises(UserError) as e:
        model(fill(src) if isinstance(src, str) else src, size=64)
    assert fill(message) in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_release_name_without_network_says_where_to_put_it(monkeypatch):
    if (ROOT / "weights" / "yolov5s.pt").exists():
        pytest.skip("weights/yolov5s.pt is present")

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UserError) as e:
        torch.hub.load(str(ROOT), "yolov5s", source="local", _verbose=False)
    msg = str(e.value)
    assert msg.startswith("yolov5s.pt: weights not found") and f"put it in {ROOT / 'weights'}" in msg
    assert "\n" not in msg
    assert not (ROOT / "weights" / "yolov5s.pt").exists()


def test_entry_points():
    """What torch.hub.list shows: the public callables of hubconf.py, as upstream (n/s/m/l/x and custom)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("hubconf", ROOT / "hubconf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    names = [k for k in dir(module) if callable(getattr(module, k)) and not k.startswith("_")]
    assert names == ["custom", "yolov5l", "yolov5m", "yolov5n", "yolov5s", "yolov5x"]


def test_build_from_yaml_and_transfer(tmp_path):
    from models.yolo import DetectionModel
    from workflow.backend import DetectMultiBackend, load_pytorch_model

    level = LOGGER.level
    m = torch.hub.load(str(ROOT), "yolov5n", pretrained=False, channels=1, classes=10, source="local", _verbose=False)
    assert LOGGER.level == level
    assert type(m) is DetectionModel and m.model[-1].nc == 10 and m.model[0].conv.weight.shape[1] == 1
    # pretrained with other classes: the checkpoint's weights of matching shape, into a fresh nc=10 model
    shutil.copy(reference("yolov5n_silu.pt"), tmp_path / "yolov5n.pt")
    m = torch.hub.load(str(ROOT), "_create", str(tmp_path / "yolov5n.pt"), classes=10, source="local", verbose=False)
    assert type(m) is DetectionModel and m.model[-1].nc == 10
    ref, got = load_pytorch_model(tmp_path / "yolov5n.pt", fuse=False).float().state_dict(), m.state_dict()
    for k in ("model.0.conv.weight", "model.8.cv1.bn.running_mean", "model.23.cv3.conv.weight"):
        assert torch.equal(got[k], ref[k]), k
    assert got["model.24.m.0.weight"].shape[0] == 3 * 15 != ref["model.24.m.0.weight"].shape[0]
    # autoshape=False: the DetectMultiBackend itself
    assert isinstance(hub(tmp_path / "yolov5n.pt", autoshape=False), DetectMultiBackend)


def test_onnx_file_through_the_same_backend(tmp_path):
    import detect
    import export

    shutil.copy(FLOAT, tmp_path / "float.pt")
    (f,) = export.run(weights=tmp_path / "float.pt", imgsz=(IMGSZ, IMGSZ), include=["onnx"])
    m = hub(f)
    assert m.model.backend == "onnx"
    detect.run(weights=f, source=IMAGES[1], imgsz=(IMGSZ, IMGSZ), save_txt=True, save_conf=True, nosave=True,
               project=tmp_path, name="exp")
    r = m(str(IMAGES[1]), size=IMGSZ)
    assert assert_same_boxes(r.pandas().xyxy[0], tmp_path / "exp" / "labels" / "shapes2.txt", IMAGES[1]) >= 1
    both = m([str(IMAGES[0]), str(IMAGES[1])], size=IMGSZ)  # a batch-1 export runs a batch image by image
    assert torch.allclose(both.pred[1], r.pred[0], atol=1e-4)
    with pytest.raises(UserError, match=f"exported for {IMGSZ}x{IMGSZ} inputs; call the model with size={IMGSZ}"):
        m(str(IMAGES[1]), size=320)


def test_load_from_another_working_directory(tmp_path):
    """torch.hub puts the repo on sys.path only while loading; inference, tables and saving work afterwards."""
    script = (f"import torch\n"
              f"m = torch.hub.load({str(ROOT)!r}, 'custom', path={str(FLOAT)!r}, source='local')\n"
              f"r = m({str(IMAGES[1])!r}, size={IMGSZ})\n"
              f"r.print()\n"
              f"print(r.pandas().xyxy[0].to_csv(index=False))\n"
              f"r.save()\n"
              f"r.crop()\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "xmin,ymin,xmax,ymax,confidence,class,name" in r.stdout and "image 1/1: 272x273 " in r.stdout
    assert (tmp_path / "runs" / "detect" / "exp" / "shapes2.jpg").is_file()
    assert list((tmp_path / "runs" / "detect" / "exp2" / "crops").rglob("*.jpg"))
