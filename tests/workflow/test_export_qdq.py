"""export.py on QAT checkpoints: ONNX with QuantizeLinear/DequantizeLinear (QDQ), the ONNX form of bst.convert's integer
network; its structure read back with the onnx package, the built-in onnxruntime check against the PyTorch fake-quant
model, and val.py on the file."""
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, reference
from onnx import numpy_helper
from qat_models import H, W, exported, qat_from_reference, save_qat, small_qat

import export
from bst.torch.ao.nn.quantized import onnx_form
from models.common import C3, SPPF, Bottleneck, Concat, Conv
from models.quant import convert_yolo
from utils.general import UserError, run_cli
from workflow.backend import DetectMultiBackend, load_pytorch_model
from workflow.exporters import verify as export_verify
from workflow.exporters.qdq_checks import detect_raw_outputs, qdq_structure
from workflow.exporters.verify import qdq_reference, sample_batch, verify_onnx_qdq, verify_torchscript_qdq


def _producers(proto):
    return {o: n for n in proto.graph.node for o in n.output}


def _is_pow2(a):
    mantissa, _ = np.frexp(np.asarray(a, dtype=np.float64))
    return (np.asarray(a) > 0) & (mantissa == 0.5)


@pytest.mark.parametrize("bn_folding", [True, False])
@pytest.mark.parametrize("pow2", [True, False])
def test_qdq_graph_structure(bn_folding, pow2, tmp_path_factory):
    model, f, proto, _ = exported(tmp_path_factory, bn_folding=bn_folding, pow2=pow2)
    onnx.checker.check_model(proto, full_check=True)
    assert {o.domain: o.version for o in proto.opset_import}[""] == export.DEFAULT_OPSET
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["quantized"] == "1" and meta["pow2"] == str(int(pow2)) and meta["stride"] == "32"

    # expected counts from the architecture: every Conv block (conv+BN+ReLU fused, one output quantizer after the
    # ReLU), every skip-add (Bottleneck with shortcut), every concat (C3, SPPF, Concat), the input and the three
    # Detect convs carry one activation quantizer = one QuantizeLinear + one DequantizeLinear each; every conv (Conv
    # blocks + Detect convs) has an int8 weight initializer and an int32 bias initializer, each with one
    # DequantizeLinear and no QuantizeLinear.
    n_conv = sum(isinstance(m, Conv) for m in model.modules())
    n_add = sum(isinstance(m, Bottleneck) and m.add for m in model.modules())
    n_cat = sum(isinstance(m, (C3, SPPF, Concat)) for m in model.modules())
    n_head = model.model[-1].nl
    assert (n_conv, n_add, n_cat, n_head) == (57, 7, 13, 3)
    n_act = 1 + n_conv + n_add + n_cat + n_head
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") == n_act == 81
    assert ops.count("DequantizeLinear") == n_act + 2 * (n_conv + n_head) == 201
    assert ops.count("Conv") == n_conv + n_head
    # BN is folded in both modes; no fake quantization decomposed into float ops; no shared-initializer Identity
    assert not {"BatchNormalization", "Round", "Identity", "Div"} & set(ops)

    converted = convert_yolo(model)  # what the file is the ONNX form of
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    prod = _producers(proto)
    for conv in (n for n in proto.graph.node if n.op_type == "Conv"):
        x_dq, w_dq, b_dq = prod[conv.input[0]], prod[conv.input[1]], prod[conv.input[2]]
        assert {x_dq.op_type, w_dq.op_type, b_dq.op_type} == {"DequantizeLinear"}  # input, weight, bias quantized
        q, scale, zp = (inits[name] for name in w_dq.input)
        axis = {a.name: a.i for a in w_dq.attribute}["axis"]
        assert axis == 0 and q.dtype == np.int8 and zp.dtype == np.int8 and not zp.any()
        assert scale.shape == zp.shape == (q.shape[0],) and scale.dtype == np.float32
        name = w_dq.input[0].rsplit(".weight_int8", 1)[0]
        assert w_dq.input[1:] == [f"{name}.weight_scale", f"{name}.weight_zero_point"]
        # the int32 bias on the grid input_scale x weight_scale, per output channel, without a zero point
        b, b_scale = (inits[n] for n in b_dq.input)
        assert b_dq.input == [f"{name}.bias_int32", f"{name}.bias_scale"] and {a.name: a.i for a in b_dq.attribute} == \
            {"axis": 0}
        assert b.dtype == np.int32 and b.shape == b_scale.shape == (q.shape[0],) and b_scale.dtype == np.float32
        layer = converted.get_submodule(name)
        assert np.array_equal(b, layer.bias_int32.numpy()) and np.array_equal(q, layer.weight_int8.numpy())
        # the file's weight is exactly the fake-quantized (BN-folded) weight of the QAT forward; a Detect conv with
        # one output scale per channel (default recipe) holds its weight and bias scales divided by that scale
        qat = model.get_submodule(name)
        with torch.no_grad():
            fake = qat.weight_fake_quant(qat.folded_weight_bias()[0]).numpy()
        grid = (layer.weight_scale * layer.input_scale).numpy()
        if name.startswith("model.24.m."):
            out_scale = qat.activation_post_process.scale.numpy()
            assert out_scale.shape == (q.shape[0],)
            fake, grid = fake / out_scale.reshape(-1, 1, 1, 1), grid / out_scale
            if not pow2:  # dividing by a scale that is not a power of two rounds in float32
                np.testing.assert_allclose(q.astype(np.float32) * scale.reshape(-1, 1, 1, 1), fake, rtol=1e-6)
                np.testing.assert_allclose(b_scale, grid, rtol=1e-6)
                continue
        assert np.array_equal(q.astype(np.float32) * scale.reshape(-1, 1, 1, 1), fake), name
        assert np.array_equal(b_scale, grid), name

    scales = [inits[n.input[1]] for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    flat = np.concatenate([s.ravel() for s in scales])
    act_scales = [s for s in scales if s.ndim == 0]
    assert len(act_scales) == 2 * n_act  # per-tensor: a scalar scale on every activation Q and DQ
    if pow2:  # the bias scales input_scale x weight_scale included
        assert _is_pow2(flat).all()
    else:  # linear scales: not powers of two in general (the input's 1/255, most observed ranges)
        assert not _is_pow2(flat).all() and (~_is_pow2(flat)).mean() > 0.5
        assert float(inits["input_quant.output_scale"]) == np.float32(1 / 255)

    # decoding stays float: each Detect sigmoid reads the DequantizeLinear of its conv through Reshape/Transpose
    heads = detect_raw_outputs(proto)
    assert len(heads) == 3
    for name in heads:
        node, chain = prod[name], []
        while node.op_type != "DequantizeLinear":
            chain.append(node.op_type)
            last, node = node, prod[node.input[0]]
        # the integer output (scale 1) times the per-channel scales of its quantizer
        assert chain == ["Cast", "Transpose", "Reshape", "Mul"]
        assert float(inits[node.input[1]]) == 1.0 and node.input[1].endswith(".unit_scale")
        conv = prod[prod[node.input[0]].input[0]]
        weight = prod[conv.input[1]].input[0]
        assert conv.op_type == "Conv" and weight.startswith("model.24.m.")
        qat = model.get_submodule(weight.rsplit(".weight_int8", 1)[0])
        mul_scale = next(inits[i] for i in last.input if i in inits)
        assert np.array_equal(mul_scale.ravel(), qat.activation_post_process.scale.numpy())


@pytest.mark.parametrize("bn_folding,pow2,recipe", [(True, True, None), (False, True, None), (True, False, None),
                                                    (False, False, None), (True, True, "mse_per_tensor.yaml")])
def test_onnxruntime_within_one_output_step(bn_folding, pow2, recipe, tmp_path_factory):
    model, f, _, _ = exported(tmp_path_factory, bn_folding=bn_folding, pow2=pow2, recipe=recipe)
    im = sample_batch((1, 3, H, W), seed=5)
    r = verify_onnx_qdq(model, f, im)
    det = model.model[-1]
    scales = [c.activation_post_process.scale for c in det.m]
    per_channel = recipe is None  # the default recipe: one output scale per Detect channel
    assert all(s.numel() == (det.no * det.na if per_channel else 1) and (s > 0).all() for s in scales)
    steps = [(float(s.min()), float(s.max())) if per_channel else float(s) for s in scales]
    assert r["ok"] and r["steps"] == steps
    for got, ref, s in zip(r["raw_output"], qdq_reference(model, im)["raw"], scales):
        diff = np.abs(got - ref)
        step = s.numpy().reshape(1, det.na, 1, 1, det.no) if per_channel else float(s)
        assert (diff <= step * (1 + 1e-4)).all()  # at most one output step
        # and only on a small share of the values
        assert (diff > 0).mean() < 0.05
    if pow2:
        # power-of-two grids make every product and sum exact in float32: onnxruntime computes the numbers of the
        # converted model (bst.convert, whose ONNX form the file is), which are the fake-quant model's numbers
        converted = export.prepare_for_export(convert_yolo(model))
        converted.model[-1].export = False
        with torch.no_grad():
            raw = [t.numpy() for t in converted(im)[1]]
        assert all(np.array_equal(a, b) for a, b in zip(raw, r["raw_output"]))
        assert r["raw_share_differ"] == 0 and r["decoded"]["max_abs_diff"] < 1e-3
    # onnxruntime's own int8 kernels (weights in onnxruntime_kernel_form): exact with power-of-two scales, and
    # within one step of the coarse per-tensor head steps here otherwise
    k = r["int8_kernels"]
    assert 0 <= k["raw_share_differ"] < 1 and k["raw_worst"] >= 0
    if pow2:
        assert k["raw_share_differ"] == 0 and all(np.array_equal(a, b) for a, b in zip(raw, k["raw_output"]))
    if not per_channel:
        assert k["ok"] and k["raw_worst"] <= 1 and k["raw_share_differ"] < 0.1


def test_silu_activations_are_lookup_tables(tmp_path_factory):
    model, f, proto, _ = exported(tmp_path_factory, act="silu")
    ops = [n.op_type for n in proto.graph.node]
    # SiLU is not fused into the conv: the conv output and the SiLU output are each quantized (57 + 57). Each SiLU
    # is an integer lookup, QuantizeLinear -> Cast -> Gather on a 256-entry table -> DequantizeLinear, reading the
    # conv's integers; no float sigmoid between them (the 3 Sigmoids left are Detect's decoding)
    assert ops.count("QuantizeLinear") == 1 + 2 * 57 + 7 + 13 + 3 and ops.count("DequantizeLinear") == 138 + 2 * 60
    assert ops.count("Sigmoid") == 3 and ops.count("Gather") == 57 and ops.count("Mul") == 15
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    prod = _producers(proto)
    for gather in (n for n in proto.graph.node if n.op_type == "Gather"):
        table = inits[gather.input[0]]
        assert gather.input[0].endswith(".act.table") and table.shape == (256,) and table.dtype == np.uint8
        cast = prod[gather.input[1]]
        assert cast.op_type == "Cast" and prod[cast.input[0]].op_type == "QuantizeLinear"
    assert qdq_structure(proto)["lookups"] == 57
    for seed, shape in ((2, (1, 3, H, W)),):
        r = verify_onnx_qdq(model, f, sample_batch(shape, seed=seed))
        assert r["ok"] and r["raw_share_differ"] == 0  # exact: the tables are the model's


def test_learnable_scales_export(tmp_path):
    """LSQ quantizers (custom autograd, which no ONNX exporter handles) export through their frozen qparams."""
    from bst.torch.ao.quantization import LearnableFakeQuantize

    model = small_qat(pow2=True, recipe={"default": {"activation": {"observer": "minmax"}, "learnable": True}})
    learnable = [m for m in model.modules() if isinstance(m, LearnableFakeQuantize)]
    assert len(learnable) >= 81
    with torch.no_grad():  # move the learned exponents off their calibrated values, as training would
        for q in learnable[::5]:
            q.log2_scale.sub_(1)
    pt = save_qat(model, tmp_path / "lsq.pt")
    (f,) = export.run(weights=pt, imgsz=(H, W), include=["onnx"])
    proto = onnx.load(f)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    s = qdq_structure(proto)
    assert s["quantize"] == 81 and s["dequantize"] == 201 and len(s["weight_dq"]) == len(s["bias_dq"]) == 60
    assert all(_is_pow2(v).all() for v in s["scales"].values())
    loaded = load_pytorch_model(pt)
    for name in ("model.0.conv", "model.24.m.0"):
        # the power of two of the learned log2_scale
        scale = loaded.get_submodule(f"{name}.activation_post_process").calculate_qparams()[0]
        assert float(inits[f"{name}.output_scale"]) == float(scale)
    assert verify_onnx_qdq(export.prepare_for_export(loaded), f, sample_batch((1, 3, H, W)))["ok"]


def test_float_detect_head(tmp_path):
    """The seed's best pow2 recipe keeps the Detect convs float: no QDQ on them, and the check bounds their outputs by
    one step of the quantizer feeding them times sum |w| per output channel."""
    model = small_qat(recipe={"rules": [{"match": "24", "mode": "float"}]})
    (f,) = export.run(weights=save_qat(model, tmp_path / "head_float.pt"), imgsz=(H, W), include=["onnx"])
    s = qdq_structure(onnx.load(f))
    assert (s["quantize"], s["dequantize"], len(s["weight_dq"]), len(s["bias_dq"])) == \
        (1 + 57 + 7 + 13, 78 + 2 * 57, 57, 57)
    r = verify_onnx_qdq(model, f, sample_batch((1, 3, H, W), seed=4))
    assert r["ok"] and r["steps"] == [None, None, None]
    tol = qdq_reference(model, sample_batch((1, 3, H, W), seed=4))["raw_tol"]
    step_in = float(model.model[23].cv3.conv.activation_post_process.scale)
    w = model.model[24].m[2].weight.detach().abs().sum((1, 2, 3)).numpy()
    assert np.allclose(tol[2].reshape(-1), step_in * w + export_verify.FLOAT_RTOL * np.abs(r["raw_output"][2]).max(),
                       rtol=1e-3)


def test_dynamic_torchscript_and_backend(tmp_path_factory):
    model, f, proto, files = exported(tmp_path_factory, bn_folding=False, pow2=True, dynamic=True,
                                      include=("onnx", "torchscript"))
    assert [d.dim_param or d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == \
        ["batch", 3, "height", "width"]
    backend = DetectMultiBackend(f)
    assert backend.quantized and backend.pow2 and backend.dynamic and backend.names == model.names
    im = sample_batch((2, 3, 96, 64), seed=3)
    with torch.no_grad():
        y = model(im)[0]
    out = backend(im)
    assert out.shape == y.shape == (2, 3 * (12 * 8 + 6 * 4 + 3 * 2), 15)
    assert verify_onnx_qdq(model, f, im)["ok"]
    ts = next(x for x in files if x.endswith(".torchscript"))
    r = verify_torchscript_qdq(model, ts, im)
    assert r["ok"] and r["max_abs_diff"] == 0  # the traced converted model computes the fake-quant model's numbers


def test_verification_catches_a_wrong_file(tmp_path_factory, tmp_path):
    """Double the weight scales of the conv before the last head (a scale written wrong): the check must fail."""
    model, f, proto, _ = exported(tmp_path_factory)
    bad = onnx.ModelProto()
    bad.CopyFrom(proto)
    w = next(i for i in bad.graph.initializer if i.name == "model.23.cv3.conv.weight_scale")
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 2, w.name))
    path = tmp_path / "tampered.onnx"
    onnx.save(bad, str(path))
    im = sample_batch((1, 3, H, W))
    r = verify_onnx_qdq(model, path, im, check=False)
    assert not r["ok"] and r["raw_worst"] > 2
    with pytest.raises(UserError, match="disagrees with the PyTorch fake-quant model"):
        verify_onnx_qdq(model, path, im)


