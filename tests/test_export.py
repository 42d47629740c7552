"""export.py: TorchScript and ONNX exports of the reference checkpoints, proven equal to PyTorch; the files run in
val.py / detect.py through DetectMultiBackend; bad input ends in one line."""
import ast
import functools
import json
import logging
import shutil

import numpy as np
import onnx
import pytest
import torch
from conftest import ROOT, reference

import export
from utils.general import UserError, run_cli
from workflow.backend import DetectMultiBackend, load_pytorch_model
from workflow.exporters import verify as export_verify

H, W = 128, 160  # non-square on purpose: a mixed-up h/w shows


@functools.lru_cache(maxsize=4)
def _load(pt):
    """The fused eval-mode model as export.py prepares it (tests only read it)."""
    model = load_pytorch_model(pt, device=torch.device("cpu"))
    return export.prepare_for_export(model)


@pytest.fixture(scope="module", params=["silu", "relu"])
def exported(request, tmp_path_factory):
    """The reference checkpoint copied to a temp folder and exported there to both formats at 128x160."""
    d = tmp_path_factory.mktemp(request.param)
    pt = d / f"yolov5n_{request.param}.pt"
    shutil.copy(reference(pt.name), pt)
    files = export.run(weights=pt, imgsz=(H, W), include=("torchscript", "onnx"))
    return pt, *map(type(pt), files)


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_export_files_structure_and_metadata(exported):
    pt, ts, onnx_file = exported
    assert ts == pt.with_suffix(".torchscript") and onnx_file == pt.with_suffix(".onnx")
    model = _load(pt)
    names = model.names

    proto = onnx.load(str(onnx_file))
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == export.DEFAULT_OPSET
    dims = [[d.dim_value for d in v.type.tensor_type.shape.dim] for v in (proto.graph.input[0], proto.graph.output[0])]
    assert dims == [[1, 3, H, W], [1, 3 * (16 * 20 + 8 * 10 + 4 * 5), 85]]  # 3 anchors at strides 8, 16, 32
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["stride"] == "32" and meta["quantized"] == "0"
    assert ast.literal_eval(meta["names"]) == names and len(names) == 80

    extra = {"config.txt": ""}
    torch.jit.load(str(ts), _extra_files=extra)
    config = json.loads(extra["config.txt"])
    assert config["shape"] == [1, 3, H, W] and config["stride"] == 32 and config["dynamic"] is False
    assert {int(k): v for k, v in config["names"].items()} == names


def test_exported_files_match_pytorch_on_reference_input(exported):
    pt, ts, onnx_file = exported
    model = _load(pt)
    ref = torch.load(reference(pt.name.replace(".pt", "_outputs.pt")), weights_only=False)
    im = ref["input"][:1].float()
    assert tuple(im.shape) == (1, 3, H, W)
    r = export_verify.verify_onnx(model, onnx_file, im)
    assert r["ok"] and r["relative"] < 1e-4 and r["ref_max_abs"] > 10
    assert 0 < r["share_differ"] <= 1  # float kernels round differently: most values differ, all within tolerance
    t = export_verify.verify_torchscript(model, ts, im)
    assert t["ok"] and t["relative"] < 1e-6
    # the fused model still computes what upstream's fused model computed (README: up to 0.3% on these weights)
    up = ref["eval_output_fused"][:1].float().numpy()
    assert np.abs(r["output"] - up).max() < 3e-3 * np.abs(up).max()

    with torch.no_grad():
        y = model(im)[0]
    for backend in (DetectMultiBackend(onnx_file), DetectMultiBackend(ts), DetectMultiBackend(onnx_file, dnn=True)):
        assert backend.stride == 32 and backend.names == model.names and not backend.dynamic
        out = backend(im)
        assert out.shape == y.shape
        assert (out - y).abs().max() <= 1e-4 * y.abs().max(), backend.backend


def test_fixed_shape_file_refuses_other_shapes_in_one_line(exported):
    _, ts, onnx_file = exported
    for backend in (DetectMultiBackend(onnx_file), DetectMultiBackend(ts)):
        with pytest.raises(UserError, match=r"exported for input .*128x160, got 1x3x160x160; run with --imgsz 128 160"):
            backend(torch.zeros(1, 3, 160, 160))


