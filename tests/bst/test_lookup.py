"""Elementwise activations between two per-tensor quantizers as lookup tables: the QAT module computes through the
table once frozen, `convert` makes it a converted TableActivation, and the integer reference, the integer model's
numpy runner and onnxruntime (QuantizeLinear -> Cast -> Gather -> DequantizeLinear) compute the same integers."""
import numpy as np
import pytest
import torch
import torch.nn as nn

import bst.torch.ao.nn.qat as nnqat
import bst.torch.ao.nn.quantized as nnq
import bst.torch.ao.quantization as bq
import bst.torch.ao.quantization.integer_reference as iref
from bst.torch.ao.nn.quantized import onnx_form
from bst.torch.ao.quantization.integer_graph import record
from bst.torch.ao.quantization.integer_runner import IntegerModel

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")


class Net(nn.Module):
    """QuantStub -> conv -> act -> conv -> act -> conv -> DeQuantStub."""

    def __init__(self, act):
        super().__init__()
        self.quant, self.dequant = bq.QuantStub(), bq.DeQuantStub()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.a1, self.a2 = act(), act()

    def forward(self, x):
        return self.dequant(self.c3(self.a2(self.c2(self.a1(self.c1(self.quant(x)))))))


def _prepared(act=nn.SiLU, signed=False, seed=0):
    """Net with pow2 quantizers everywhere, `act` as TableActivation, calibrated on noise and frozen. signed: the
    convs' outputs (the tables' inputs) are int8 [-128, 127] with zero point 0, else uint8 with a zero point."""
    torch.manual_seed(seed)
    model = Net(act).train()
    model.qconfig = bq.get_default_qat_qconfig(pow2=True)
    if signed:
        qc = bq.get_default_qat_qconfig(pow2=True, activation_dtype=torch.qint8,
                                        activation_qscheme=torch.per_tensor_symmetric)
        for c in (model.c1, model.c2):
            c.qconfig = qc
    mapping = {**bq.get_default_qat_module_mappings(), act: nnqat.TableActivation}
    bq.prepare_qat(model, mapping=mapping, inplace=True)
    model.apply(bq.disable_fake_quant)
    for _ in range(3):
        model(torch.randn(4, 3, 12, 12) * 2)
    model.apply(bq.enable_fake_quant)
    x = torch.randn(1, 3, 12, 12)
    return bq.freeze_qparams(model.eval(), (x,)), x


def _integer_run(qmodel, x):
    """The converted Net on integers up to its last conv (QTensor output)."""
    with bq.integer_mode(qmodel):
        return [qmodel.c3(qmodel.a2(qmodel.c2(qmodel.a1(qmodel.c1(qmodel.quant(x))))))]


@pytest.mark.parametrize("act, signed", [(nn.SiLU, False), (nn.SiLU, True), (nn.Hardswish, False)])
def test_table_equals_the_function_on_every_input_integer(act, signed):
    model, _ = _prepared(act, signed)
    tables = [m for m in model.modules() if isinstance(m, nnqat.TableActivation)]
    assert len(tables) == 2
    for m in tables:
        scale, zp, lo, hi = m.input_qparams
        assert (lo, hi) == ((-128, 127) if signed else (0, 255)) and (int(zp) == 0) == signed
        codes = torch.arange(lo, hi + 1)
        x = ((codes - zp).float() * scale).reshape(1, 1, -1, 1).repeat(2, 3, 1, 5)  # every input integer, 30 times
        out = m.activation_post_process
        with torch.no_grad():
            fake = out(m.act(x))  # the float function, then the output quantizer
            table = m(x)  # eval, frozen: through the table
        assert torch.equal(table, fake)
        levels = torch.unique(table)
        assert len(levels) > 20  # a real function of the input, not a constant
        converted = m.lookup_module()
        assert converted.table.shape == (256,) and converted.table.dtype == torch.int32
        expect = torch.round(fake[0, 0, :, 0] / out.scale) + out.zero_point
        assert torch.equal(converted.table, expect.to(torch.int32))
    model.train()
    y = tables[0](torch.linspace(-3, 3, 7, requires_grad=True))
    assert y.grad_fn is not None  # training: the float function, differentiable


@pytest.mark.parametrize("signed", [False, True])
def test_converted_integer_runner_and_onnxruntime_agree(signed, tmp_path):
    model, x = _prepared(signed=signed, seed=1)
    qmodel = bq.convert(model, example_inputs=(x,))
    luts = [m for m in qmodel.modules() if isinstance(m, nnq.TableActivation)]
    assert len(luts) == 2 and not any(isinstance(m, nnqat.TableActivation) for m in qmodel.modules())
    assert onnx_form.qdq_counts(qmodel, (x,))["lookups"] == 2
    path = tmp_path / "lut.onnx"
    torch.onnx.export(qmodel, (x,), str(path), opset_version=17, dynamo=False, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "b", 2: "h", 3: "w"}})
    proto = onnx.load(str(path))
    onnx_form.own_initializers(proto)
    onnx.checker.check_model(proto, full_check=True)
    onnx.save(proto, str(path))
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("Gather") == 2 and ops.count("Cast") == 2 and "Sigmoid" not in ops and "HardSwish" not in ops
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    table = inits["a1.table"]
    assert table.shape == (256,) and table.dtype == np.uint8
    codes = np.arange(-128, 128) if signed else np.arange(256)
    by_code = dict(zip(codes.tolist(), luts[0].table.numpy().tolist()))
    assert [by_code[c] for c in (np.r_[0:128, -128:0] if signed else codes)] == table.tolist()
    assert inits["a1.input_zero_point"].dtype == (np.int8 if signed else np.uint8)

    so = ort.SessionOptions()
    written = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"],
                                   disabled_optimizers=["QDQSelectorActionTransformer", "WeightBiasQuantization"])
    kernels = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(2)
    for shape in [(1, 3, 12, 12), (3, 3, 20, 16)]:
        xi = torch.randn(shape, generator=g) * 2
        with torch.no_grad():
            ref = model(xi)
            assert torch.equal(qmodel(xi), ref)  # converted float forward == frozen QAT eval
        graph, (q,) = record(lambda: _integer_run(qmodel, xi))
        assert torch.equal(q.dequantize(), ref)  # bst's integer reference
        graph.save(tmp_path / "int", xi, [q])
        ran = IntegerModel(tmp_path / "int").run(xi.numpy())[graph.outputs[0]]
        assert np.array_equal(ran, q.int_repr.numpy())  # the numpy runner
        assert [n["op"] for n in graph.nodes].count("lookup") == 2 and graph.to_dict()["version"] == 2
        for session in (written, kernels):
            assert np.array_equal(session.run(None, {"x": xi.numpy()})[0], ref.numpy())


def test_integer_reference_refuses_a_foreign_input_grid():
    model, x = _prepared(seed=2)
    qmodel = bq.convert(model, example_inputs=(x,))
    q = iref.quantize(x, 2.0 ** -3, 0, 0, 255)
    with pytest.raises(ValueError, match="lookup table: made for input scale"):
        qmodel.a1(q)
    with pytest.raises(ValueError, match="must be elementwise"):
        nnq.TableActivation.from_function(lambda t: t.sum(), (torch.tensor(0.5), torch.tensor(0), 0, 3),
                                          (torch.tensor(0.5), torch.tensor(0), 0, 3))
