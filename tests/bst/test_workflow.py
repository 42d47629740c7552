"""The eager QAT workflow: qconfig propagation, fusion, prepare_qat, convert, the integer-only
reference, EMA helpers, whole-model dtype casts and independence from torch.ao.quantization."""
import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import bst.torch.ao.nn.quantized as nnq
import bst.torch.ao.quantization as bq
from bst.torch.ao.nn.quantized import FloatFunctional

ROOT = Path(__file__).resolve().parents[2]


class Net(nn.Module):
    """A conv / skip-add / max-pool / concat / upsample / mul chain between a QuantStub and a DeQuantStub."""

    def __init__(self):
        super().__init__()
        self.quant = bq.QuantStub()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.down = nn.Sequential(nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU6())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.c3 = nn.Sequential(nn.Conv2d(24, 4, 1), nn.ReLU())
        self.pool = nn.MaxPool2d(3, 1, 1)
        self.add, self.cat, self.mul = FloatFunctional(), FloatFunctional(), FloatFunctional()
        self.dequant = bq.DeQuantStub()

    def forward(self, x):
        x = self.quant(x)
        a = self.c1(x)
        s = self.add.add_relu(a, self.c2(a))
        d = self.up(self.down(self.pool(s)))
        y = self.c3(self.cat.cat([a, s, d], 1))
        return self.dequant(self.mul.mul(y, y))


FUSE = [["c1.0", "c1.1", "c1.2"], ["c2.0", "c2.1"], ["down.0", "down.1", "down.2"], ["c3.0", "c3.1"]]


def _trained(pow2=True, steps=4, **qconfig_kwargs):
    torch.manual_seed(0)
    model = bq.fuse_modules_qat(Net().train(), FUSE)
    model.qconfig = bq.get_default_qat_qconfig(pow2=pow2, **qconfig_kwargs)
    model = bq.prepare_qat(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9)
    for _ in range(steps):
        loss = model(torch.randn(4, 3, 8, 8)).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.apply(bq.disable_observer)
    return model


@pytest.mark.parametrize("qconfig_kwargs", [{}, {"per_channel": False, "pow2_rounding": "round"},
                                            {"learnable": True}])
def test_converted_model_matches_integer_reference_exactly(qconfig_kwargs):
    model = _trained(**qconfig_kwargs)
    x = torch.randn(3, 3, 8, 8) * 1.5
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    y_float = qmodel(x)
    with bq.integer_mode(qmodel):
        q = qmodel.quant(x)
        assert isinstance(q, bq.QTensor) and q.int_repr.dtype == torch.int64
        y_int = qmodel(x)
    assert torch.equal(y_float, y_int)  # bit for bit: round half to even on both sides
    # and the converted model is the QAT model up to BN folding: at most one output step, rarely
    y_qat = model(x)
    step = float(qmodel.mul.output_scale)
    assert float((y_qat - y_float).abs().max()) <= step + 1e-6
    assert float((y_qat != y_float).float().mean()) < 0.05


def test_convert_produces_integer_layers():
    model = _trained()
    x = torch.randn(2, 3, 8, 8)
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    conv = qmodel.c2[0]
    assert isinstance(conv, nnq.Conv2d) and isinstance(qmodel.add, nnq.QFunctional)
    assert isinstance(qmodel.quant, nnq.Quantize) and isinstance(qmodel.dequant, nnq.DeQuantize)
    assert conv.weight_int8.dtype == torch.int8 and conv.bias_int32.dtype == torch.int32
    assert conv.weight_scale.shape == (8,) and bool((conv.weight_zero_point == 0).all())
    for name in ("weight_scale", "input_scale", "output_scale"):
        assert bool(bq.is_pow2(getattr(conv, name)).all()), name
    # the input of c2 is c1's output quantizer, the input of c3 the concat's
    assert torch.equal(conv.input_scale, model.c1[0].activation_post_process.scale)
    assert torch.equal(qmodel.c3[0].input_scale, model.cat.activation_post_process.scale)
    cat_inputs = [float(q[0]) for q in qmodel.cat.input_qparams]  # a, s (add output), d (upsampled conv)
    assert cat_inputs == [float(model.c1[0].activation_post_process.scale),
                          float(model.add.activation_post_process.scale),
                          float(model.down[0].activation_post_process.scale)]
    # downsampling conv sees the max-pooled skip-add output: the tag passes through MaxPool2d
    assert torch.equal(qmodel.down[0].input_scale, model.add.activation_post_process.scale)
    # int8 weights dequantize to exactly what the QAT forward used
    w, _ = model.c2[0].folded_weight_bias()
    assert torch.equal(conv.dequantized_weight(), model.c2[0].weight_fake_quant(w))
    assert not hasattr(qmodel.c1[0], "qconfig") and not hasattr(qmodel, "qconfig")


