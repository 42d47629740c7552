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
             "--max-det", 4, "--save-txt", "--save-conf", "--save-crop", "--project", tmp_path / "runs", "--name", "exp")
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
    assert err[0].startswith("ERROR: ") and "a_file/runs/exp: cannot write the run folder (Not a directory); choose a " \
                                             "writable --project" in err[0], err
