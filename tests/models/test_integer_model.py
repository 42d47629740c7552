"""The integer model: bst.convert of a power-of-two QAT yolov5n, bst's integer reference, `export.py --include integer`
(the graph as data) and its numpy-only runner all compute the PyTorch model's raw head outputs bit for bit."""
import re
import shutil
import subprocess
import sys
from copy import deepcopy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, reference, shapes_subset
from qat_models import H, W, qat_from_reference, save_qat, small_qat

import export
from bst.torch.ao.quantization import FakeQuantizeBase
from bst.torch.ao.quantization.integer_runner import IntegerModel
from models.quant import QATConfig, calibrate, convert_yolo, integer_head, prepare_yolo_qat
from utils.general import UserError
from workflow.backend import load_pytorch_model

BLOCK_TORCH = "import sys; sys.modules['torch'] = None; sys.argv = sys.argv[1:]; import runpy; " \
              "runpy.run_path(sys.argv[0], run_name='__main__')"


def raw_outputs(model, x):
    """PyTorch eval raw head outputs (bs, na, ny, nx, no) per level."""
    detect = model.model[-1]
    flag, detect.export = detect.export, False
    try:
        with torch.no_grad():
            return model(x)[1]
    finally:
        detect.export = flag


def as_raw(q, detect):
    """An integer-reference head output (bs, na * no, ny, nx) in the PyTorch layout, dequantized."""
    bs, _, ny, nx = q.int_repr.shape
    return q.dequantize().view(bs, detect.na, detect.no, ny, nx).permute(0, 1, 3, 4, 2)


@pytest.mark.parametrize("recipe", [None, "data/quant/mse_per_tensor.yaml"])
def test_integer_reference_equals_pytorch_on_release_weights(recipe, tmp_path):
    """Release-format yolov5n (ReLU) prepared for pow2 QAT, calibrated on shapes images: PyTorch eval and bst's
    integer reference give identical raw outputs at two input sizes (per-channel Detect outputs by default)."""
    pt = qat_from_reference(True, tmp_path / "qat.pt") if recipe is None else None
    if recipe is not None:
        model = load_pytorch_model(reference("yolov5n_relu.pt"), fuse=False).float().train()
        prepare_yolo_qat(model, QATConfig(bn_folding=True, pow2=True, recipe=ROOT / recipe))
        g = torch.Generator().manual_seed(0)
        calibrate(model, [(torch.randint(0, 256, (2, 3, 160, 160), dtype=torch.uint8, generator=g),)], 1,
                  torch.device("cpu"))
        pt = save_qat(model.eval(), tmp_path / "qat.pt")
    model = load_pytorch_model(pt)
    converted = convert_yolo(model)
    detect = model.model[-1]
    per_channel = [c.output_axis is not None for c in converted.model[-1].m]
    assert all(per_channel) == (recipe is None)
    g = torch.Generator().manual_seed(3)
    for shape in [(1, 3, 160, 160), (2, 3, 128, 224)]:
        x = torch.rand(shape, generator=g)
        raw = raw_outputs(model, x)
        ints = integer_head(converted, x)
        assert [tuple(r.shape) for r in raw] == [tuple(as_raw(q, detect).shape) for q in ints]
        differ = sum(int((as_raw(q, detect) != r).sum()) for q, r in zip(ints, raw))
        assert differ == 0, f"{differ} raw outputs differ at {shape}"
        assert all(q.int_repr.abs().max() > 10 for q in ints)  # real integers, not an all-zero output


@pytest.fixture(scope="module")
def integer_export(tmp_path_factory):
    d = tmp_path_factory.mktemp("integer")
    pt = save_qat(small_qat(), d / "qat.pt")
    (f,) = export.run(weights=pt, imgsz=(H, W), include=["integer"])
    return pt, f


