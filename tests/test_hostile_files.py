"""Damaged and hostile files given to the CLIs: each ends in one `ERROR:` line naming the file, what is wrong and
what to give instead, with exit status 2; never a traceback.

Checkpoints (train.py --weights / --resume, val.py --weights, trusted or not), QAT state, a full disk during a
checkpoint save, exported models' metadata (ONNX metadata_props, an OpenVINO folder's yaml, TorchScript's config.txt)
and the integer model's model.json. The CLIs run in-process (run_cli(main, parse_opt(...)), what `python x.py` runs) to
keep this fast; the full-disk case needs a process of its own (a file size limit)."""
import copy
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT

import detect
import train
import val
from bst.torch.ao.quantization.integer_runner import FORMAT, VERSION, IntegerModel
from bst.torch.ao.quantization.integer_runner import main as integer_main
from models.checkpoint import load_checkpoint, save_checkpoint
from utils.general import UserError, run_cli, yaml_save
from workflow.backend import DetectMultiBackend

WEIGHTS = ROOT / "weights" / "shapes_yolov5n_silu.pt"
QAT_FORMAT1 = ROOT / "tests" / "data" / "qat_checkpoint_format1.pt"
QAT_FORMAT2 = ROOT / "tests" / "data" / "qat_checkpoint_format2.pt"
FIX = "give a .pt file written by train.py or torch.save"


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv("YOLOV5_TRUST_CHECKPOINTS", raising=False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A two-image dataset yaml (the CLIs refuse the weights before they read it)."""
    d = tmp_path_factory.mktemp("hostile_data")
    (d / "images").mkdir()
    (d / "labels").mkdir()
    for i in range(2):
        cv2.imwrite(str(d / "images" / f"{i}.jpg"), np.full((64, 64, 3), 40 * i, np.uint8))
        (d / "labels" / f"{i}.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    yaml_save(d / "data.yaml", {"path": str(d), "train": "images", "val": "images", "names": ["a", "b", "c"]})
    return d / "data.yaml"


def one_error_line(capsys, module, args) -> str:
    """Run `python <module>.py args` in-process: it must exit 2 with exactly one line on stderr, the ERROR line."""
    with pytest.raises(SystemExit) as e:
        run_cli(module.main, module.parse_opt([str(a) for a in args]))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ERROR: "), err
    return err[0]


def with_pickle(dst, data_pkl: bytes):
    """WEIGHTS with its data.pkl replaced by `data_pkl` (the tensor records stay)."""
    with zipfile.ZipFile(WEIGHTS) as a, zipfile.ZipFile(dst, "w") as b:
        for item in a.infolist():
            b.writestr(item, data_pkl if item.filename.endswith("/data.pkl") else a.read(item.filename))
    return dst


def real_pickle() -> bytes:
    with zipfile.ZipFile(WEIGHTS) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))


DAMAGED = {  # name: (data.pkl, what the one line says in its parentheses)
    "truncated": (lambda p: p[:len(p) // 2], None),
    "bad_memo": (lambda p: b"\x80\x02h\xff.", "(Memo value not found at index 255)"),
    "empty_stack": (lambda p: b"\x80\x02R.", "(IndexError: pop from empty list)"),
    "text_pid": (lambda p: b"\x80\x02X\x03\x00\x00\x00abcQ.", "(a persistent id must be torch's ('storage', type, "
                                                              "key, location, numel))"),
}


@pytest.mark.parametrize("cli", ["train --weights", "train --resume", "val --weights"])
@pytest.mark.parametrize("damage", list(DAMAGED))
def test_damaged_pickles_are_one_line_in_every_cli(cli, damage, data, tmp_path, capsys):
    make, why = DAMAGED[damage]
    f = with_pickle(tmp_path / f"{damage}.pt", make(real_pickle()))
    runs = ["--project", tmp_path / "runs"]
    args = {"train --weights": (train, ["--weights", f, "--data", data, "--epochs", 1, "--img", 64, *runs]),
            "train --resume": (train, ["--resume", f, *runs]),
            "val --weights": (val, ["--weights", f, "--data", data, *runs])}[cli]
    line = one_error_line(capsys, *args)
    assert line.startswith(f"ERROR: {f}: corrupt or not a PyTorch checkpoint (") and FIX in line, line
    assert why is None or why in line, line


@pytest.mark.parametrize("damage", ["truncated", "bad_memo"])
def test_damaged_files_are_one_line_when_trusted_too(damage, data, tmp_path, capsys, monkeypatch):
    """A trusted file is unpickled by torch whole; its damage still ends in one line (it was a traceback)."""
    monkeypatch.setenv("YOLOV5_TRUST_CHECKPOINTS", "1")
    f = with_pickle(tmp_path / f"{damage}.pt", DAMAGED[damage][0](real_pickle()))
    line = one_error_line(capsys, train, ["--weights", f, "--data", data, "--project", tmp_path / "runs"])
    assert line.startswith(f"ERROR: {f}: corrupt or not a PyTorch checkpoint (") and FIX in line, line


def test_legacy_checkpoints_are_one_line_trusted_or_not(data, tmp_path, capsys, monkeypatch):
    ckpt = load_checkpoint(WEIGHTS)
    legacy = tmp_path / "legacy.pt"
    torch.save(ckpt, legacy, _use_new_zipfile_serialization=False)
    line = one_error_line(capsys, val, ["--weights", legacy, "--data", data, "--project", tmp_path])
    assert "legacy.pt: written in torch's legacy (pre-1.6) format, which is read only from trusted files; set " \
           "YOLOV5_TRUST_CHECKPOINTS=1 if you trust it" in line
    cut = tmp_path / "legacy_cut.pt"
    cut.write_bytes(legacy.read_bytes()[:legacy.stat().st_size // 2])
    monkeypatch.setenv("YOLOV5_TRUST_CHECKPOINTS", "1")
    line = one_error_line(capsys, val, ["--weights", cut, "--data", data, "--project", tmp_path])
    assert f"{cut}: corrupt or not a PyTorch checkpoint (RuntimeError: unexpected EOF" in line and FIX in line


# --- checkpoints that unpickle but hold no usable detection model -------------------------------------------------

@pytest.fixture(scope="module")
def valid():
    return load_checkpoint(WEIGHTS)


def _names(m):
    m.names = 5


def _stride(m):
    m.stride = "32"


def _shadow(m):
    m.model[3].forward = 1  # an instance attribute over a method


def _hook(m):
    m.model[0].register_forward_hook(print)


MODELS = {  # change to the model: (trusted file?, what the line says)
    "not a model": (None, False, "'model' is a Sequential, not a YOLOv5 DetectionModel"),
    "names": (_names, False, "'model' has names of type int; they must be a list of class names or an {index: name} "
                             "dict"),
    "stride": (_stride, False, "'model' has a stride that is not a tensor of positive numbers"),
    "shadowing": (_shadow, False, "'model' has an attribute 'forward' on module model.3 (Conv) that shadows its "
                                  "method"),
    "hook": (_hook, False, "refused to load, it names builtins.print, which is not on the checkpoint allowlist"),
    "hook, trusted": (_hook, True, "'model' has forward hooks on module model.0 (Conv) (a checkpoint stores none)"),
}


@pytest.mark.parametrize("case", list(MODELS))
def test_checkpoints_without_a_sound_model_are_one_line(case, valid, data, tmp_path, capsys, monkeypatch):
    change, trusted, message = MODELS[case]
    ckpt = copy.deepcopy(valid)
    if change is None:
        ckpt["model"] = nn.Sequential(nn.Conv2d(3, 8, 1))
    else:
        change(ckpt["model"])
    f = tmp_path / "odd.pt"
    torch.save(ckpt, f)
    if trusted:
        monkeypatch.setenv("YOLOV5_TRUST_CHECKPOINTS", "1")
    line = one_error_line(capsys, val, ["--weights", f, "--data", data, "--project", tmp_path / "runs"])
    assert line.startswith(f"ERROR: {f}: ") and message in line, line
    if case in ("names", "hook, trusted"):  # train.py loads through the same check
        line = one_error_line(capsys, train, ["--weights", f, "--data", data, "--project", tmp_path / "runs"])
        assert message in line, line


# --- QAT state ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def qat_raw(tmp_path_factory):
    """{format: the raw dict of a QAT checkpoint of that format}: 3 written now, 2 the stored one."""
    f = save_checkpoint(load_checkpoint(QAT_FORMAT1), tmp_path_factory.mktemp("qat") / "qat.pt")
    return {3: torch.load(f, weights_only=False), 2: torch.load(QAT_FORMAT2, weights_only=False)}


def _set(key, value):
    """Format 2: a setting in the qat_state entry's 'qat' (or the entry's own key)."""
    def change(raw):
        state = raw["qat_state"]["model"]
        if value is KeyError:
            del state["qat"][key]
        elif key in state["qat"]:
            state["qat"][key] = value
        else:
            state[key] = value
    return change


def _set3(key, value):
    """Format 3: a setting in ckpt["qat"]["config"], ckpt["qat"]'s own key, or the qat_state entry's."""
    def change(raw):
        config, state = raw["qat"]["config"], raw["qat_state"]["model"]
        if value is KeyError:
            del config[key]
        elif key in config:
            config[key] = value
        elif key in raw["qat"]:
            raw["qat"][key] = value
        else:
            state[key] = value
    return change


QAT_DAMAGE = {
    "no bn_folding": (_set("bn_folding", KeyError), "the setting 'bn_folding' is missing; it must be true or false"),
    "pow2 text": (_set("pow2", "yes"), "the setting 'pow2' is 'yes'; it must be true or false"),
    "rounding": (_set("rounding", "up"), "the setting 'rounding' is 'up'; it must be one of half_even, half_up"),
    "recipe path": (_set("recipe", "/etc/passwd"), "the setting 'recipe' is '/etc/passwd'; it must be a recipe "
                                                   "mapping or null"),
    "qat list": (_set("qat", [1]), "'qat' is a list; it must be a mapping of the QAT settings"),
    "state_dict": (_set("state_dict", {"model.0.conv.weight": 1}), "'state_dict' is not a mapping of names to "
                                                                   "tensors"),
    "attributes": (_set("attributes", {"model.0.conv": {"freeze_bn": [1]}}), "'attributes' is not a mapping of "
                                                                             "module names to plain settings"),
    "training": (_set("training", 3), "'training' is 3; it must be true or false"),
}
QAT_DAMAGE_3 = {
    "no bn_folding": (_set3("bn_folding", KeyError), "the setting 'bn_folding' is missing; it must be true or false"),
    "no rounding": (_set3("rounding", KeyError), "the setting 'rounding' is missing; it must be one of half_even, "
                                                 "half_up"),
    "pow2 text": (_set3("pow2", "yes"), "the setting 'pow2' is 'yes'; it must be true or false"),
    "rounding": (_set3("rounding", "up"), "the setting 'rounding' is 'up'; it must be one of half_even, half_up"),
    "recipe path": (_set3("recipe", "/etc/passwd"), "the setting 'recipe' is '/etc/passwd'; it must be a recipe "
                                                    "mapping"),
    "config list": (_set3("config", [1]), "'config' is a list; it must be a mapping of the QAT settings"),
    "schedule": (_set3("schedule", {"ptq": [1]}), "'schedule' is not a mapping of plain values"),
    "state_dict": (_set3("state_dict", {"model.0.conv.weight": 1}), "'state_dict' is not a mapping of names to "
                                                                    "tensors"),
    "attributes": (_set3("attributes", {"model.0.conv": {"freeze_bn": [1]}}), "'attributes' is not a mapping of "
                                                                              "module names to plain settings"),
    "training": (_set3("training", 3), "'training' is 3; it must be true or false"),
}


@pytest.mark.parametrize("fmt, case", [(2, c) for c in QAT_DAMAGE] + [(3, c) for c in QAT_DAMAGE_3])
def test_damaged_qat_state_is_one_line(fmt, case, qat_raw, data, tmp_path, capsys):
    change, message = (QAT_DAMAGE if fmt == 2 else QAT_DAMAGE_3)[case]
    raw = copy.deepcopy(qat_raw[fmt])
    change(raw)
    f = tmp_path / "qat.pt"
    torch.save(raw, f)
    line = one_error_line(capsys, val, ["--weights", f, "--data", data, "--project", tmp_path / "runs"])
    assert line.startswith(f"ERROR: {f}: damaged QAT state (") and message in line, line
    assert line.endswith("give a QAT checkpoint written by train.py --qat")


# --- a full disk while a checkpoint is written ----------------------------------------------------------------------

DISK_FULL = """
import resource, signal, sys, torch
from models.checkpoint import save_checkpoint
from utils.general import UserError
path = sys.argv[1]
save_checkpoint({"epoch": 1}, path)
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG, as on a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    save_checkpoint({"epoch": 2, "x": torch.zeros(1_000_000)}, path)
except UserError as e:
    print("ERROR:", e)
