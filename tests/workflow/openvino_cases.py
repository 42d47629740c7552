"""export.py --include openvino: upstream's *_openvino_model folder, converted from the ONNX file and checked against
PyTorch; DetectMultiBackend, val.py and detect.py load it; benchmarks/export_speed.py times it.

Run by tests/workflow/test_export_openvino.py in a pytest process of their own: a process that has run OpenVINO's CPU
plugin (its thread pool stays up) later crashed the test worker that forked data-loader workers and subprocesses after
it, so the long-lived test workers never load it."""
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import reference, shapes_subset
from qat_models import H, W, exported

import export
import val
from utils.general import LOGGER, UserError
from workflow.backend import DetectMultiBackend, load_pytorch_model
from workflow.exporters.verify import sample_batch, verify_openvino

pytest.importorskip("openvino")


def test_float_model_folder_and_outputs(tmp_path):
    """The folder holds <stem>.xml/.bin/.yaml as upstream's; the ONNX file is written too; the model computes what
    PyTorch computes (the export's own check), through DetectMultiBackend as well, at a second shape when dynamic."""
    pt = tmp_path / "yolov5n_relu.pt"
    shutil.copy(reference("yolov5n_relu.pt"), pt)
    files = export.run(weights=pt, imgsz=(H, W), include=["openvino"], dynamic=True)
    folder = tmp_path / "yolov5n_relu_openvino_model"
    assert files == [str(tmp_path / "yolov5n_relu.onnx"), str(folder)]
    assert sorted(p.name for p in folder.iterdir()) == ["yolov5n_relu.bin", "yolov5n_relu.xml", "yolov5n_relu.yaml"]
    meta = yaml.safe_load((folder / "yolov5n_relu.yaml").read_text())
    model = load_pytorch_model(pt)
    assert meta["stride"] == 32 and meta["names"] == export.model_metadata(model)["names"] and meta["dynamic"] is True
    assert meta["quantized"] is False and meta["shape"] == [1, 3, H, W]
    backend = DetectMultiBackend(str(folder))
    assert backend.backend == "openvino" and backend.stride == 32 and backend.names == meta["names"]
    export.prepare_for_export(model)
    for shape in ((1, 3, H, W), (2, 3, 2 * H, W)):
        im = sample_batch(shape, seed=3)
        with torch.no_grad():
            ref = model(im)[0].numpy()
        out = backend(im).numpy()
        assert out.shape == ref.shape and np.abs(out - ref).max() <= 1e-4 * np.abs(ref).max()


def test_fixed_shape_folder_refuses_another_shape(tmp_path):
    pt = tmp_path / "m.pt"
    shutil.copy(reference("yolov5n_silu.pt"), pt)
    export.run(weights=pt, imgsz=(H, W), include=["onnx", "openvino"])
    backend = DetectMultiBackend(str(tmp_path / "m_openvino_model"))
    assert backend.input_shape == [1, 3, H, W]
    with pytest.raises(UserError, match=f"exported for input 1x3x{H}x{W}, got 1x3x{W}x{H}"):
        backend(torch.zeros(1, 3, W, H))


def test_qat_model_reported_and_run_by_val(tmp_path_factory, tmp_path):
    """A QAT checkpoint's folder: OpenVINO runs the QDQ graph (utils.graph_forms.openvino_form) with int8
    convolutions and, zero points all even (ReLU), computes the fake-quant model's raw head outputs exactly, at a
    second shape too (a dynamic IR is compiled for each input shape); val.py runs the folder with the same
    rectangular batches as the .pt."""
    model, f, _, files = exported(tmp_path_factory, include=("onnx", "openvino"), dynamic=True)
    folder = Path(files[-1])
    assert folder.name.endswith("_openvino_model")
    assert yaml.safe_load(next(folder.glob("*.yaml")).read_text())["quantized"] is True
    im = sample_batch((2, 3, H, W), seed=5)
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    LOGGER.addHandler(handler)
    try:
        r = verify_openvino(model, folder, f, im, quantized=True)
    finally:
        LOGGER.removeHandler(handler)
    assert r["shape"] == (2, 3, H, W) and np.isfinite(r["output"]).all()
    assert r["raw_share_differ"] == 0 and r["raw_worst"] == 0 and r["odd_zero_points"] == 0
    assert any("raw head outputs 0.00% of" in m and "0 of 81 are odd" in m for m in messages)
    backend = DetectMultiBackend(str(folder))
    assert backend.quantized and backend.pow2 and backend.dynamic
    np.testing.assert_array_equal(backend(im).numpy(), r["output"])
    data = shapes_subset(tmp_path, 1, 4)
    (p, r_, map50, map_, *_), _, _ = val.run(data=str(data), weights=str(folder), imgsz=64, batch_size=2,
                                             project=tmp_path, plots=False)
    assert 0 <= map_ <= map50 <= 1