def test_verification_catches_a_wrong_file(exported, tmp_path):
    """Tamper with one conv's bias in the ONNX file: the built-in check must fail, not report success."""
    pt, _, onnx_file = exported
    proto = onnx.load(str(onnx_file))
    bias = next(i for i in proto.graph.initializer if i.name.endswith("model.24.m.0.bias"))
    arr = onnx.numpy_helper.to_array(bias).copy()
    arr[0] += 0.5  # x offset logit of the first anchor at stride 8: boxes move by ~2 px
    bias.CopyFrom(onnx.numpy_helper.from_array(arr, bias.name))
    bad = tmp_path / "tampered.onnx"
    onnx.save(proto, str(bad))
    model = _load(pt)
    im = export_verify.sample_batch((1, 3, H, W))
    r = export_verify.verify_onnx(model, bad, im, check=False)
    assert not r["ok"] and r["max_abs_diff"] > 1e-3 and 0 < r["share_over"] < 0.01
    with pytest.raises(UserError, match="disagrees with PyTorch"):
        export_verify.verify_onnx(model, bad, im)


def test_compare_outputs_numbers():
    ref = np.array([[0.0, 10.0], [-20.0, 1.0]])
    r = export_verify.compare_outputs(ref, ref + np.array([[0.0, 0.001], [0.0, 0.0]]))
    assert r["ref_max_abs"] == 20.0 and r["max_abs_diff"] == pytest.approx(0.001)
    assert r["relative"] == pytest.approx(5e-5) and r["share_differ"] == 0.25 and r["ok"]
    r = export_verify.compare_outputs(ref, ref + np.array([[0.0, 0.003], [0.0, 0.0]]))  # 1.5e-4 relative
    assert not r["ok"] and r["share_over"] == 0.25
    # the QDQ form: an absolute tolerance of one output quantization step
    step = 2.0 ** -4
    q = export_verify.compare_outputs(ref, ref + np.array([[step, 0.0], [0.0, -step]]), rtol=0.0, atol=step)
    assert q["ok"] and q["share_differ"] == 0.5 and q["tolerance"] == step
    assert not export_verify.compare_outputs(ref, ref + 1.5 * step, rtol=0.0, atol=step)["ok"]
    assert not export_verify.compare_outputs(ref, np.full_like(ref, np.nan))["ok"]


def test_dynamic_onnx_runs_at_other_shapes(tmp_path):
    pt = tmp_path / "yolov5n_relu.pt"
    shutil.copy(reference(pt.name), pt)
    (f,) = export.run(weights=pt, imgsz=(64, 96), include=["onnx"], dynamic=True)
    proto = onnx.load(f)
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", 3, "height", "width"]
    backend = DetectMultiBackend(f)
    assert backend.dynamic
    model = export.prepare_for_export(load_pytorch_model(pt), dynamic=True)
    im = export_verify.sample_batch((2, 3, 96, 64), seed=3)
    with torch.no_grad():
        y = model(im)[0]
    out = backend(im)
    assert out.shape == (2, 3 * (12 * 8 + 6 * 4 + 3 * 2), 85)
    assert (out - y).abs().max() <= 1e-4 * y.abs().max()


def test_half_onnx_export(tmp_path):
    """--half: a float16 graph (input float16), checked at float16 tolerance, runnable by DetectMultiBackend."""
    pt = tmp_path / "yolov5n_silu.pt"
    shutil.copy(reference(pt.name), pt)
    (f,) = export.run(weights=pt, imgsz=(64, 64), include=["onnx"], half=True)
    proto = onnx.load(f)
    assert proto.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    model = _load(pt)  # float32 reference
    im = export_verify.sample_batch((1, 3, 64, 64))
    with torch.no_grad():
        y = model(im)[0]
    out = DetectMultiBackend(f)(im)
    assert (out - y).abs().max() <= export_verify.HALF_RTOL * y.abs().max()