"""


def test_a_full_disk_during_a_save_is_one_line_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "last.pt"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, str(path)], cwd=ROOT, capture_output=True, text=True,
                       timeout=120, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout == f"ERROR: {path}: cannot write the checkpoint (File too large); the previous one is kept; free " \
                       f"space there or write somewhere else\n"
    assert load_checkpoint(path)["epoch"] == 1 and [p.name for p in tmp_path.iterdir()] == ["last.pt"]



# --- exported models' metadata --------------------------------------------------------------------------------------

def identity_onnx(path, meta):
    """A 1x3x64x64 Identity graph with these metadata_props (the loader reads them before onnxruntime runs)."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 64, 64])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 64, 64])
    graph = helper.make_graph([helper.make_node("Identity", ["images"], ["output0"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for k, v in meta.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(model, str(path))
    return path


ONNX_META = {
    "stride abc": ({"stride": "abc"}, "metadata_props 'stride' is 'abc'; it must be a whole number from 1 to 1024"),
    "stride 1e400": ({"stride": "1e400"}, "metadata_props 'stride' is '1e400'; it must be a whole number"),
    "stride 0": ({"stride": "0"}, "metadata_props 'stride' is '0'; it must be a whole number from 1 to 1024"),
    "names cut": ({"names": "{0: 'a', 1: "}, "metadata_props 'names' is \"{0: 'a', 1: \"; it must be a list of "
                                             "class names or an {index: name} mapping"),
    "names call": ({"names": "__import__('os').system('true')"}, "metadata_props 'names' is \"__import__('os')."),
    "names keys": ({"names": "{'a': 'b'}"}, "metadata_props 'names' is \"{'a': 'b'}\"; it must be a list"),
    "quantized": ({"quantized": "yes"}, "metadata_props 'quantized' is 'yes'; it must be '0' or '1'"),
}


@pytest.mark.parametrize("case", list(ONNX_META))
def test_onnx_metadata_is_checked_in_one_line(case, data, tmp_path, capsys):
    meta, message = ONNX_META[case]
    f = identity_onnx(tmp_path / "m.onnx", {"stride": "32", "names": "{0: 'a', 1: 'b', 2: 'c'}", **meta})
    line = one_error_line(capsys, val, ["--weights", f, "--data", data, "--project", tmp_path / "runs"])
    assert line.startswith(f"ERROR: {f}: {message}"), line
    assert line.endswith("(as export.py writes it); export the model again"), line


def test_sound_onnx_metadata_is_read():
    with tempfile.TemporaryDirectory() as tmp:
        f = identity_onnx(Path(tmp) / "m.onnx", {"stride": "64", "names": "{0: 'a', 1: 'b'}", "quantized": "0"})
        backend = DetectMultiBackend(str(f))
    assert backend.stride == 64 and backend.names == {0: "a", 1: "b"} and backend.input_shape == [1, 3, 64, 64]


OPENVINO_YAML = {  # yaml text: what the one line says
    "stride: abc": "stride' is 'abc'; it must be a whole number from 1 to 1024",
    "stride: 1e400": "stride' is '1e400'; it must be a whole number from 1 to 1024",
    "stride: 1.0e+400": "stride' is inf; it must be a whole number from 1 to 1024",
    "stride: 0": "stride' is 0; it must be a whole number from 1 to 1024",
    "stride: [8, 16, 32]": "stride' is [8, 16, 32]; it must be a whole number from 1 to 1024",
    "shape: 5": "shape' is 5; it must be the input shape [batch, 3, height, width] in positive integers",
    "names: hello": "names' is 'hello'; it must be a list of class names or an {index: name} mapping",
    "names: {a: b}": "names' is {'a': 'b'}; it must be a list of class names",
    "dynamic: maybe": "dynamic' is 'maybe'; it must be true or false",
    "[1, 2]": "content' is [1, 2]; it must be a mapping of stride, names, quantized, pow2, shape, dynamic",
}


@pytest.mark.parametrize("text", list(OPENVINO_YAML))
def test_openvino_yaml_is_checked_before_openvino_runs(text, tmp_path, capsys):
    folder = tmp_path / "m_openvino_model"
    folder.mkdir()
    (folder / "m.xml").write_text("<net/>")  # never read: the yaml is refused first
    (folder / "m.yaml").write_text(text + "\n")
    with pytest.raises(UserError) as e:
        DetectMultiBackend(str(folder))
    assert str(e.value).startswith(f"{folder}: m.yaml '") and OPENVINO_YAML[text] in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_openvino_yaml_problem_through_detect(tmp_path, capsys):
    folder = tmp_path / "m_openvino_model"
    folder.mkdir()
    (folder / "m.xml").write_text("<net/>")
    (folder / "m.yaml").write_text("stride: 1e400\nnames: [a]\n")
    line = one_error_line(capsys, detect, ["--weights", folder, "--source", ROOT / "data" / "images", "--project",
                                           tmp_path / "runs"])
    assert line.startswith(f"ERROR: {folder}: m.yaml 'stride' is '1e400'; it must be a whole number"), line


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit's deprecation notices
def test_torchscript_config_is_checked(tmp_path):
    f = tmp_path / "m.torchscript"
    for config, message in (("{not json", "its config.txt is not JSON"),
                            ('{"stride": "x"}', "config.txt 'stride' is 'x'; it must be a whole number"),
                            ('{"names": 7}', "config.txt 'names' is 7; it must be a list of class names"),
                            ('{"shape": [1, 3]}', "config.txt 'shape' is [1, 3]; it must be the input shape"),
                            ("[]", "config.txt 'config' is []; it must be a mapping")):
        torch.jit.save(torch.jit.script(nn.Identity()), str(f), _extra_files={"config.txt": config})
        with pytest.raises(UserError) as e:
            DetectMultiBackend(str(f))
        assert str(e.value).startswith(f"{f}: ") and message in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- the integer model's model.json ---------------------------------------------------------------------------------

def integer_model(folder):
    """A minimal bst-integer-model folder (quantize -> 1x1 conv with ReLU -> 2x2 max-pool), its example.npz computed
    by the runner itself: (folder, graph)."""
    folder.mkdir(parents=True, exist_ok=True)
    graph = {"format": FORMAT, "version": VERSION, "rounding": "half_even",
             "input": {"name": "images", "layout": "NCHW", "dtype": "float32", "example_shape": [1, 3, 8, 8]},
             "outputs": ["t3"],
             "tensors": {"t1": {"exponent": -8, "zero_point": 0, "quant_min": 0, "quant_max": 255, "axis": None},
                         "t2": {"exponent": -4, "zero_point": 0, "quant_min": -128, "quant_max": 127, "axis": None},
                         "t3": {"exponent": -4, "zero_point": 0, "quant_min": -128, "quant_max": 127, "axis": None}},
             "nodes": [{"op": "quantize", "inputs": ["images"], "output": "t1", "rounding": "half_even"},
                       {"op": "conv2d", "inputs": ["t1"], "output": "t2", "weight": "t2.weight",
                        "weight_zero_point": [0, 0], "bias": "t2.bias", "shift": "t2.shift", "stride": [1, 1],
                        "padding": [0, 0], "dilation": [1, 1], "groups": 1, "activation": "relu",
                        "rounding": "half_even"},
                       {"op": "max_pool2d", "inputs": ["t2"], "output": "t3", "kernel_size": [2, 2],
                        "stride": [2, 2], "padding": [0, 0]}]}
    rng = np.random.default_rng(0)
    np.savez(folder / "tensors.npz", **{"t2.weight": rng.integers(-50, 50, (2, 3, 1, 1)).astype(np.int8),
                                        "t2.bias": np.array([100, -100], np.int32),
                                        "t2.shift": np.array([6, 7], np.int32)})
    (folder / "model.json").write_text(json.dumps(graph))
    images = rng.random((1, 3, 8, 8)).astype(np.float32)
    out = IntegerModel(folder).run(images)
    np.savez(folder / "example.npz", images=images, **{k: v.astype(np.int32) for k, v in out.items()})
    return folder, graph


def test_the_minimal_integer_model_checks_itself(tmp_path, capsys):
    folder, _ = integer_model(tmp_path / "m")
    assert integer_main([str(folder), "--check"]) == 0
    assert capsys.readouterr().out == "0 of 32 output integers differ from example.npz\n"  # 2 channels of 4x4
    with np.load(folder / "example.npz") as ex:
        assert len(np.unique(ex["t3"])) > 5  # real integers, not a saturated or all-zero output


def _edit(path, **changes):
    def apply(g):
        for where, value in changes.items():
            *keys, last = where.split("__")
            d = g
            for k in keys:
                d = d[int(k)] if isinstance(d, list) else d[k]
            d[int(last) if isinstance(d, list) else last] = value
        return g
    return apply


INTEGER_DAMAGE = {  # change to model.json: what the one line says
    "not json": ("{\"format\": ", "model.json: not JSON (Expecting value"),
    "a list": (lambda g: [g], "model.json: not a bst-integer-model file of version 1 or 2"),
    "nodes not a list": (_edit(0, nodes=5), "model.json: 'nodes' must be a non-empty list"),
    "unknown op": (_edit(0, nodes__1__op="exec"), "model.json: node 1 has op 'exec'; the ops are quantize, conv2d"),
    "huge padding": (_edit(0, nodes__1__padding=[100000, 1]), "node 1 (conv2d): 'padding' must be two integers in "
                                                              "[0, 64]"),
    "huge pool": (_edit(0, nodes__2__kernel_size=[10 ** 9, 1]), "node 2 (max_pool2d): 'kernel_size' must be two "
                                                                "integers in [1, 64]"),
    "missing weight": (_edit(0, nodes__1__weight="nope"), "node 1 (conv2d): 'weight' must name a 4-d integer array"),
    "exponent": (_edit(0, tensors__t1__exponent=-2000), "tensor 't1': 'exponent' must be an integer in [-62, 62]"),
    "reads the future": (_edit(0, nodes__1__inputs=["t3"]), "node 1 (conv2d) reads ['t3']: a node reads tensors "
                                                            "computed before it"),
    "groups": (_edit(0, nodes__1__groups=0), "node 1 (conv2d): 'groups' must be a positive divisor of the 2 output "
                                             "channels"),
    "zero points": (_edit(0, nodes__1__weight_zero_point="a"), "node 1 (conv2d): 'weight_zero_point' must be an "
                                                               "integer or one per output channel"),
    "rounding": (_edit(0, nodes__1__rounding="up"), "node 1 (conv2d): 'rounding' must be one of"),
    "outputs": (_edit(0, outputs=["t9"]), "model.json: outputs ['t9'] are computed by no node"),
}


@pytest.mark.parametrize("case", list(INTEGER_DAMAGE))
def test_a_malformed_model_json_is_one_line(case, tmp_path, capsys):
    folder, graph = integer_model(tmp_path / "m")
    change, message = INTEGER_DAMAGE[case]
    (folder / "model.json").write_text(change if isinstance(change, str) else json.dumps(change(graph)))
    assert integer_main([str(folder), "--check"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"ERROR: {folder / 'model.json'}: ") and message in err[0], err
    assert err[0].endswith("export the model again" + (" (export.py --include integer)" if case != "not json" else ""))


def test_the_runner_script_says_it_in_one_line_too(tmp_path):
    """run_integer.py as export.py writes it (the runner's file, copied), in a process of its own."""
    folder, graph = integer_model(tmp_path / "m")
    shutil.copyfile(ROOT / "bst/torch/ao/quantization/integer_runner.py", folder / "run_integer.py")
    graph["nodes"][2]["stride"] = [0, 1]
    (folder / "model.json").write_text(json.dumps(graph))
    r = subprocess.run([sys.executable, str(folder / "run_integer.py"), str(folder), "--check"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2 and r.stdout == "" and r.stderr == (
        f"ERROR: {folder / 'model.json'}: node 2 (max_pool2d): 'stride' must be two integers in [1, 64]; export the "
        f"model again (export.py --include integer)\n")
    # an input the model cannot take: one line naming the node
    graph["nodes"][2]["stride"] = [2, 2]
    (folder / "model.json").write_text(json.dumps(graph))
    np.save(tmp_path / "x.npy", np.zeros((1, 5, 8, 8), np.float32))
    r = subprocess.run([sys.executable, str(folder / "run_integer.py"), str(folder), "--input",
                        str(tmp_path / "x.npy")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.startswith(f"ERROR: {folder / 'model.json'}: node 1 (conv2d) cannot run on "
                                                     f"input [1, 5, 8, 8] (") and r.stderr.count("\n") == 1, r.stderr