def test_convert_without_examples_keeps_float_bias_and_integer_mode_needs_pow2():
    model = _trained()
    qmodel = bq.convert(model.eval())
    assert qmodel.c1[0].input_scale is None and qmodel.c1[0].bias_int32 is None
    assert qmodel(torch.randn(1, 3, 8, 8)).shape == (1, 4, 8, 8)
    linear = bq.convert(_trained(pow2=False).eval(), example_inputs=(torch.randn(1, 3, 8, 8),))
    with pytest.raises(ValueError, match="power-of-two"):
        with bq.integer_mode(linear):
            linear(torch.randn(1, 3, 8, 8))


def test_propagate_qconfig_precedence():
    a = bq.get_default_qat_qconfig()
    b = bq.get_default_qat_qconfig(pow2=True)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv2d(1, 1, 1)), nn.Conv2d(1, 1, 1), nn.ReLU())
    model.qconfig = a
    model[0].qconfig = None  # float branch ...
    model[0][1].qconfig = b  # ... with one module opting back in
    bq.propagate_qconfig_(model, qconfig_dict={nn.ReLU: b, "1": b})
    assert model[0][0].qconfig is None and model[0][1].qconfig is b
    assert model[1].qconfig is b and model[2].qconfig is b
    with pytest.raises(ValueError, match="qconfig"):
        bq.propagate_qconfig_(nn.Sequential(nn.ReLU()), qconfig_dict={nn.ReLU: "nope"})
    prepared = bq.prepare_qat(model.train())
    assert type(prepared[0][0]) is nn.Conv2d and type(prepared[0][1]).__name__ == "Conv2d"
    assert prepared[0][1].weight_fake_quant.pow2 and prepared[1].weight_fake_quant.pow2
    assert not hasattr(prepared[2], "activation_post_process")  # ReLU alone is not quantized


def test_qconfig_and_prepare_errors():
    with pytest.raises(ValueError, match="activation"):
        bq.QConfig(activation=bq.FakeQuantize(), weight=None)
    with pytest.raises(ValueError, match="fused"):
        bq.get_default_qat_qconfig(pow2=True, fused=True)
    model = nn.Sequential(nn.Conv2d(1, 1, 1))
    model.qconfig = bq.get_default_qat_qconfig()
    with pytest.raises(ValueError, match="train"):
        bq.prepare_qat(model.eval())
    with pytest.raises(ValueError, match="qconfig"):
        bq.prepare_qat(nn.Sequential(nn.Conv2d(1, 1, 1)).train())


def test_fusion_errors_and_eval_fusion():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.SiLU(), nn.Conv2d(3, 3, 1), nn.ReLU())
    with pytest.raises(ValueError, match="Conv2d\\+BatchNorm2d\\+ReLU6"):  # lists the supported patterns
        bq.fuse_modules_qat(model.train(), [["0", "1", "2"]])
    with pytest.raises(ValueError, match="not a submodule"):
        bq.fuse_modules_qat(model.train(), ["0", "9"])
    with pytest.raises(ValueError, match="eval"):
        bq.fuse_modules(model.train(), [["0", "1"]])
    with pytest.raises(ValueError, match="train"):
        bq.fuse_modules_qat(model.eval(), [["0", "1"]])
    model.train()
    model(torch.randn(4, 2, 6, 6))  # non-trivial BN statistics
    model.eval()
    fused = bq.fuse_modules(model, [["0", "1"], ["3", "4"]])
    assert type(fused[0]) is nn.Conv2d and type(fused[1]) is nn.Identity
    x = torch.randn(2, 2, 6, 6)
    assert torch.allclose(fused(x), model(x), atol=1e-5)