def _pseudo_labelled_dataset(root, pt, n=4, imgsz=160):
    """A few shapes val images labelled with the pt model's own confident detections (the random reference model
    scores ~0 mAP on the real labels, which could not tell a broken export from a good one)."""
    from utils.dataloaders import LoadImages
    from utils.dataset_yaml import check_dataset
    from utils.general import non_max_suppression, scale_boxes, xyxy2xywhn

    shapes = check_dataset(ROOT / "data/shapes.yaml")
    src = sorted((ROOT / "datasets/shapes/images/val").glob("*.jpg"))[:n]
    assert len(src) == n, shapes["val"]
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    model = DetectMultiBackend(pt)
    for path, im, im0, *_ in LoadImages([str(s) for s in src], img_size=imgsz, auto=False):
        x = torch.from_numpy(im)[None].float() / 255
        det = non_max_suppression(model(x), conf_thres=0.3, iou_thres=0.45, max_det=12)[0]
        det[:, :4] = scale_boxes(x.shape[2:], det[:, :4], im0.shape)
        xywh = xyxy2xywhn(det[:, :4], w=im0.shape[1], h=im0.shape[0])
        name = path.split("/")[-1]
        shutil.copy(path, root / "images" / name)
        rows = [f"{int(c)} {' '.join(f'{v:.6f}' for v in b)}" for c, b in zip(det[:, 5].tolist(), xywh.tolist())]
        (root / "labels" / name).with_suffix(".txt").write_text("\n".join(rows) + "\n")
    (root / "val.txt").write_text("".join(f"{p}\n" for p in sorted((root / "images").glob("*.jpg"))))
    yaml_file = root / "pseudo.yaml"
    yaml_file.write_text(json.dumps({"path": str(root), "train": "val.txt", "val": "val.txt",
                                     "names": {int(k): v for k, v in model.names.items()}}))
    return yaml_file


def test_val_onnx_gives_the_pt_map(tmp_path, yolo_log):
    import val

    pt = tmp_path / "yolov5n_silu.pt"
    shutil.copy(reference(pt.name), pt)
    (onnx_file,) = export.run(weights=pt, imgsz=(160, 160), include=["onnx"])
    data = _pseudo_labelled_dataset(tmp_path / "ds", pt)
    # val letterboxes .pt models to rectangles (rect) and exported files to squares; task="speed" gives the .pt
    # model the same square inputs the ONNX file gets, so the two mAPs are comparable
    # A float model in two runtimes differs by float rounding (~1e-6 relative), which reorders this random model's
    # many near-tied boxes: mAP50 0.879 vs 0.881 here, 0.877 vs 0.880 at conf 0.05 / max_det 30. Hence 0.005 for
    # this float file; a power-of-two QAT export is exact (tests/workflow/test_export_exact.py)
    r_pt = val.run(data=str(data), weights=str(pt), imgsz=160, batch_size=1, task="speed", conf_thres=0.25,
                   max_det=300, workers=0, plots=False, project=tmp_path / "val", name="pt")[0]
    yolo_log.clear()
    # the CLI path of `python val.py --weights x.onnx ...` (in-process: main(parse_opt(argv)) under run_cli)
    r_onnx = run_cli(val.main, val.parse_opt(["--weights", str(onnx_file), "--data", str(data), "--img", "160",
                                              "--conf-thres", "0.25", "--max-det", "300", "--workers", "0",
                                              "--project", str(tmp_path / "val"), "--name", "onnx"]))[0]
    log = "\n".join(yolo_log)
    assert "Forcing --batch-size 1" in log and "ONNX Runtime" in log
    assert r_pt[2] > 0.3, "the pseudo labels must give the pt model a clear mAP"
    assert r_onnx[2] == pytest.approx(r_pt[2], abs=0.005) and r_onnx[3] == pytest.approx(r_pt[3], abs=0.005)


@pytest.mark.parametrize("exported", ["silu"], indirect=True)
def test_detect_onnx_non_square(exported, tmp_path, yolo_log):
    import detect

    _, _, onnx_file = exported
    src = sorted((ROOT / "datasets/shapes/images/val").glob("*.jpg"))
    if not src:
        pytest.skip("shapes dataset not generated")
    run_cli(detect.main, detect.parse_opt(["--weights", str(onnx_file), "--source", str(src[0]), "--imgsz", str(H),
                                           str(W), "--conf-thres", "0.3", "--save-txt", "--nosave",
                                           "--project", str(tmp_path), "--name", "exp"]))
    assert any(f"{H}x{W}" in m for m in yolo_log)
    labels = np.loadtxt(tmp_path / "exp" / "labels" / f"{src[0].stem}.txt", ndmin=2)
    assert len(labels) > 0 and ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()


def _text_file(tmp_path):
    f = tmp_path / "notes.pt"
    f.write_text("these are notes, not weights\n")
    return f


