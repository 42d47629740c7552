"""The ONNX form of the converted modules (bst.torch.ao.nn.quantized.onnx_form): torch.onnx.export of a converted model
writes QuantizeLinear/DequantizeLinear with int8 weight and int32 bias initializers, onnxruntime (no graph rewrites)
reproduces a power-of-two model bit for bit, and torch.jit.trace of a converted model computes its numbers too."""
import numpy as np
import pytest
import torch
import torch.nn as nn
from test_workflow import _trained

import bst.torch.ao.nn.quantized as nnq
import bst.torch.ao.quantization as bq
from bst.torch.ao.nn.quantized import FloatFunctional, onnx_form

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


def _export(model, x, path):
    torch.onnx.export(model, (x,), str(path), opset_version=17, do_constant_folding=True, dynamo=False,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    proto = onnx.load(str(path))
    onnx_form.own_initializers(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    return proto


def _run(path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # the graph as written
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def test_converted_model_exports_to_qdq_and_onnxruntime_reproduces_it(tmp_path):
    model = _trained()
    x = torch.randn(2, 3, 8, 8) * 1.5
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    proto = _export(qmodel, x, tmp_path / "net.onnx")
    ops = [n.op_type for n in proto.graph.node]
    counts = onnx_form.qdq_counts(qmodel, (x,))
    # input, 4 convs, add, cat, mul: one QDQ pair each; 4 int8 weights and 4 int32 biases: one DequantizeLinear each
    assert counts == {"quantize": 8, "dequantize": 16, "weights": 4, "biases": 4, "lookups": 0}
    assert ops.count("QuantizeLinear") == 8 and ops.count("DequantizeLinear") == 16 and ops.count("Conv") == 4
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    convs = [(name, m) for name, m in qmodel.named_modules() if isinstance(m, nnq.Conv2d)]
    assert len(convs) == 4
    for name, layer in convs:  # initializers named after the module
        assert np.array_equal(inits[f"{name}.weight_int8"], layer.weight_int8.numpy())
        assert np.array_equal(inits[f"{name}.bias_int32"], layer.bias_int32.numpy())
        assert inits[f"{name}.weight_zero_point"].dtype == np.int8
        assert np.array_equal(inits[f"{name}.bias_scale"], (layer.weight_scale * layer.input_scale).numpy())
    assert all(bool(bq.is_pow2(torch.from_numpy(np.array(v, ndmin=1))).all()) for k, v in inits.items()
               if k.endswith("_scale"))
    assert inits["quant.output_zero_point"].dtype == np.uint8 and inits["quant.output_scale"].shape == ()
    for batch in (x, torch.randn(5, 3, 8, 8)):  # a dynamic batch
        with torch.no_grad():
            assert np.array_equal(_run(tmp_path / "net.onnx", batch), qmodel(batch).numpy())


@pytest.mark.parametrize("relu", [False, True])
def test_per_channel_output_is_a_unit_qdq_pair_and_a_mul(relu, tmp_path):
    """A conv (+ReLU, which commutes with positive scales) with one output scale per channel: its weight and bias
    scales divided by them, a QDQ pair of scale 1, then the per-channel scales (activations stay per tensor); exact
    for power-of-two scales."""
    torch.manual_seed(1)
    layers = [nn.Conv2d(3, 6, 3, padding=1)] + ([nn.ReLU()] if relu else [])
    model = nn.Sequential(bq.QuantStub(), *layers, bq.DeQuantStub()).train()
    if relu:
        bq.fuse_modules_qat(model, [["1", "2"]], inplace=True)
    per_channel = bq.MovingAveragePerChannelMinMaxObserver.with_args(ch_axis=1)
    model.qconfig = bq.get_default_qat_qconfig(pow2=True, activation_observer=per_channel,
                                               activation_dtype=torch.qint8,
                                               activation_qscheme=torch.per_channel_symmetric)
    model[0].qconfig = bq.get_default_qat_qconfig(pow2=True)
    bq.prepare_qat(model, inplace=True)
    x = torch.randn(2, 3, 6, 6)
    model(x)
    model.apply(bq.disable_observer)
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    assert qmodel[1].output_axis == 1 and qmodel[1].output_scale.numel() == 6
    proto = _export(qmodel, x, tmp_path / "pc.onnx")
    assert [n.op_type for n in proto.graph.node] == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear",
                                                     "DequantizeLinear", "Conv"] + (["Relu"] if relu else []) + \
        ["QuantizeLinear", "DequantizeLinear", "Mul"]
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    assert float(inits["1.unit_scale"]) == 1.0 and inits["1.unit_zero_point"].dtype == np.int8
    assert np.array_equal(inits["1.output_scale"].ravel(), qmodel[1].output_scale.numpy())
    assert np.array_equal(inits["1.weight_scale"], (qmodel[1].weight_scale / qmodel[1].output_scale).numpy())
    with torch.no_grad():
        assert np.array_equal(_run(tmp_path / "pc.onnx", x), qmodel(x).numpy())


def test_traced_converted_model_computes_its_numbers():
    """torch.jit.trace (TorchScript) cannot save bst's vectorized fake-quant function; while tracing the core
    kernels, which compute the same numbers, are used."""
    model = _trained()
    x = torch.randn(2, 3, 8, 8)
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    ts = torch.jit.trace(qmodel, (x,), check_trace=False)
    with torch.no_grad():
        y = qmodel(x)
    assert torch.equal(ts(x), y)
    assert not any(n.kind() == "prim::PythonOp" for n in ts.inlined_graph.nodes())


def test_what_has_no_onnx_form_is_refused(tmp_path):
    model = _trained(rounding="half_up")
    x = torch.randn(1, 3, 8, 8)
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    with pytest.raises(ValueError, match="rounds ties half up; ONNX QuantizeLinear rounds half to even"):
        _export(qmodel, x, tmp_path / "half_up.onnx")
    assert onnx_form.int_type(0, 255) == torch.uint8 and onnx_form.int_type(-127, 127) == torch.int8
    with pytest.raises(ValueError, match="fits neither int8"):
        onnx_form.int_type(0, 1023)


def test_leftover_fake_quantizer_becomes_a_frozen_quantize():
    """A fake quantizer convert does not fold into a converted module (here: on a float activation, attached by a
    hook) becomes a Quantize with its frozen qparams; with fake quantization off, the identity."""

    class Act(nn.Module):
        def __init__(self):
            super().__init__()
            self.act = nn.SiLU()

        def forward(self, x):
            return self.act(x)

    model = nn.Sequential(bq.QuantStub(), nn.Conv2d(3, 4, 1), Act(), bq.DeQuantStub()).train()
    model.qconfig = bq.get_default_qat_qconfig(pow2=True)
    model[2].activation_post_process = bq.get_default_qat_qconfig(pow2=True).activation()
    model[2].register_forward_hook(bq.output_quantizer_hook)
    bq.prepare_qat(model, inplace=True)
    x = torch.randn(2, 3, 4, 4)
    model(x)
    model.apply(bq.disable_observer)
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    assert type(qmodel[2].activation_post_process).__name__ == "Quantize"
    with torch.no_grad():
        assert torch.equal(qmodel(x), model(x))
    model[2].activation_post_process.disable_fake_quant()
    assert bq.convert(model, example_inputs=(x,))[2].activation_post_process.output_scale is None
    assert bq.frozen_qparams(model[2].activation_post_process) is None


class _Add(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant, self.quant_half, self.dequant = bq.QuantStub(), bq.QuantStub(), bq.DeQuantStub()
        self.add = FloatFunctional()

    def forward(self, x):
        return self.dequant(self.add.add(self.quant(x), self.quant_half(x * 0.5)))


def _fixed(scale, zero_point):
    observer = bq.FixedQParamsObserver.with_args(scale=scale, zero_point=zero_point, dtype=torch.quint8, quant_min=0,
                                                 quant_max=255, pow2=True)
    return bq.QConfig(activation=bq.FixedQParamsFakeQuantize.with_args(observer=observer), weight=None)


@pytest.mark.parametrize("zero_point, op", [(37, "Sum"), (38, "Add")])
def test_add_with_an_odd_output_zero_point_is_a_sum(zero_point, op, tmp_path):
    """onnxruntime's int8 QLinearAdd adds the output zero point before rounding half to even; with an odd zero point
    a sum halfway between two steps then lands on the other neighbour. Such an add is written as an ONNX Sum, which
    onnxruntime leaves in float: its int8 kernels then give the graph's numbers exactly, as with an even one."""
    model = _Add()
    model.quant.qconfig, model.quant_half.qconfig = _fixed(2.0 ** -7, 128), _fixed(2.0 ** -8, 128)
    model.add.qconfig = _fixed(2.0 ** -5, zero_point)
    bq.prepare_qat(model.train(), inplace=True)
    x = torch.linspace(-0.9, 0.9, 2 * 3 * 8 * 8).reshape(2, 3, 8, 8)
    model.apply(bq.disable_observer)
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    proto = _export(qmodel, x, tmp_path / "add.onnx")
    assert [n.op_type for n in proto.graph.node].count(op) == 1
    with torch.no_grad():
        ref = qmodel(x).numpy()
    kernels = ort.InferenceSession(str(tmp_path / "add.onnx"), providers=["CPUExecutionProvider"])
    assert np.array_equal(_run(tmp_path / "add.onnx", x), ref)
    assert np.array_equal(kernels.run(None, {"x": x.numpy()})[0], ref)
    # the same graph with an Add in place of the Sum: onnxruntime's QLinearAdd rounds some ties the other way
    if op == "Sum":
        for n in proto.graph.node:
            n.op_type = "Add" if n.op_type == "Sum" else n.op_type
        fused = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        assert (fused.run(None, {"x": x.numpy()})[0] != ref).sum() > 0
