"""Official release checkpoints of every generation load without a trust switch; layer calls from a file do not.

The files are built here in each generation's pickle form from the architectures (no download): torch.save's
protocol 2 (builtins spelled `__builtin__`), FP16 weights, the detection model pickled as `models.yolo.Model` (v6.0,
v6.1, v6.2) or `models.yolo.DetectionModel` (v7.0), one SiLU per Conv (v6) or one shared by all (v7), each
generation's Detect attributes and checkpoint keys. The real v6.1 yolov5n file is used when ../shared is present.
"""
import contextlib
import subprocess
import sys
import zipfile

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, SHARED

from models.checkpoint import load_checkpoint
from models.common import Conv
from models.experimental import attempt_load
from models.yolo import Detect, DetectionModel
from utils.general import UserError

RELEASE = SHARED / "release" / "yolov5n.pt"
GENERATIONS = {  # name: (class name pickled, one activation shared by all Convs, Detect attributes, checkpoint keys)
    "v6.0": ("Model", False, {"onnx_dynamic": False}, ("wandb_id",)),
    "v6.1": ("Model", False, {"onnx_dynamic": False}, ("wandb_id",)),
    "v6.2": ("Model", False, {"onnx_dynamic": False}, ("opt", "git")),
    "v7.0": ("DetectionModel", True, {}, ("opt", "git")),
}


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv("YOLOV5_TRUST_CHECKPOINTS", raising=False)


@contextlib.contextmanager
def pickled_as(cls, name):
    """torch.save writes `cls` under models.yolo.<name> (an alias that exists there, as in that release)."""
    old = cls.__qualname__
    cls.__qualname__ = name
    try:
        yield
    finally:
        cls.__qualname__ = old


def release_file(path, size, generation):
    class_name, shared_act, detect_attrs, keys = GENERATIONS[generation]
    torch.manual_seed(0)
    model = DetectionModel(ROOT / "models" / f"yolov5{size}.yaml")
    act = nn.SiLU()
    for m in model.modules():
        if isinstance(m, Conv):
            m.act = act if shared_act else nn.SiLU()
        if isinstance(m, Detect):
            m.__dict__.update(detect_attrs)
            m.grid = [torch.zeros(1)] * m.nl
            m.anchor_grid = [torch.zeros(1)] * m.nl
    model.names = [f"class{i}" for i in range(80)]  # releases store a list
    model.hyp = {"lr0": 0.01, "box": 0.05}
    model.nc = 80
    model.eval()
    with torch.no_grad():
        expected = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))[0]
    for p in model.parameters():
        p.requires_grad = False
    ckpt = {"epoch": -1, "best_fitness": None, "model": model.half(), "ema": None, "updates": None,
            "optimizer": None, "date": "2022-02-08T18:24:20"}
    ckpt.update({k: {"wandb_id": None, "opt": {"imgsz": 640, "epochs": 300}, "git": {"commit": "abc"}}[k]
                 for k in keys})
    with pickled_as(DetectionModel, class_name):
        torch.save(ckpt, path)  # protocol 2, as every release
    return expected


def pickled_names(path):
    with zipfile.ZipFile(path) as z:
        data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    return data


@pytest.mark.parametrize("generation", list(GENERATIONS))
def test_each_release_generation_loads_untrusted(tmp_path, generation):
    path = tmp_path / f"yolov5n_{generation}.pt"
    expected = release_file(path, "n", generation)
    data = pickled_names(path)
    assert data[:2] == b"\x80\x02" and b"c__builtin__\nset" in data
    assert f"cmodels.yolo\n{GENERATIONS[generation][0]}\n".encode() in data
    model = attempt_load(path, fuse=True)
    assert type(model) is DetectionModel and next(model.parameters()).dtype == torch.float32
    with torch.no_grad():
        out = model(torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-2 * float(expected.abs().max()))  # FP16 weights