@pytest.mark.parametrize("args, message", [
    (["--weights", "TEXT"], "not a PyTorch checkpoint"),
    (["--weights", "REF", "--include", "onnx", "engine"], "--include engine: unsupported format"),
    (["--weights", "REF", "--include", "onnx", "--opset", "12"], "per-channel QuantizeLinear"),
    (["--weights", "missing/none.pt"], "none.pt: weights file not found"),
    (["--weights", "data/shapes.yaml"], "export takes a PyTorch checkpoint"),
])
def test_bad_input_one_line(args, message, tmp_path, capsys):
    args = [str(_text_file(tmp_path)) if a == "TEXT" else str(reference("yolov5n_silu.pt")) if a == "REF" else a
            for a in args]
    with pytest.raises(SystemExit) as e:
        run_cli(export.main, export.parse_opt(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and message in err[0], err
    assert not list(tmp_path.glob("*.onnx")) and not list(tmp_path.glob("*.torchscript"))


def test_dnn_unreadable_graph_one_line(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("images", TensorProto.FLOAT, [1, 3, 32, 32])
    y = helper.make_tensor_value_info("output0", TensorProto.FLOAT, [1, 3, 32, 32])
    graph = helper.make_graph([helper.make_node("Mystery", ["images"], ["output0"], domain="com.example")], "g",
                              [x], [y])
    f = tmp_path / "custom.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.example", 1)]), str(f))
    with pytest.raises(UserError, match="OpenCV DNN .* cannot read this graph .*drop --dnn") as e:
        DetectMultiBackend(f, dnn=True)
    assert "\n" not in str(e.value)


def test_benchmark_int8_kernel_inspection(tmp_path):
    """benchmarks/export_speed.py reads onnxruntime's optimized graph: a fake-quant conv exported by the
    TorchScript-based exporter becomes QuantizeLinear/DequantizeLinear, which onnxruntime fuses into QLinearConv;
    the same conv in float runs no int8 kernel."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_speed", ROOT / "benchmarks" / "export_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)

    class FakeQuantConv(torch.nn.Module):
        def __init__(self, quantize):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
            self.quantize = quantize
            self.register_buffer("w_scale", torch.full((8,), 2.0 ** -6))
            self.register_buffer("w_zero", torch.zeros(8, dtype=torch.int32))

        def forward(self, x):
            if not self.quantize:
                return self.conv(x)
            x = torch.fake_quantize_per_tensor_affine(x, 2.0 ** -7, 0, 0, 255)
            w = torch.fake_quantize_per_channel_affine(self.conv.weight, self.w_scale, self.w_zero, 0, -128, 127)
            y = torch.nn.functional.conv2d(x, w, self.conv.bias, padding=1)
            return torch.fake_quantize_per_tensor_affine(y, 2.0 ** -4, 0, 0, 255)

    x = torch.rand(1, 3, 16, 16)
    found = {}
    for quantize in (True, False):
        f = tmp_path / f"conv_{quantize}.onnx"
        torch.onnx.export(FakeQuantConv(quantize).eval(), (x,), str(f), opset_version=export.DEFAULT_OPSET,
                          dynamo=False)
        found[quantize] = bench.kernels_run(f)
    assert found[True]["int8_ran"] and found[True]["int8"] == {"QLinearConv": 1} and found[True]["float_convs"] == 0
    assert not found[False]["int8_ran"] and found[False]["float_convs"] == 1


def _qdq_file(path, nodes, inits, shape, out, quantized=True):
    """A one-input QDQ graph saved at `path` with the metadata DetectMultiBackend reads."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "qdq", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    for k, v in {"stride": "32", "names": "{0: 'a'}", "quantized": "1" if quantized else "0", "pow2": "1"}.items():
        model.metadata_props.add(key=k, value=v)
    onnx.save(model, str(path))
    return path