def test_export_integer_folder_and_runner(integer_export):
    pt, f = integer_export
    folder = Path(f)
    assert folder.name == "qat_integer_model"
    names = sorted(p.name for p in folder.iterdir())
    assert names == ["example.npz", "model.json", "run_integer.py", "tensors.npz"]
    runner = IntegerModel(folder)
    graph = runner.graph
    ops = [n["op"] for n in graph["nodes"]]
    assert ops.count("conv2d") == 60 and ops.count("quantize") == 1 and ops.count("cat") == 13
    assert ops.count("add") == 7 and ops.count("max_pool2d") == 3 and ops.count("upsample_nearest") == 2
    convs = [n for n in graph["nodes"] if n["op"] == "conv2d"]
    assert all(runner.arrays[n["weight"]].dtype == np.int8 for n in convs)
    assert all(runner.arrays[n["bias"]].dtype == np.int32 for n in convs)
    outs = [graph["tensors"][o] for o in graph["outputs"]]
    assert [o["axis"] for o in outs] == [1, 1, 1] and all(len(o["exponent"]) == 45 for o in outs)

    # a third input size, not seen by the export: runner = integer reference = PyTorch
    model = load_pytorch_model(pt)
    converted = convert_yolo(model)
    x = torch.rand(2, 3, 96, 160, generator=torch.Generator().manual_seed(5))
    ran = runner.run(x.numpy())
    ints = integer_head(converted, x)
    raw = raw_outputs(model, x)
    for name, q, r in zip(graph["outputs"], ints, raw):
        assert np.array_equal(ran[name], q.int_repr.numpy())
        assert torch.equal(as_raw(q, model.model[-1]), r)


