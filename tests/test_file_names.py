"""Images, labels and videos under any file name the OS allows: bytes that are not UTF-8, spaces, unicode.

A name that is not valid UTF-8 reaches Python as surrogate escapes ('bad\\udcff.jpg' for b'bad\\xff.jpg'); OpenCV's
binding crashed the process on it (detect.py ended in a segmentation fault, exit 139) and the label cache's hash
raised UnicodeEncodeError in val.py. Such files are read like any other now, and their names are shown escaped
('bad\\xff.jpg') wherever they are printed, logged or drawn.
"""
import os
import re
import subprocess
import sys

import cv2
import numpy as np
from conftest import ROOT

import val
from utils.dataloaders import LoadImages, LoadImagesAndLabels
from utils.general import LOGGER, shown, yaml_save
from utils.imageio import imread, imwrite

NAMES = [b"bad\xff.jpg", b"with space.jpg", "ünï ☃.jpg".encode(), b"plain.jpg"]  # as the OS stores them
WEIGHTS = ROOT / "weights" / "shapes_yolov5n_silu.pt"


def image(seed=0, h=64, w=80):
    im = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    cv2.rectangle(im, (20, 16), (60, 48), (255, 255, 255), -1)
    return im


def write_bytes_named(folder, name: bytes, im):
    """Write `im` as a JPEG under the byte name `name` (what a camera or another OS may leave on disk)."""
    ok, buf = cv2.imencode(".jpg", im)
    assert ok
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(buf.tobytes())
    return os.fsdecode(os.path.join(os.fsencode(folder), name))


def test_shown_escapes_only_what_is_not_utf8():
    assert shown(os.fsdecode(b"bad\xff.jpg")) == "bad\\xff.jpg"
    assert shown("ünï ☃.jpg") == "ünï ☃.jpg" and shown("with space.jpg") == "with space.jpg"
    assert shown("x\ud800y") == "x\\ud800y"  # a surrogate no file name produces


def test_imread_and_imwrite_take_any_name(tmp_path):
    im = image()
    for name in NAMES:
        f = os.fsdecode(os.path.join(os.fsencode(tmp_path), name))
        assert imwrite(f, im)
        assert os.path.isfile(os.path.join(os.fsencode(tmp_path), name))
        back = imread(f)
        ok, buf = cv2.imencode(".jpg", im)
        assert np.array_equal(back, cv2.imdecode(buf, cv2.IMREAD_COLOR))  # OpenCV's own JPEG round trip
    assert imread(tmp_path / "missing.jpg") is None
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    assert imread(tmp_path / "empty.jpg") is None and imread(tmp_path / "junk.jpg") is None


def test_load_images_reads_every_name_and_a_txt_list_of_them(tmp_path):
    folder = tmp_path / "src"
    folder.mkdir()
    files = [write_bytes_named(folder, name, image(i)) for i, name in enumerate(NAMES)]
    seen = {os.fsencode(os.path.basename(p)): im0 for p, _, im0, _, _ in LoadImages(str(folder), img_size=64)}
    assert sorted(seen) == sorted(NAMES)
    for i, name in enumerate(NAMES):
        assert np.array_equal(seen[name], imread(files[i]))
    lst = tmp_path / "list.txt"
    lst.write_bytes(b"".join(os.fsencode(f) + b"\n" for f in files))  # a list may hold such names too
    assert len(list(LoadImages(str(lst), img_size=64))) == 4


def write_named_dataset(root, label):
    """root/images and root/labels with one image per name of NAMES, the i-th labelled `label(i)`; returns images."""
    images, labels = root / "images", root / "labels"
    images.mkdir()
    labels.mkdir()
    for i, name in enumerate(NAMES):
        write_bytes_named(images, name, image(i))
        with open(os.path.join(os.fsencode(labels), name[:-4] + b".txt"), "w") as f:
            f.write(label(i))
    return images