@pytest.mark.parametrize("size", ["s", "m", "l", "x"])
def test_every_release_size_loads_untrusted(tmp_path, size):
    path = tmp_path / f"yolov5{size}.pt"
    release_file(path, size, "v6.1")
    ckpt = load_checkpoint(path)
    assert type(ckpt["model"]) is DetectionModel and ckpt["model"].yaml_file == f"yolov5{size}.yaml"


def test_real_release_file_loads_untrusted():
    if not RELEASE.is_file():
        pytest.skip(f"{RELEASE} not present")
    assert b"cmodels.yolo\nModel\n" in pickled_names(RELEASE)
    model = attempt_load(RELEASE)
    assert type(model) is DetectionModel and model.names[0] == "person" and len(model.names) == 80


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def linear_call_pickle(n=32768) -> bytes:
    """{'epoch': 1, 'model': torch.nn.Linear(n, n)}: an allowlisted layer called with file-given sizes (REDUCE)."""
    call = _global("torch.nn.modules.linear", "Linear") + b"J" + n.to_bytes(4, "little") + b"J" + \
        n.to_bytes(4, "little") + b"\x86R"
    return b"\x80\x02}q\x00(X\x05\x00\x00\x00epochK\x01X\x05\x00\x00\x00model" + call + b"u."


def _with_pickle(src, dst, data):
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            b.writestr(item, data if item.filename.endswith("/data.pkl") else a.read(item.filename))
    return dst


def _load_peak_mb(path):
    """Load `path` in a fresh interpreter; (its output, the peak resident memory the load added, in MB). The peak is
    reset after the imports (/proc/self/clear_refs), so only the load is measured."""
    code = (f"from models.checkpoint import load_checkpoint\nfrom utils.general import UserError\n"
            f"def kb(key):\n    return [int(v.split()[1]) for v in open('/proc/self/status') if v.startswith(key)][0]\n"
            f"open('/proc/self/clear_refs', 'w').write('5')\nbefore = kb('VmRSS:')\n"
            f"try:\n    load_checkpoint({str(path)!r})\nexcept UserError as e:\n    print('REFUSED', e)\n"
            f"print('PEAK', kb('VmHWM:') - before)")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    peak = [int(line.split()[1]) for line in r.stdout.splitlines() if line.startswith("PEAK")]
    return r.stdout + r.stderr, (peak[0] / 1024 if peak else float("inf"))


def test_a_layer_call_from_the_file_is_refused_before_it_allocates(tmp_path):
    small = tmp_path / "small.pt"
    torch.save({"epoch": 1}, small)
    tiny = _with_pickle(small, tmp_path / "tiny.pt", linear_call_pickle())
    assert tiny.stat().st_size < 2000
    with pytest.raises(UserError) as e:
        load_checkpoint(tiny)
    msg = str(e.value)
    assert "\n" not in msg and "refused to load" in msg and "torch.nn.modules.linear.Linear(...)" in msg
    out, peak = _load_peak_mb(tiny)
    assert "REFUSED" in out and peak < 64, (out, peak)  # Linear(32768, 32768) would take 4 GB


def test_a_layer_call_injected_into_a_valid_checkpoint_is_refused(tmp_path):
    valid = tmp_path / "valid.pt"
    release_file(valid, "n", "v7.0")
    data = pickled_names(valid)
    # one more key in the top-level dict: 'x': Linear(32768, 32768), inserted before the final SETITEMS/STOP
    call = _global("torch.nn.modules.linear", "Linear") + b"J\x00\x80\x00\x00J\x00\x80\x00\x00\x86R"
    assert data.endswith(b"u.")
    evil = _with_pickle(valid, tmp_path / "evil.pt", data[:-2] + b"X\x01\x00\x00\x00x" + call + b"u.")
    with pytest.raises(UserError) as e:
        load_checkpoint(evil)
    assert "refused to load" in str(e.value) and "Linear(...)" in str(e.value)
    out, peak = _load_peak_mb(evil)
    assert "REFUSED" in out and peak < 64, (out, peak)
