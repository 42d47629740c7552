import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, reference

from models.checkpoint import load_checkpoint, save_checkpoint
from models.common import C3, Bottleneck, Conv, make_activation, model_activation
from models.experimental import attempt_load
from models.yolo import Detect, DetectionModel, Model, parse_model
from utils.general import UserError, yaml_load, yaml_save
from utils.torch_utils import fuse_conv_and_bn, select_device

UPSTREAM_PARAMS = {"n": 1872157, "s": 7235389, "m": 21190557, "l": 46563709, "x": 86749405}


@pytest.mark.parametrize("size", list(UPSTREAM_PARAMS))
def test_param_counts_and_forward_shapes(size):
    model = DetectionModel(ROOT / f"models/yolov5{size}.yaml").eval()
    assert sum(p.numel() for p in model.parameters()) == UPSTREAM_PARAMS[size]
    assert model.stride.tolist() == [8.0, 16.0, 32.0]
    shapes = [(64, 64), (320, 320), (96, 160)] if size in "nsm" else [(64, 64), (320, 320), (64, 128)]
    with torch.no_grad():
        for h, w in shapes:
            pred, raw = model(torch.rand(1, 3, h, w))
            n = sum(3 * (h // s) * (w // s) for s in (8, 16, 32))
            assert pred.shape == (1, n, 85)
            assert [r.shape[2:4] for r in raw] == [(h // s, w // s) for s in (8, 16, 32)]
            assert torch.isfinite(pred).all()


def test_model_alias_and_activation_choice():
    assert Model is DetectionModel
    relu = DetectionModel(ROOT / "models/yolov5n.yaml", act="relu")
    acts = {type(m.act) for m in relu.modules() if isinstance(m, Conv)}
    assert acts == {nn.ReLU}
    assert relu.yaml["activation"] == "relu" and model_activation(relu) == "relu"
    # choosing ReLU for one model changes nothing for the next (no class attribute mutated)
    silu = DetectionModel(ROOT / "models/yolov5n.yaml")
    assert {type(m.act) for m in silu.modules() if isinstance(m, Conv)} == {nn.SiLU}
    cfg = yaml_load(ROOT / "models/yolov5n.yaml")
    cfg["activation"] = "nn.ReLU6()"
    r6 = DetectionModel(cfg)
    assert {type(m.act) for m in r6.modules() if isinstance(m, Conv)} == {nn.ReLU6}
    with pytest.raises(ValueError, match="not supported"):
        make_activation("gelu-ish")


def test_unknown_module_and_malformed_yaml():
    cfg = yaml_load(ROOT / "models/yolov5n.yaml")
    cfg["head"][0][2] = "Transformer"
    with pytest.raises(UserError, match="unknown module 'Transformer'"):
        DetectionModel(cfg)
    cfg = yaml_load(ROOT / "models/yolov5n.yaml")
    del cfg["anchors"]
    with pytest.raises(UserError, match="missing key 'anchors'"):
        parse_model(cfg, ch=[3])


@pytest.mark.parametrize("row, edit, message", [
    (0, lambda r: r[3].__setitem__(1, "abc"), "layer 0 [-1, 1, 'Conv', [64, 'abc', 2, 2]] cannot be built"),
    (0, lambda r: r[3].extend([1, 1, 1, 1, 1]), "cannot be built: Conv.__init__() got multiple values"),
    (0, lambda r: r[3].__setitem__(0, -64), "cannot be built: Trying to create tensor with negative dimension"),
    (12, lambda r: r.__setitem__(0, [-1, 66]), "layer 12 has from=[-1, 66]; 'from' is -1 (the previous layer)"),
    (12, lambda r: r.__setitem__(0, [-1, -13]), "layer 12 has from=[-1, -13]"),
    (0, lambda r: r.__setitem__(0, 0), "layer 0 has from=0"),
    (2, lambda r: r.__setitem__(1, 0), "layer 2 has number=0; it must be an integer >= 1"),
    (2, lambda r: r.__setitem__(3, "c3"), "layer 2 has args='c3'; it must be a list"),
])
def test_bad_layer_rows_are_one_line_naming_the_file(tmp_path, row, edit, message):
    cfg = yaml_load(ROOT / "models/yolov5n.yaml")
    rows = cfg["backbone"] + cfg["head"]
    edit(rows[row])
    yaml_save(tmp_path / "bad.yaml", cfg)
    with pytest.raises(UserError) as e:
        DetectionModel(tmp_path / "bad.yaml")
    assert str(e.value).startswith(f"{tmp_path / 'bad.yaml'}: ") and message in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_skip_add_only_when_shapes_allow():
    assert Bottleneck(16, 16).add and not Bottleneck(16, 32).add and not Bottleneck(16, 16, shortcut=False).add
    c3 = C3(16, 32, n=2)
    assert c3(torch.rand(1, 16, 8, 8)).shape == (1, 32, 8, 8)


def test_fused_matches_unfused():
    torch.manual_seed(0)
    model = DetectionModel(ROOT / "models/yolov5n.yaml", act="relu")
    for m in model.modules():  # non-trivial BN statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.1, 0.1)
    model.eval()
    x = torch.rand(2, 3, 128, 160)
    with torch.no_grad():
        y0 = model(x)[0]
        model.fuse()
        y1 = model(x)[0]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert ((y0 - y1).abs().max() / y0.abs().max()).item() < 1e-4


def test_fuse_conv_and_bn_formula():
    torch.manual_seed(1)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.data.normal_()
    bn.eval()
    x = torch.randn(2, 4, 9, 9)
    assert torch.allclose(fuse_conv_and_bn(conv, bn)(x), bn(conv(x)), atol=1e-5)


@pytest.mark.parametrize("act", ["silu", "relu"])
def test_reference_checkpoint_reproduces_upstream(act):
    ref = torch.load(reference(f"yolov5n_{act}_outputs.pt"), weights_only=False)
    model = attempt_load(reference(f"yolov5n_{act}.pt"), fuse=False)
    assert sum(p.numel() for p in model.parameters()) == ref["n_parameters"]
    assert model_activation(model) == ref["activation"].lower()
    assert isinstance(model.model[-1], Detect) and model.names[0] == "person"
    x = ref["input"]
    with torch.no_grad():
        y = model(x)[0]
        scale = ref["eval_output"].abs().max()
        assert ((y - ref["eval_output"]).abs().max() / scale) < 1e-5
        model.train()
        outs = model(x)
        top = max(o.abs().max() for o in ref["train_outputs"])
        for a, b in zip(outs, ref["train_outputs"]):
            # train mode normalises with batch statistics of 2 images, which amplifies float32 rounding
            assert a.shape == b.shape and ((a - b).abs().max() / top) < 5e-5
            assert ((a - b).abs().mean() / top) < 1e-5
        model.eval().fuse()
        yf = model(x)[0]
    # same fusion arithmetic as upstream: fused outputs agree closely with upstream's fused outputs
    assert ((yf - ref["eval_output_fused"]).abs().max() / scale) < 1e-5


def test_checkpoint_errors(tmp_path):
    with pytest.raises(UserError, match="weights file not found"):
        attempt_load(tmp_path / "nothere.pt")
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"PK\x03\x04 this is not a zip at all")
    with pytest.raises(UserError, match="corrupt"):
        attempt_load(bad)
    notckpt = tmp_path / "tensor.pt"
    torch.save({"model": torch.zeros(3)}, notckpt)
    with pytest.raises(UserError, match="tensor.pt: .model. is a Tensor, not a YOLOv5 DetectionModel"):
        attempt_load(notckpt)


class Payload:
    """Unpickling this would create a file: the loader must refuse it without running it."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (str(self.target), "w"))


def test_malicious_checkpoint_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("YOLOV5_TRUST_CHECKPOINTS", raising=False)
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"model": Payload(target)}, path)
    with pytest.raises(UserError, match="refused.*open"):
        load_checkpoint(path)
    assert not target.exists()


def test_atomic_save_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom during save")

    with pytest.raises(RuntimeError):
        save_checkpoint({"epoch": 2, "x": Unpicklable()}, path)
    assert load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary left behind


def test_save_that_cannot_write_is_one_line_and_keeps_the_old_file(tmp_path, monkeypatch):
    (tmp_path / "dir.pt").mkdir()
    with pytest.raises(UserError, match="dir.pt: is a folder, but a checkpoint file is written there"):
        save_checkpoint({"epoch": 1}, tmp_path / "dir.pt")
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")

    def disk_full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(UserError, match=r"last.pt: cannot write the checkpoint \(No space left on device\); the "
                                        r"previous one is kept"):
        save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert load_checkpoint(path)["epoch"] == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["dir.pt", "last.pt"]


def test_select_device():
    assert select_device("cpu").type == "cpu"
    if not torch.cuda.is_available():
        assert select_device("").type == "cpu"
        with pytest.raises(UserError, match="not available"):
            select_device("0")
    with pytest.raises(UserError, match="not a device"):
        select_device("gpu7")


def test_yolo_cli_summary_and_errors():
    r = subprocess.run([sys.executable, "models/yolo.py", "--cfg", "yolov5s.yaml"], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "YOLOv5s summary: 214 layers, 7235389 parameters, 7235389 gradients" in r.stdout
    assert "GFLOPs" in r.stdout and "models.common.C3" in r.stdout
    r = subprocess.run([sys.executable, "models/yolo.py", "--cfg", "missing.yaml"], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("ERROR: missing.yaml") and "Traceback" not in r.stderr


def test_checkpoint_gets_the_mode_of_other_files(tmp_path):
    """Not mkstemp's 0600: a checkpoint is as readable as results.csv beside it (whatever the umask)."""
    path = save_checkpoint({"epoch": 1}, tmp_path / "last.pt")
    other = tmp_path / "results.csv"
    other.write_text("epoch\n")
    assert (path.stat().st_mode & 0o777) == (other.stat().st_mode & 0o777)


def test_random_bytes_are_not_a_checkpoint_in_one_line(tmp_path):
    f = tmp_path / "noise.pt"
    f.write_bytes(bytes(range(7, 256)) * 20)
    with pytest.raises(UserError, match=r"^.*noise\.pt: not a PyTorch checkpoint \(neither torch.save's zip") as e:
        load_checkpoint(f)
    assert "\n" not in str(e.value) and "weights_only" not in str(e.value)