def _saturating_conv(path, rng):
    """DequantizeLinear(uint8 x) -> Conv(int8 weights, int32 bias) -> QuantizeLinear, power-of-two scales, with
    activations and weights large enough that two neighbouring products overflow 16 bits (255 x 127 x 2 > 32767)."""
    from onnx import helper, numpy_helper

    cin, cout, sx, sw = 32, 8, 2.0 ** -7, 2.0 ** -7
    w = (rng.integers(64, 128, (cout, cin, 3, 3)) * rng.choice([-1, 1], (cout, cin, 3, 3))).astype(np.int8)
    w[:, : cin // 2] = np.abs(w[:, : cin // 2])  # some all-positive runs along the reduction
    bias = rng.integers(-2000, 2000, cout).astype(np.int32)
    acc_max = 255 * np.abs(w.astype(np.int64)).sum((1, 2, 3)).max() + 2000
    sy = 2.0 ** np.ceil(np.log2(acc_max * sx * sw / 255))
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xdq"]),
             helper.make_node("DequantizeLinear", ["w", "sw", "zw"], ["wdq"], axis=0),
             helper.make_node("DequantizeLinear", ["b", "sb", "zb"], ["bdq"], axis=0),
             helper.make_node("Conv", ["xdq", "wdq", "bdq"], ["y"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["y"], ["r"]),
             helper.make_node("QuantizeLinear", ["r", "sy", "zy"], ["yq"]),
             helper.make_node("DequantizeLinear", ["yq", "sy", "zy"], ["out"])]
    f32, arr = np.float32, numpy_helper.from_array
    inits = [arr(np.array(sx, f32), "sx"), arr(np.array(0, np.uint8), "zx"), arr(w, "w"),
             arr(np.full(cout, sw, f32), "sw"), arr(np.zeros(cout, np.int8), "zw"), arr(bias, "b"),
             arr(np.full(cout, sx * sw, f32), "sb"), arr(np.zeros(cout, np.int32), "zb"),
             arr(np.array(sy, f32), "sy"), arr(np.array(0, np.uint8), "zy")]
    x = (rng.integers(128, 256, (1, cin, 12, 12)) * sx).astype(np.float32)
    exact = np.zeros((1, cout, 12, 12))  # the integer network in int64, half-to-even requantization
    xi = np.pad(np.round(x / sx).astype(np.int64), ((0, 0), (0, 0), (1, 1), (1, 1)))
    for i in range(3):
        for j in range(3):
            exact += np.einsum("nchw,oc->nohw", xi[:, :, i:i + 12, j:j + 12], w[:, :, i, j].astype(np.int64))
    exact = np.maximum(exact + bias[None, :, None, None], 0) * (sx * sw)
    exact = np.clip(np.round(exact / sy), 0, 255) * sy
    return _qdq_file(path, nodes, inits, list(x.shape), "out"), x, exact.astype(np.float32)


def test_int8_kernels_are_exact_in_kernel_form(tmp_path):
    """onnxruntime_session gives int8 weights to onnxruntime as uint8 + 128 (onnxruntime_kernel_form): same integers,
    and its QLinearConv then accumulates exactly in 32 bits, so the int8 kernels equal the integer network and the
    graph as written even where neighbouring products overflow 16 bits (onnxruntime's u8 x s8 kernel saturates there
    on x86 CPUs without VNNI)."""
    import importlib.util

    from utils.graph_forms import onnxruntime_kernel_form
    from utils.runtimes import onnxruntime_session

    spec = importlib.util.spec_from_file_location("export_speed", ROOT / "benchmarks" / "export_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    f, x, exact = _saturating_conv(tmp_path / "conv.onnx", np.random.default_rng(0))
    written = onnxruntime_session(f, as_written=True).run(None, {"x": x})[0]
    assert np.array_equal(written, exact)
    for weights in ("uint8", None):  # the kernel form, and what this CPU gets by default
        assert np.array_equal(onnxruntime_session(f, weights=weights).run(None, {"x": x})[0], exact)
    form, changed = onnxruntime_kernel_form(onnx.load(str(f)))
    assert changed == 1
    w = {t.name: onnx.numpy_helper.to_array(t) for t in form.graph.initializer}
    assert w["w"].dtype == np.uint8 and np.array_equal(w["w"].astype(np.int16) - 128,
                                                       onnx.numpy_helper.to_array(onnx.load(str(f)).graph.initializer[2]))
    assert (w["w_zero_point_u8"] == 128).all() and "zw" not in w  # the unused int8 zero point is dropped
    assert bench.kernels_run(f)["int8"] == {"QLinearConv": 1}  # and it still runs as an int8 kernel


def test_int8_weights_stay_int8_only_on_cpus_with_vnni(tmp_path, monkeypatch):
    """With VNNI (VPDPBUSD sums u8 x s8 products in 32 bits) onnxruntime's kernel for int8 weights is exact, and the
    faster one, so onnxruntime_session keeps the weights as stored there; elsewhere it hands them over as uint8."""
    import platform

    import utils.runtimes as runtimes

    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    for flags, form in (({"avx2", "fma"}, "uint8"), ({"avx2", "avx512_vnni"}, "int8"), ({"avx_vnni"}, "int8")):
        monkeypatch.setattr(runtimes, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert runtimes.int8_weight_form() == form
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert runtimes.int8_weight_form() == "uint8"
    monkeypatch.undo()
    if runtimes.int8_weight_form() == "int8":  # this CPU has VNNI: the stored int8 weights must give the exact numbers
        f, x, exact = _saturating_conv(tmp_path / "conv.onnx", np.random.default_rng(2))
        assert np.array_equal(runtimes.onnxruntime_session(f, weights="int8").run(None, {"x": x})[0], exact)
    with pytest.raises(ValueError, match="weights='int4'"):
        runtimes.onnxruntime_session(tmp_path / "conv.onnx", weights="int4")


def test_backend_uses_int8_kernels_only_where_they_equal_the_graph(tmp_path):
    """DetectMultiBackend runs a QDQ file with onnxruntime's int8 kernels when, on the first batch, they give the
    graph's own numbers, and as written otherwise. The second file is a skip-add whose QLinearAdd rounds ties after
    adding a non-zero zero point (QuantizeLinear rounds half to even before it): its kernel differs on ties."""
    from onnx import helper, numpy_helper

    from utils.general import LOGGER

    f, x, exact = _saturating_conv(tmp_path / "conv.onnx", np.random.default_rng(1))
    model = DetectMultiBackend(str(f))
    y = model(torch.from_numpy(x)).numpy()
    assert np.array_equal(y, exact) and model.as_written is None
    assert model.session.get_session_options().graph_optimization_level.name == "ORT_ENABLE_ALL"
    assert np.array_equal(model(torch.from_numpy(x)).numpy(), exact)  # the kernel session, kept

    qparams = {"a": (2.0 ** -9, 20, 1.0), "b": (2.0 ** -9, 22, -0.75), "y": (2.0 ** -8, 97, None)}
    nodes, inits = [], []
    for name, (scale, zp, gain) in qparams.items():
        src = "sum" if name == "y" else f"{name}_in"
        if gain is not None:
            nodes.append(helper.make_node("Mul", ["x", f"{name}_g"], [src]))
            inits.append(numpy_helper.from_array(np.array(gain, np.float32), f"{name}_g"))
        nodes += [helper.make_node("QuantizeLinear", [src, f"{name}_s", f"{name}_z"], [f"{name}_q"]),
                  helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s", f"{name}_z"], [f"{name}_dq"])]
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_s"),
                  numpy_helper.from_array(np.array(zp, np.uint8), f"{name}_z")]
    nodes.append(helper.make_node("Add", ["a_dq", "b_dq"], ["sum"]))
    shape = [1, 8, 16, 16]
    add = _qdq_file(tmp_path / "add.onnx", nodes, inits, shape, "y_dq")
    rng = np.random.default_rng(0)
    x = ((rng.integers(0, 200, shape) - 20) * 2.0 ** -9).astype(np.float32)
    a = np.clip(np.round(x / 2.0 ** -9) + 20, 0, 255) - 20
    b = np.clip(np.round(-0.75 * x / 2.0 ** -9) + 22, 0, 255) - 22
    exact = ((np.clip(np.round((a + b) / 2) + 97, 0, 255) - 97) * 2.0 ** -8).astype(np.float32)  # half to even
    messages = []
    handler = logging.Handler()
    handler.emit = lambda record: messages.append(record.getMessage())
    LOGGER.addHandler(handler)
    try:
        model = DetectMultiBackend(str(add))
        assert np.array_equal(model(torch.from_numpy(x)).numpy(), exact)  # the first batch: the graph's numbers
        assert np.array_equal(model(torch.from_numpy(x)).numpy(), exact)  # and from then on, as written
    finally:
        LOGGER.removeHandler(handler)
    assert any("int8 kernels differ from the graph as written" in m and "running it as written" in m
               for m in messages), messages