def test_ema_helpers_copy_quantizer_state():
    model = _trained(steps=2)
    ema = copy.deepcopy(model)
    keys = bq.quantizer_state_keys(model)
    assert "c1.0.activation_post_process.scale" in keys and "c1.0.weight_fake_quant.scale" in keys
    assert "c1.0.activation_post_process.activation_post_process.min_val" in keys
    assert "c1.0.weight" not in keys and "c1.0.bn.running_mean" not in keys
    model.apply(bq.enable_observer)
    model(torch.randn(4, 3, 8, 8) * 5)
    averaged = {k: (v + ema.state_dict()[k]) / 2 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="power of two"):
        copy.deepcopy(ema).load_state_dict(averaged)  # what a naive EMA would do
    bq.copy_quantizer_state_(ema, model)
    assert all(torch.equal(ema.state_dict()[k], model.state_dict()[k]) for k in keys)


def test_half_model_keeps_quantizer_state_float32():
    model = _trained(steps=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.half()
    state = model.state_dict()
    for key in bq.quantizer_state_keys(model):
        if before[key].is_floating_point():
            assert state[key].dtype == torch.float32 and torch.equal(state[key], before[key]), key
    assert state["c1.0.weight"].dtype == torch.float16
    model.float()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in bq.quantizer_state_keys(model))


def test_library_does_not_use_torch_ao_quantization():
    """import torch itself loads torch.ao.quantization, so the check removes it and poisons the name
    before importing bst, then runs the whole workflow."""
    code = """
import sys, torch, torch.ao
for name in [n for n in sys.modules if n.startswith(("torch.ao.quantization", "torch.quantization"))]:
    sys.modules[name] = None
for owner, attr in ((torch.ao, "quantization"), (torch, "quantization")):
    if hasattr(owner, attr):
        delattr(owner, attr)
import torch.nn as nn
import bst.torch.ao.quantization as bq
import bst.torch.ao.nn.intrinsic.qat, bst.torch.ao.nn.qat, bst.torch.ao.nn.quantized
m = bq.fuse_modules_qat(nn.Sequential(bq.QuantStub(), nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train(),
                        [["1", "2", "3"]])
m.qconfig = bq.get_default_qat_qconfig(pow2=True)
m = bq.prepare_qat(m)
m(torch.randn(2, 3, 6, 6)).sum().backward()
q = bq.convert(m.eval(), example_inputs=(torch.randn(1, 3, 6, 6),))
with bq.integer_mode(q):
    q(torch.randn(1, 3, 6, 6))
print("ok", [n for n, v in sys.modules.items() if n.startswith("torch.ao.quantization") and v is not None])
"""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok []"
    import ast
    for path in (ROOT / "bst").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n.startswith(("torch.ao", "torch.quantization")) for n in names), (path, names)


def test_prepared_model_pickles_whole_and_standalone_functional_gets_quantizer(tmp_path):
    model = _trained(steps=1)
    torch.save(model, tmp_path / "m.pt")  # upstream checkpoints pickle whole modules, qconfigs included
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert repr(loaded.c1[0].qconfig.activation).startswith("FakeQuantize.with_args(")
    holder = nn.Module()  # no qconfig on the parent: the FloatFunctional's own one is enough
    holder.ff = FloatFunctional()
    holder.ff.qconfig = bq.get_default_qat_qconfig(pow2=True)
    bq.prepare_qat(holder.train(), inplace=True)
    assert isinstance(holder.ff.activation_post_process, bq.FakeQuantize)