def test_runner_needs_only_numpy_and_checks_itself(integer_export, tmp_path):
    folder = Path(integer_export[1])
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(folder / "run_integer.py"), str(folder), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("0 of ") and "output integers differ" in r.stdout

    # one changed bias: the check fails
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    with np.load(bad / "tensors.npz") as t:
        arrays = {k: t[k] for k in t.files}
    key = next(k for k in arrays if k.endswith(".bias"))
    arrays[key] = arrays[key] + np.int32(1 << 12)
    np.savez(bad / "tensors.npz", **arrays)
    r = subprocess.run([sys.executable, "-c", BLOCK_TORCH, str(bad / "run_integer.py"), str(bad), "--check"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and not r.stdout.startswith("0 of "), r.stdout


def test_export_integer_refuses_linear_scales(tmp_path):
    pt = save_qat(small_qat(pow2=False), tmp_path / "linear.pt")
    with pytest.raises(UserError, match="power-of-two"):
        export.run(weights=pt, imgsz=(H, W), include=["integer"])


def test_half_up_rounding_is_honoured_end_to_end(tmp_path):
    """rounding="half_up" (add 2^(k-1), shift right by k): the fake-quant model, bst's integer reference and the
    numpy runner agree bit for bit, and the rule matters: the same model rounding half to even differs on ties."""
    model = small_qat(rounding="half_up")
    quantizers = [m for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    assert quantizers and {m.rounding for m in quantizers} == {"half_up"} and model.qat_config.rounding == "half_up"
    pt = save_qat(model, tmp_path / "half_up.pt")
    model = load_pytorch_model(pt)
    assert {m.rounding for m in model.modules() if isinstance(m, FakeQuantizeBase)} == {"half_up"}
    x = torch.rand(2, 3, H, W, generator=torch.Generator().manual_seed(7))
    raw = raw_outputs(model, x)
    converted = convert_yolo(model)
    ints = integer_head(converted, x)
    assert sum(int((as_raw(q, model.model[-1]) != r).sum()) for q, r in zip(ints, raw)) == 0

    even = deepcopy(model)
    for m in even.modules():
        if isinstance(m, FakeQuantizeBase):
            m.rounding = "half_even"
    changed = sum(int((a != b).sum()) for a, b in zip(raw_outputs(even, x), raw))
    assert changed > 0, "ties occur in a pow2 network; half up and half even must differ somewhere"

    (f,) = export.run(weights=pt, imgsz=(H, W), include=["integer"])
    runner = IntegerModel(f)
    assert runner.graph["rounding"] == "half_up"
    ran = runner.run(x.numpy())
    assert all(np.array_equal(ran[n], q.int_repr.numpy()) for n, q in zip(runner.graph["outputs"], ints))
    with pytest.raises(UserError, match="half up.*--include integer"):
        export.run(weights=pt, imgsz=(H, W), include=["onnx"])


def test_integer_exact_benchmark(integer_export, tmp_path, capsys):
    """benchmarks/integer_exact.py on val images: PyTorch, the integer reference, the numpy runner and onnxruntime
    (as written and with its int8 kernels) count 0 differing raw outputs, and the report says so for each pair."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("integer_exact", ROOT / "benchmarks" / "integer_exact.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    data = shapes_subset(tmp_path, 1, 3)
    pt = integer_export[0]
    assert bench.main(bench.parse_opt(["--weights", str(pt), "--data", str(data), "--img", "64", "--images", "3"])) == 0
    out = capsys.readouterr().out
    rows = {m[1]: int(m[2]) for m in re.finditer(r"^(\S.* vs \S.*?) +(\d+)$", out, re.M)}
    assert rows == {"integer reference vs PyTorch": 0, "numpy runner vs integer reference": 0,
                    "onnxruntime (as written) vs PyTorch": 0, "onnxruntime (int8 kernels) vs PyTorch": 0}
    assert f"raw head outputs ({3 * 3 * 15 * (8 * 8 + 4 * 4 + 2 * 2)} per column)" in out


def test_silu_model_integer_export_and_onnx_are_exact(tmp_path):
    """A SiLU yolov5n: each SiLU is a lookup table from the conv's output integers to its own (57 tables). The frozen
    PyTorch model, bst's integer reference, the numpy runner of the integer model and the ONNX file (onnxruntime as
    written) give identical raw head outputs, at the export shape and at another one."""
    pt = save_qat(small_qat(act="silu"), tmp_path / "silu.pt")
    files = export.run(weights=pt, imgsz=(H, W), include=["onnx", "integer"], dynamic=True)
    runner = IntegerModel(files[1])
    ops = [n["op"] for n in runner.graph["nodes"]]
    assert ops.count("lookup") == 57 and ops.count("conv2d") == 60 and runner.graph["version"] == 2
    model = load_pytorch_model(pt)
    converted = convert_yolo(model)
    from utils.runtimes import onnxruntime_session
    from workflow.exporters.verify import raw_output_probe

    probe, names = raw_output_probe(files[0])
    session = onnxruntime_session(probe, as_written=True)
    g = torch.Generator().manual_seed(11)
    for shape in [(1, 3, H, W), (2, 3, 96, 160)]:
        x = torch.rand(shape, generator=g)
        raw = raw_outputs(model, x)
        ints = integer_head(converted, x)
        ran = runner.run(x.numpy())
        by_shape = {r.shape: r for r in session.run(names, {"images": x.numpy()})}
        for name, q, r in zip(runner.graph["outputs"], ints, raw):
            assert torch.equal(as_raw(q, model.model[-1]), r)
            assert np.array_equal(ran[name], q.int_repr.numpy())
            assert np.array_equal(by_shape[tuple(r.shape)], r.numpy())


def test_release_silu_tables_equal_the_fake_quant_path(tmp_path):
    """The release yolov5n (SiLU, ../shared) prepared for pow2 QAT and calibrated: for every one of its 57 SiLU layers
    and all 256 input integers, the float SiLU followed by the output quantizer gives the table's integers; the
    converted model's integer reference equals the PyTorch model."""
    release = ROOT.parent / "shared" / "release" / "yolov5n.pt"
    if not release.is_file():
        pytest.skip(f"{release} not present")
    from models.quant import QuantizedActivation

    model = load_pytorch_model(release, fuse=False).float().train()
    prepare_yolo_qat(model, QATConfig(bn_folding=True, pow2=True), verbose=False)
    g = torch.Generator().manual_seed(0)
    calibrate(model, [(torch.randint(0, 256, (2, 3, 128, 128), dtype=torch.uint8, generator=g),)], 1,
              torch.device("cpu"))
    model.eval()
    acts = [m for m in model.modules() if isinstance(m, QuantizedActivation)]
    assert len(acts) == 57
    for m in acts:
        scale, zp, lo, hi = m.input_qparams
        x = ((torch.arange(lo, hi + 1) - zp).float() * scale).reshape(1, 1, 16, 16).repeat(2, 4, 3, 5)
        index = ((x / scale).round() + zp - lo).long()
        out = m.activation_post_process
        with torch.no_grad():
            fake = out(m.act(x))  # the release's SiLU works in place (x is not used after this)
        table = m.lookup_module().table
        assert torch.equal(torch.round(fake / out.scale).to(torch.int32) + int(out.zero_point), table[index])
    converted = convert_yolo(model)
    x = torch.rand(1, 3, 160, 192, generator=g)
    raw = raw_outputs(model, x)
    ints = integer_head(converted, x)
    assert sum(int((as_raw(q, model.model[-1]) != r).sum()) for q, r in zip(ints, raw)) == 0