class _Quantizer(nn.Module):
    """A converted module's output quantizer, as bst's ONNX form writes it."""

    def __init__(self, scale, zero_point, quant_min, quant_max, rounding="half_even"):
        super().__init__()
        self.register_buffer("scale", torch.tensor([scale]))
        self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.int32))
        self.range, self.rounding = (quant_min, quant_max), rounding

    def forward(self, x):
        return onnx_form.quantize_dequantize(x, self.scale, self.zero_point, *self.range, rounding=self.rounding)


def _to_onnx(module, x, f):
    with export_verify.quiet_tracing():
        torch.onnx.export(module, (x,), str(f), opset_version=export.DEFAULT_OPSET, dynamo=False)
    return onnx.load(str(f))


def test_qdq_module_ranges(tmp_path):
    """A narrow range becomes Clip + QuantizeLinear/DequantizeLinear and computes the fake-quant numbers; a range
    wider than 8 bits and rounding half up are refused in one line."""
    x = torch.linspace(-1, 8, 301).reshape(1, 1, 7, 43)
    proto = _to_onnx(_Quantizer(0.05, 3, 0, 127), x, tmp_path / "narrow.onnx")
    assert [n.op_type for n in proto.graph.node if n.op_type != "Constant"] == \
        ["Clip", "QuantizeLinear", "DequantizeLinear"]
    from utils.runtimes import onnxruntime_session

    out = onnxruntime_session(str(tmp_path / "narrow.onnx")).run(None, {proto.graph.input[0].name: x.numpy()})[0]
    ref = torch.fake_quantize_per_tensor_affine(x, 0.05, 3, 0, 127).numpy()
    assert np.array_equal(out, ref) and ref.max() == pytest.approx((127 - 3) * 0.05)
    with pytest.raises(ValueError, match=r"range \[-1000, 1000\] fits neither int8"):
        _to_onnx(_Quantizer(0.1, 0, -1000, 1000), x, tmp_path / "wide.onnx")
    with pytest.raises(ValueError, match="rounds ties half up; ONNX QuantizeLinear rounds half to even"):
        _to_onnx(_Quantizer(0.25, 0, 0, 255, "half_up"), x, tmp_path / "half_up.onnx")


