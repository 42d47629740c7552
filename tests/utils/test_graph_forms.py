"""Runtime forms of an exported QDQ file (utils/graph_forms.py): the same integers arranged for onnxruntime's and
OpenVINO's kernels. OpenVINO itself runs in tests/workflow/openvino_cases.py (a process of its own); here its form is
checked with onnxruntime, which computes every graph as written."""
import importlib.util

import numpy as np
import onnx
import pytest
from conftest import ROOT
from onnx import numpy_helper
from qat_models import H, W, exported

from utils.graph_forms import openvino_form, space_to_depth_form
from utils.runtimes import onnxruntime_session
from workflow.exporters.verify import raw_output_probe, sample_batch


def _optimized_ops(model, path):
    onnxruntime_session(model, optimized_model_filepath=path)
    return onnx.load(str(path))


@pytest.mark.parametrize("dynamic", [False, True])
def test_space_to_depth_form_computes_the_same_integers(dynamic, tmp_path_factory, tmp_path):
    """yolov5n's first conv (6x6, stride 2, padding 2, 3 channels) as SpaceToDepth + a 3x3 stride-1 conv on 12
    channels: onnxruntime's int8 kernels give the raw outputs of the graph as written, bit for bit."""
    _, f, proto, _ = exported(tmp_path_factory, dynamic=dynamic, include=("onnx",))
    form, changed = space_to_depth_form(onnx.load(str(f)))
    assert changed == 1
    conv = next(n for n in form.graph.node if n.op_type == "Conv")
    attrs = {a.name: list(a.ints) for a in conv.attribute}
    assert attrs["kernel_shape"] == [3, 3] and attrs["strides"] == [1, 1] and attrs["pads"] == [1, 1, 1, 1]
    inits = {i.name: numpy_helper.to_array(i) for i in form.graph.initializer}
    old = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}["model.0.conv.weight_int8"]
    new = inits["model.0.conv.weight_int8"]
    assert old.shape == (16, 3, 6, 6) and new.shape == (16, 12, 3, 3)
    assert new[5, 2 * 3 + 1, 2, 0] == old[5, 1, 2 * 2 + 1, 2 * 0 + 0]  # channel (dy*2 + dx)*3 + c, tap (a, b)
    assert sorted(new.ravel().tolist()) == sorted(old.ravel().tolist())
    probe, names = raw_output_probe(f)
    written = onnxruntime_session(probe, as_written=True)
    kernels = onnxruntime_session(probe)  # space_to_depth=True by default
    file_as_is = onnxruntime_session(probe, space_to_depth=False)
    shapes = [(1, 3, H, W)] + ([(2, 3, 2 * H, W + 32)] if dynamic else [])
    for shape in shapes:
        x = sample_batch(shape, seed=4).numpy()
        ref = written.run(names, {"images": x})
        for session in (kernels, file_as_is):
            assert all(np.array_equal(a, b) for a, b in zip(ref, session.run(names, {"images": x})))
    ops = [n.op_type for n in _optimized_ops(probe, tmp_path / "opt.onnx").graph.node]
    assert ops.count("SpaceToDepth") == 1 and ops.count("QLinearConv") == 60


def test_openvino_form_changes_no_number(tmp_path_factory):
    """The OpenVINO form (a Clip on every dequantized input of an Add, the head permute as NCHW -> NHWC and a transpose
    of whole rows, after the head's per-channel scales as the file has them) computes the file's raw outputs, run as
    written."""
    _, f, _, _ = exported(tmp_path_factory)
    probe, names = raw_output_probe(f)
    form, counts = openvino_form(onnx.load_from_string(probe))
    assert counts == {"clips": 14, "permutes": 3}  # 7 skip-adds, 2 inputs each; 3 levels
    ops = [n.op_type for n in form.graph.node]
    assert ops.count("Clip") == 14 and ops.count("Transpose") == 6
    perms = sorted(tuple(next(a for a in t.attribute if a.name == "perm").ints) for t in form.graph.node
                   if t.op_type == "Transpose")
    assert perms == [(0, 2, 3, 1)] * 3 + [(0, 3, 1, 2, 4)] * 3
    producers = {o: n for n in form.graph.node for o in n.output}
    for name in names:  # raw output = Cast(Transpose(Reshape(Transpose(Mul(DequantizeLinear(QuantizeLinear))))))
        chain, node = [], producers[name]
        while node.op_type != "QuantizeLinear":
            chain.append(node.op_type)
            node = producers[node.input[0]]
        assert chain == ["Cast", "Transpose", "Reshape", "Transpose", "Mul", "DequantizeLinear"]
    x = sample_batch((1, 3, H, W), seed=6).numpy()
    ref = onnxruntime_session(probe, as_written=True).run(names, {"images": x})
    got = onnxruntime_session(form.SerializeToString(), as_written=True).run(names, {"images": x})
    assert all(np.array_equal(a, b) for a, b in zip(ref, got))


def test_export_speed_profile_names_the_op_types(tmp_path_factory):
    """benchmarks/export_speed.py's profile: milliseconds per run by op type of the graph onnxruntime runs."""
    spec = importlib.util.spec_from_file_location("export_speed", ROOT / "benchmarks" / "export_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    _, f, _, _ = exported(tmp_path_factory)
    x = sample_batch((1, 3, H, W)).numpy()
    profile = bench.ort_profile(f, x, threads=1, runs=3)
    assert profile["(run)"] > 0 and profile["QLinearConv"] > 0 and "SpaceToDepth" in profile
    assert sum(v for k, v in profile.items() if k != "(run)") <= profile["(run)"] * 1.05
    assert "avx2" in bench.CPU_FLAGS and bench.cpu_description()


def test_fused_decode_gives_the_same_numbers():
    """Detect.decode_fused (what the OpenVINO IR is converted from) computes decode's numbers bit for bit, at two
    input shapes (its grids follow the shape)."""
    import torch

    from models.yolo import DetectionModel

    torch.manual_seed(0)
    model = DetectionModel(ROOT / "models/yolov5n.yaml", nc=7).eval()
    detect = model.model[-1]
    for shape in [(1, 3, 64, 96), (2, 3, 128, 64)]:
        x = torch.rand(shape)
        with torch.no_grad():
            ref = model(x)[0]
            detect.fused_decode = True
            try:
                got = model(x)[0]
            finally:
                detect.fused_decode = False
        assert torch.equal(got, ref) and ref[..., :4].std() > 1  # boxes in pixels, not a constant