def test_dataset_scan_cache_and_warnings_with_such_names(tmp_path, yolo_log):
    images = write_named_dataset(tmp_path, lambda i: f"{i % 3} 0.5 0.5 0.4 0.5\n")
    with open(os.path.join(os.fsencode(images), b"broken\xfe.jpg"), "wb") as f:
        f.write(b"\xff\xd8 not a jpeg")
    for cached in (False, True):
        ds = LoadImagesAndLabels(str(images), img_size=64, batch_size=2, nc=3)
        scan = [m for m in yolo_log if "Scanning" in m][-1]
        assert scan.endswith(f"{'(cached)' if cached else ''}... 4 images, 0 backgrounds, 1 corrupt".lstrip()), scan
        assert sorted(os.fsencode(os.path.basename(f)) for f in ds.im_files) == sorted(NAMES)
        for i in range(4):  # each image came with its own label (class = its place in NAMES, mod 3)
            _, lb, path, _ = ds[i]
            assert float(lb[0, 1]) == NAMES.index(os.fsencode(os.path.basename(path))) % 3
    warning = [m for m in yolo_log if "broken" in m][-1]
    assert "broken\\xfe.jpg: unreadable image" in warning  # escaped for every handler of the logger


def test_val_and_the_logger_on_such_a_dataset(tmp_path, capsys):
    write_named_dataset(tmp_path, lambda i: "0 0.5 0.5 0.5 0.5\n")
    yaml_save(tmp_path / "data.yaml", {"path": str(tmp_path), "train": "images", "val": "images",
                                       "names": ["a", "b", "c"]})
    (_, _, map50, _, *_), _, _ = val.run(data=str(tmp_path / "data.yaml"), weights=str(WEIGHTS), imgsz=64,
                                          batch_size=4, project=tmp_path / "runs", save_txt=True, plots=True)
    assert 0 <= map50 <= 1
    run = os.fsencode(tmp_path / "runs" / "exp")
    assert sorted(os.listdir(os.path.join(run, b"labels"))) == sorted(n[:-4] + b".txt" for n in NAMES)
    assert os.path.isfile(os.path.join(run, b"val_batch0_labels.jpg"))  # names drawn, escaped
    LOGGER.info(f"a line naming {os.fsdecode(b'bad' + bytes([255]))}")
    assert "a line naming bad\\xff\n" in capsys.readouterr().out


def _video(path, frames=3):
    tmp = os.path.join(os.path.dirname(path), "tmp.mp4")
    writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), 10, (80, 64))
    for i in range(frames):
        writer.write(image(i))
    writer.release()
    os.replace(tmp, path)


def test_detect_on_a_folder_of_such_names(tmp_path):
    """What crashed: detect.py on a folder holding a file whose name is not UTF-8. Images keep their exact names in
    the run folder; a video is read through a plain-named link and written under its escaped name."""
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(NAMES):
        write_bytes_named(src, name, image(i))
    _video(os.fsdecode(os.path.join(os.fsencode(src), b"clip\xff.mp4")))
    r = subprocess.run([sys.executable, "detect.py", "--weights", WEIGHTS, "--source", src, "--imgsz", "64",
                        "--save-txt", "--conf-thres", "0.01", "--project", tmp_path / "runs"], cwd=ROOT,
                       capture_output=True, timeout=300)
    out = (r.stdout + r.stderr).decode()
    assert r.returncode == 0, out[-3000:]
    assert re.search(r"image 1/5 \S*/src/bad\\xff\.jpg: 64x64", out) and "ünï ☃.jpg: 64x64" in out, out
    assert len(re.findall(r"video 5/5 \(\d/3\) \S*clip\\xff\.mp4", out)) == 3, out
    run = os.fsencode(tmp_path / "runs" / "exp")
    assert sorted(os.listdir(run)) == sorted([*NAMES, b"clip\\xff.mp4", b"labels"])
    assert imread(os.fsdecode(os.path.join(run, NAMES[0]))).shape == (64, 80, 3)
    cap = cv2.VideoCapture(os.fsdecode(os.path.join(run, b"clip\\xff.mp4")))
    assert cap.isOpened() and int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    cap.release()