def test_own_initializers_names_every_qdq_constant(tmp_path_factory):
    """Every scale and zero point a QDQ node reads is an initializer of its own, named after its module and role; a
    second pass changes nothing."""
    _, _, proto, _ = exported(tmp_path_factory)
    inits = {i.name for i in proto.graph.initializer}
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    roles = (".output_scale", ".output_zero_point", ".unit_scale", ".unit_zero_point", ".weight_scale",
             ".weight_zero_point", ".bias_scale")
    for n in qdq:
        assert all(i in inits and i.endswith(roles) for i in n.input[1:]), (n.name, list(n.input))
    assert "model.0.conv.output_scale" in inits and "input_quant.output_zero_point" in inits
    again = onnx.ModelProto()
    again.CopyFrom(proto)
    assert onnx_form.own_initializers(again) == 0 and again == proto


@pytest.mark.parametrize("args, message", [
    (["--include", "onnx", "--opset", "12"], "per-channel QuantizeLinear/DequantizeLinear (the axis attribute) needs "
                                             "opset >= 13"),
    (["--include", "onnx", "--half"], "--half would cast the quantizers' scales"),
])
def test_bad_input_one_line(args, message, tmp_path, capsys):
    pt = save_qat(small_qat(), tmp_path / "qat.pt")
    with pytest.raises(SystemExit) as e:
        run_cli(export.main, export.parse_opt(["--weights", str(pt), "--imgsz", "64", *args]))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ERROR:") and message in err[0], err
    assert not list(tmp_path.glob("*.onnx"))


