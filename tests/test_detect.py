import re
import subprocess
import sys

import cv2
import numpy as np
import pytest
from conftest import ROOT, reference


def _images(folder, n=3):
    rng = np.random.default_rng(0)
    folder.mkdir()
    for i in range(n):
        im = (rng.random((96 + 32 * i, 128, 3)) * 255).astype(np.uint8)
        cv2.rectangle(im, (20, 20), (70, 60), (255, 255, 255), -1)
        cv2.imwrite(str(folder / f"im{i}.jpg"), im)
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return folder


def _run(*args):
    return subprocess.run([sys.executable, "detect.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_detect_folder_with_corrupt_image(tmp_path):
    src = _images(tmp_path / "src")
    r = _run("--weights", reference("yolov5n_silu.pt"), "--source", src, "--imgsz", 128, "--conf-thres", 0.05,
             "--max-det", 4, "--save-txt", "--save-conf", "--save-crop", "--project", tmp_path / "runs",
             "--name", "exp")
    assert r.returncode == 0, r.stderr[-2000:]
    out = r.stdout + r.stderr
    assert "corrupt.jpg" in out and "skipped" in out
    assert out.count("image ") >= 3 and "Speed:" in out
    run_dir = tmp_path / "runs" / "exp"
    assert sorted(p.name for p in run_dir.glob("*.jpg")) == ["im0.jpg", "im1.jpg", "im2.jpg"]
    labels = sorted((run_dir / "labels").glob("*.txt"))
    assert labels, "the random reference model is confident: it must detect something at conf 0.05"
    for f in labels:
        rows = np.loadtxt(f, ndmin=2)
        assert rows.shape[1] == 6 and len(rows) <= 4  # cls x y w h conf, --max-det 4
        assert ((rows[:, 1:5] >= 0) & (rows[:, 1:5] <= 1)).all() and (rows[:, 5] >= 0.05).all()
    assert any((run_dir / "crops").rglob("*.jpg"))
    # the saved image differs from the input where a box was drawn
    assert not np.array_equal(cv2.imread(str(run_dir / labels[0].with_suffix(".jpg").name)),
                              cv2.imread(str(src / labels[0].with_suffix(".jpg").name)))


def test_detect_classes_filter_and_nosave(tmp_path):
    src = _images(tmp_path / "src", n=1)
    r = _run("--weights", reference("yolov5n_silu.pt"), "--source", src / "im0.jpg", "--imgsz", 128, "--conf-thres",
             0.05, "--classes", 0, "--nosave", "--save-txt", "--project", tmp_path / "runs", "--name", "exp")
    assert r.returncode == 0, r.stderr[-2000:]
    run_dir = tmp_path / "runs" / "exp"
    assert not list(run_dir.glob("*.jpg"))
    for f in (run_dir / "labels").glob("*.txt"):
        assert (np.loadtxt(f, ndmin=2)[:, 0] == 0).all()


@pytest.mark.parametrize("args, message", [
    (["--weights", "nothere.pt", "--source", "data"], "nothere.pt"),
    (["--weights", "W", "--source", "/no/such/folder"], "/no/such/folder"),
    (["--weights", "W", "--source", "data", "--device", "7"], "--device 7"),
])
def test_detect_bad_input_one_line(args, message, tmp_path):
    args = [str(reference("yolov5n_silu.pt")) if a == "W" else a for a in args]
    r = _run(*args, "--project", tmp_path)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and message in err[0]


@pytest.mark.parametrize("flags, message", [
    (["--imgsz", "0"], "--imgsz 0: give one size or height and width, each >= 1"),
    (["--imgsz", "-5"], "--imgsz -5: give one size"),
    (["--imgsz", "320", "240", "160"], "--imgsz 320 240 160: give one size or height and width"),
    (["--max-det", "0"], "--max-det 0: must be an integer >= 1"),
    (["--vid-stride", "0"], "--vid-stride 0: must be an integer >= 1"),
    (["--conf-thres", "-0.5"], "--conf-thres -0.5: must be between 0.0 and 1.0"),
    (["--iou-thres", "7"], "--iou-thres 7.0: must be between 0.0 and 1.0"),
    (["--conf-thres", "nan"], "--conf-thres nan: must be between 0.0 and 1.0"),
    (["--imgsz", "100000"], "--imgsz 100000: each size must be at most 8192 pixels (a 100000x100000 image takes "
                            "30.0 GB"),
    (["--imgsz", "640", "9000"], "--imgsz 640 9000: each size must be at most 8192"),
    (["--line-thickness", "100000"], "--line-thickness 100000: must be an integer >= 1 and <= 1000"),
    (["--classes", "0", "-1"], "--classes 0 -1: class indices are >= 0"),
    (["--nms-time-limit", "-1"], "--nms-time-limit -1.0: give seconds >= 0"),
    (["--nms-time-limit", "inf"], "--nms-time-limit inf: give seconds >= 0"),
])
def test_detect_bad_numbers_one_line_before_any_work(flags, message, tmp_path, capsys):
    import detect
    from utils.general import run_cli

    opt = detect.parse_opt(["--weights", str(reference("yolov5n_silu.pt")), "--source", "data", *flags,
                            "--project", str(tmp_path)])
    with pytest.raises(SystemExit) as e:
        run_cli(detect.main, opt)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ERROR:") and message in err[0], err
    assert not list(tmp_path.iterdir())


def test_detect_unwritable_project_one_line(tmp_path, capsys):
    import detect
    from utils.general import run_cli

    src = _images(tmp_path / "src", n=1)
    (tmp_path / "a_file").write_text("")
    opt = detect.parse_opt(["--weights", str(reference("yolov5n_silu.pt")), "--source", str(src / "im0.jpg"),
                            "--project", str(tmp_path / "a_file" / "runs")])
    with pytest.raises(SystemExit) as e:
        run_cli(detect.main, opt)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("ERROR: ") and "a_file/runs/exp: cannot write the run folder (Not a directory); " \
                                             "choose a writable --project" in err[0], err


@pytest.fixture
def served(tmp_path):
    """A local HTTP server (no internet) over a folder with an image, a 12-frame video, and the same video under a
    name without a suffix (an http stream to OpenCV)."""
    import functools
    import http.server
    import threading

    root = _images(tmp_path / "www", n=1)
    w = cv2.VideoWriter(str(root / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10, (128, 96))
    for i in range(12):
        im = np.full((96, 128, 3), 40, np.uint8)
        cv2.rectangle(im, (10 + 4 * i, 20), (60 + 4 * i, 70), (255, 255, 255), -1)
        w.write(im)
    w.release()
    (root / "live").write_bytes((root / "clip.mp4").read_bytes())
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_detect_image_and_video_urls_and_a_stream(served, tmp_path):
    w = reference("yolov5n_silu.pt")
    r = _run("--weights", w, "--source", f"{served}/im0.jpg", "--imgsz", 128, "--conf-thres", 0.05, "--save-txt",
             "--project", tmp_path, "--name", "img")
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "img" / "im0.jpg").is_file() and "image 1/1" in r.stdout + r.stderr

    r = _run("--weights", w, "--source", f"{served}/clip.mp4", "--imgsz", 128, "--vid-stride", 2, "--save-txt",
             "--conf-thres", 0.05, "--project", tmp_path, "--name", "vid")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    assert "video 1/1 (6/6)" in out  # every second frame of 12, all of them: the file was downloaded first
    cap = cv2.VideoCapture(str(tmp_path / "vid" / "clip.mp4"))
    assert int(cap.get(cv2.CAP_PROP_FRAME_COUNT)) == 6

    r = _run("--weights", w, "--source", f"{served}/live", "--imgsz", 128, "--project", tmp_path, "--name", "live")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    assert "1/1: " in out and "Success (12 frames 128x96" in out and re.search(r"\n0: \d+x\d+ ", out)
    assert (tmp_path / "live" / "live.mp4").stat().st_size > 0


@pytest.mark.parametrize("source, message", [
    ("7", "--source 7: cannot open webcam 7 (no such device, or OpenCV cannot read it)"),
    ("screen", "--source screen: screen capture needs the mss package (pip install mss)"),
    ("none.streams", "--source none.streams: file not found; a .streams file lists one source per line"),
])
def test_detect_live_sources_that_cannot_open_are_one_line(source, message, tmp_path):
    r = _run("--weights", reference("yolov5n_silu.pt"), "--source", source, "--project", tmp_path)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("ERROR:") and message in err[0], r.stderr


def test_detect_view_img_says_why_no_window_and_update_strips(tmp_path):
    import shutil

    from models.checkpoint import load_checkpoint

    w = tmp_path / "w.pt"
    shutil.copy(reference("yolov5n_silu.pt"), w)
    r = _run("--weights", w, "--source", ROOT / "data/images", "--imgsz", 128, "--view-img", "--update",
             "--project", tmp_path, "--name", "exp")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-2000:]
    assert "--view-img: cannot show windows" in out and "results are saved to the run folder instead" in out
    assert sorted(p.name for p in (tmp_path / "exp").glob("*.jpg")) == ["shapes1.jpg", "shapes2.jpg"]
    assert "Optimizer stripped from" in out and load_checkpoint(w).get("optimizer") is None