def test_silu_model_explains_where_openvino_differs(tmp_path_factory):
    """A SiLU model's conv outputs (the tables' inputs) have zero points, some odd: OpenVINO's FakeQuantize rounds
    after adding them, so it is not exact there, and the export says how many there are."""
    model, f, _, files = exported(tmp_path_factory, act="silu", include=("onnx", "openvino"))
    r = verify_openvino(model, Path(files[-1]), f, sample_batch((1, 3, H, W), seed=3), quantized=True)
    assert r["odd_zero_points"] > 0
    assert np.isfinite(r["output"]).all()


def test_missing_openvino_is_one_line(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    pt = tmp_path / "m.pt"
    shutil.copy(reference("yolov5n_silu.pt"), pt)
    with pytest.raises(UserError, match="--include openvino: needs the openvino package; pip install openvino"):
        export.run(weights=pt, imgsz=(H, W), include=["openvino"])
    assert not list(tmp_path.glob("*.onnx"))  # refused before anything was written


def _export_speed():
    """benchmarks/export_speed.py as a module (benchmarks/ is not a package)."""
    import importlib.util

    from conftest import ROOT

    spec = importlib.util.spec_from_file_location("export_speed", ROOT / "benchmarks" / "export_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_export_speed_benchmark_times_six_runtimes():
    """benchmarks/export_speed.py's main() times the six runtimes at each batch size (onnxruntime int8 as
    DetectMultiBackend runs the file and the file as it is), with int8 against the fp32 model of the same runtime."""
    bench = _export_speed()
    rows = bench.main(["--weights", str(reference("yolov5n_relu.pt")), "--sizes", "64", "--batch-sizes", "1", "2",
                       "--threads", "1", "--runs", "1"])
    assert [r[:4] for r in rows] == [(64, b, 1, k) for b in (1, 2) for k in (
        "PyTorch fp32", "onnxruntime fp32", "onnxruntime int8", "onnxruntime int8*", "OpenVINO fp32",
        "OpenVINO int8")]
    assert all(r[4] > 0 and r[5] > 0 for r in rows)
    assert [r[3] for r in rows if r[6] is not None] == ["onnxruntime int8", "onnxruntime int8*",
                                                        "OpenVINO int8"] * 2  # int8 vs fp32


def test_export_speed_openvino_profile_counts_every_node_by_precision(tmp_path):
    """The benchmark's OpenVINO profile of an exported pow2 QAT model: each node's time by its type and the precision
    it ran in; every convolution ran in int8, and the parts add up to the whole."""
    from utils.runtimes import openvino_xml

    bench = _export_speed()
    qat = bench.qat_checkpoint(reference("yolov5n_relu.pt"), tmp_path / "qat.pt", size=64)
    _, folder = bench.exports(qat, tmp_path / "out", 64, 1)
    profile = bench.ov_profile(openvino_xml(folder), sample_batch((1, 3, 64, 64), seed=2).numpy(), 1, runs=2)
    total = profile.pop("(run)")
    convs = {k: v for k, v in profile.items() if k.startswith("Convolution ")}
    assert convs and all(k.split(" ")[1] in ("i8", "u8") for k in convs), profile
    assert total > 0 and abs(total - sum(profile.values())) < 1e-6 * total
    assert list(profile.values()) == sorted(profile.values(), reverse=True)