# --- val.py on the QDQ file: the same mAP as the PyTorch QAT model ------------------------------------------------

@pytest.fixture(scope="module")
def pseudo_data(tmp_path_factory):
    """4 shapes val images labelled with the float reference model's confident detections (random weights: on the
    real labels it scores ~0, which could not tell a broken export from a good one). The labeller is the float model,
    not the QAT model under test, so neither side is favoured by labels equal to its own boxes."""
    from test_export import _pseudo_labelled_dataset

    return _pseudo_labelled_dataset(tmp_path_factory.mktemp("pseudo"), reference("yolov5n_relu.pt"), n=4, imgsz=160)


def test_val_qdq_onnx_gives_the_pt_map(pseudo_data, tmp_path, yolo_log):
    """pow2 without simulated BN folding: onnxruntime runs the file with PyTorch's exact numbers, so val.py gives the
    same mAP. (With simulated folding the fake-quant model divides by the BN factor and applies BN in eval while the
    file adds the folded bias: one-step flips on ~0.2% of the head outputs, which on this random-weight model and 4
    images move mAP@0.5:0.95 by up to ~0.015; test_onnxruntime_within_one_output_step shows that the file computes
    its folded form exactly.)"""
    import val

    pt = qat_from_reference(False, tmp_path / "qat.pt")
    (f,) = export.run(weights=pt, imgsz=(160, 160), include=["onnx"])
    # task="speed" gives the .pt model the square letterboxed inputs the fixed-shape ONNX file gets (see test_export)
    r_pt = val.run(data=str(pseudo_data), weights=str(pt), imgsz=160, batch_size=1, task="speed", conf_thres=0.05,
                   max_det=30, workers=0, plots=False, project=tmp_path / "val", name="pt")[0]
    yolo_log.clear()
    r_onnx = run_cli(val.main, val.parse_opt(["--weights", str(f), "--data", str(pseudo_data), "--img", "160",
                                              "--conf-thres", "0.05", "--max-det", "30", "--workers", "0",
                                              "--project", str(tmp_path / "val"), "--name", "onnx"]))[0]
    assert any("int8 QDQ, power-of-two scales" in m for m in yolo_log)
    assert r_pt[2] > 0.3 and r_pt[3] > 0.3, "the pseudo labels must give the QAT model a clear mAP"
    assert r_onnx[2] == pytest.approx(r_pt[2], abs=0.002) and r_onnx[3] == pytest.approx(r_pt[3], abs=0.002)
    assert r_onnx[:4] == r_pt[:4]  # P, R, mAP50, mAP50-95: identical, not merely close


def test_detect_qdq_onnx(tmp_path_factory, tmp_path, yolo_log):
    import detect

    _, f, _, _ = exported(tmp_path_factory)
    src = sorted((ROOT / "datasets/shapes/images/val").glob("*.jpg"))
    if not src:
        pytest.skip("shapes dataset not generated")
    run_cli(detect.main, detect.parse_opt(["--weights", str(f), "--source", str(src[0]), "--imgsz", str(H), str(W),
                                           "--conf-thres", "0.0", "--save-txt", "--nosave", "--project",
                                           str(tmp_path), "--name", "exp"]))
    assert any("int8 QDQ" in m and "ONNX Runtime" in m for m in yolo_log)
    labels = np.loadtxt(tmp_path / "exp" / "labels" / f"{src[0].stem}.txt", ndmin=2)
    assert len(labels) > 0 and ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()


def test_benchmark_qat_row_reports_int8_kernels(tmp_path):
    """benchmarks/export_speed.py builds a pow2 QAT model, exports it with export.py and reads onnxruntime's optimized
    graph: with its defaults onnxruntime fuses QDQ convs into QLinearConv; run as written it runs no int8 kernel (its
    main(), which also runs OpenVINO, is tested in tests/workflow/openvino_cases.py)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("export_speed", ROOT / "benchmarks" / "export_speed.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    pt = bench.qat_checkpoint(reference("yolov5n_relu.pt"), tmp_path / "qat.pt", size=64, n_batches=1)
    assert isinstance(pt, Path) and pt.is_file()
    (f,) = export.run(weights=pt, imgsz=(64, 64), include=["onnx"])
    default = bench.kernels_run(f)
    written = bench.kernels_run(f, as_written=True)
    assert default["int8_ran"] and default["int8"].get("QLinearConv", 0) >= 3  # at least the Detect convs
    assert not written["int8_ran"] and written["float_convs"] == 60 and written["qdq_left"] >= 141
