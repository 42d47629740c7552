"""QAT modules: parity of fused Conv+BN(+ReLU) with simulated folding against torch.ao (BN live and
frozen), whole prepared models (fuse_modules_qat + prepare_qat) against torch.ao, and module behaviour."""

import pytest
import torch
import torch.nn as nn

import bst.torch.ao.nn.intrinsic.qat as nniqat
import bst.torch.ao.nn.qat as nnqat
import bst.torch.ao.quantization as bq
from bst.torch.ao.nn.quantized import FloatFunctional


def _qconfigs(lib, per_channel, act_dtype):
    weight_observer = lib.MovingAveragePerChannelMinMaxObserver if per_channel else lib.MovingAverageMinMaxObserver
    weight = lib.FakeQuantize.with_args(
        observer=weight_observer, averaging_constant=0.5, dtype=torch.qint8, quant_min=-128, quant_max=127,
        qscheme=torch.per_channel_symmetric if per_channel else torch.per_tensor_symmetric)
    activation = lib.FakeQuantize.with_args(observer=lib.MovingAverageMinMaxObserver, averaging_constant=0.5,
                                            dtype=act_dtype, qscheme=torch.per_tensor_affine)
    return lib.QConfig(activation=activation, weight=weight)


class Block(nn.Module):
    """Stub -> Conv+BN+ReLU -> Conv+BN -> skip-add -> cat -> Conv+ReLU; built identically for both libraries."""

    def __init__(self, functional, stub):
        super().__init__()
        self.quant = stub()
        self.c1 = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(6, 6, 3, padding=1, bias=True), nn.BatchNorm2d(6))
        self.c3 = nn.Sequential(nn.Conv2d(12, 4, 1), nn.ReLU())
        self.add = functional()
        self.cat = functional()

    def forward(self, x):
        x = self.quant(x)
        a = self.c1(x)
        b = self.add.add(a, self.c2(a))
        return self.c3(self.cat.cat([a, b], 1))


FUSE = [["c1.0", "c1.1", "c1.2"], ["c2.0", "c2.1"], ["c3.0", "c3.1"]]


def _close(a, b, frozen, rtol=0.0):
    """Equal to torch.ao's tensor within atol 1e-6 (and rtol); with frozen BN statistics, within 1e-5 of the
    tensor's largest magnitude: ours then trains the folded conv, torch.ao divides the conv output by the BN factor
    and multiplies it back in BN, the same function rounded differently (cancelling sums amplify the last bits)."""
    if frozen:
        return (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-6
    return torch.allclose(a, b, rtol=rtol, atol=1e-6)


def _train_both(ours, theirs, steps=3, freeze_after=None):
    opt_a = torch.optim.SGD(ours.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(theirs.parameters(), lr=0.05)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        if step == freeze_after:
            ours.apply(nniqat.freeze_bn_stats)
            from torch.ao.nn.intrinsic.qat import freeze_bn_stats as torch_freeze_bn_stats

            theirs.apply(torch_freeze_bn_stats)
        frozen = freeze_after is not None and step >= freeze_after
        x = torch.randn(2, 3, 8, 8, generator=g) * 2
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert _close(ya, yb, frozen), (ya - yb).abs().max()
        grad = torch.randn(ya.shape, generator=g)
        ya.backward(grad)
        yb.backward(grad)
        assert _close(xa.grad, xb.grad, frozen)
        pa, pb = dict(ours.named_parameters()), dict(theirs.named_parameters())
        assert pa.keys() == pb.keys()
        for name in pa:
            assert _close(pa[name].grad, pb[name].grad, frozen, rtol=1e-5), name
        for opt in (opt_a, opt_b):
            opt.step()
            opt.zero_grad()
    sa, sb = ours.state_dict(), theirs.state_dict()
    for key in sb:
        if key.endswith(("running_mean", "running_var", "scale", "zero_point")):
            assert torch.allclose(sa[key].float(), sb[key].float(), rtol=1e-5, atol=1e-6), key


@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("act_dtype", [torch.quint8, torch.qint8])
@pytest.mark.parametrize("freeze_after", [None, 1])
def test_prepared_block_matches_torch_ao(tq, per_channel, act_dtype, freeze_after):
    from torch.ao.nn.quantized import FloatFunctional as TorchFloatFunctional

    torch.manual_seed(0)
    ours = Block(FloatFunctional, bq.QuantStub).train()
    torch.manual_seed(0)
    theirs = Block(TorchFloatFunctional, tq.QuantStub).train()
    ours = bq.fuse_modules_qat(ours, FUSE)
    theirs = tq.fuse_modules_qat(theirs, FUSE)
    ours.qconfig = _qconfigs(bq, per_channel, act_dtype)
    theirs.qconfig = _qconfigs(tq, per_channel, act_dtype)
    ours = bq.prepare_qat(ours)
    theirs = tq.prepare_qat(theirs)
    assert type(ours.c1[0]).__name__ == type(theirs.c1[0]).__name__ == "ConvBnReLU2d"
    assert type(ours.c2[0]).__name__ == type(theirs.c2[0]).__name__ == "ConvBn2d"
    assert type(ours.c3[0]).__name__ == type(theirs.c3[0]).__name__ == "ConvReLU2d"
    _train_both(ours, theirs, steps=3, freeze_after=freeze_after)


def _single(per_channel=True, freeze=False, cls="ConvBnReLU2d"):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU()).train()
    m = bq.fuse_modules_qat(m, [["0", "1", "2"]])
    m.qconfig = bq.get_default_qat_qconfig(per_channel=per_channel)
    m = bq.prepare_qat(m)
    assert type(m[0]) is getattr(nniqat, cls)
    return m


def test_freeze_and_update_bn_stats():
    m = _single()
    x = torch.randn(4, 3, 6, 6)
    m(x)
    m.apply(nniqat.freeze_bn_stats)
    m.train()  # must not unfreeze
    stats = m[0].bn.running_mean.clone()
    m(x * 3 + 1)
    assert torch.equal(m[0].bn.running_mean, stats) and not m[0].bn.training
    m.apply(nniqat.update_bn_stats)
    m(x * 3 + 1)
    assert not torch.equal(m[0].bn.running_mean, stats)


def test_frozen_bn_trains_the_deployed_conv():
    """With frozen statistics a training step computes, bit for bit, what eval mode (the exported conv) computes, and
    its gradients are the live form's (divide by the BN factor, BN on running statistics) up to rounding."""
    m = _single()
    x = torch.randn(4, 3, 6, 6) * 2 + 1
    for _ in range(2):
        m(x)  # observers and BN statistics move
    m.apply(nniqat.freeze_bn_stats)
    m.apply(bq.disable_observer)
    m.train()
    conv = m[0]
    y_train = conv._conv_bn(x)  # before the activation and the output quantizer, whose rounding hides last bits
    y_train.sum().backward()
    m.eval()
    with torch.no_grad():
        assert torch.equal(conv._conv_bn(x), y_train)
    m.train()
    folded = {n: p.grad.clone() for n, p in conv.named_parameters()}
    conv.zero_grad()
    conv.freeze_bn = False  # the live form on the same (eval-mode, running-statistics) BN
    assert not conv.bn.training
    y_live = conv._conv_bn(x)
    assert (y_live - y_train).abs().max() <= 1e-5 * y_train.abs().max()
    y_live.sum().backward()
    for n, p in conv.named_parameters():
        assert (p.grad - folded[n]).abs().max() <= 1e-5 * folded[n].abs().max() + 1e-6, n
    assert folded["bn.weight"].abs().sum() > 0 and folded["bn.bias"].abs().sum() > 0


def test_to_float_folds_bn_exactly_enough():
    m = _single()
    for _ in range(3):
        m(torch.randn(4, 3, 6, 6) * 2 + 1)
    m.apply(bq.disable_fake_quant)
    m.eval()
    x = torch.randn(2, 3, 6, 6)
    floated = m[0].to_float()
    assert type(floated).__name__ == "ConvReLU2d" and floated[0].bias is not None
    assert torch.allclose(floated(x), m(x), atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_bn_folding_is_one_computation(bias):
    """fuse_modules and ConvBn2d.folded_weight_bias fold BN bit-identically; the YOLO fuse_conv_and_bn gives the
    same weight and rounds the bias in upstream's order (factor x bias + beta - gamma x mean / std), which differs
    from the QAT order in the last bit at most."""
    import copy

    from utils.torch_utils import fuse_conv_and_bn

    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, bias=bias), nn.BatchNorm2d(6, eps=1e-3)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.05, 3.0)
    float_model = nn.Sequential(conv, bn).eval()
    folded = bq.fuse_modules(float_model, [["0", "1"]])[0]
    qat = bq.fuse_modules_qat(copy.deepcopy(float_model).train(), [["0", "1"]])
    qat.qconfig = bq.get_default_qat_qconfig()
    qat = bq.prepare_qat(qat)[0]
    assert type(qat) is nniqat.ConvBn2d
    qat_w, qat_b = qat.folded_weight_bias()
    yolo = fuse_conv_and_bn(conv, bn)
    assert torch.equal(folded.weight, qat_w) and torch.equal(folded.bias, qat_b)
    assert torch.equal(folded.weight, yolo.weight)
    with torch.no_grad():
        std = torch.sqrt(bn.running_var + bn.eps)
        factor = bn.weight / std
        upstream_bias = bn.bias - bn.weight * bn.running_mean / std
        if bias:
            upstream_bias = factor * conv.bias + upstream_bias
        qat_order = bn.bias + ((conv.bias if bias else torch.zeros(6)) - bn.running_mean) * factor
    assert torch.equal(qat_b, qat_order)  # what trained QAT checkpoints were rounded with: must never change
    assert torch.equal(yolo.bias, upstream_bias)
    torch.testing.assert_close(yolo.bias, folded.bias, rtol=2e-7, atol=1e-7)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(folded(x), bn(conv(x)), atol=1e-5, rtol=0)


def test_qat_conv_fake_quantizes_weight_and_output():
    conv = nn.Conv2d(3, 4, 3)
    conv.qconfig = bq.get_default_qat_qconfig(pow2=True)
    qat = nnqat.Conv2d.from_float(conv)
    assert qat.weight is conv.weight and isinstance(qat.weight_fake_quant, bq.FakeQuantize)
    x = torch.randn(2, 3, 5, 5)
    y = qat(x)
    w_fq = qat.weight_fake_quant(qat.weight)
    assert torch.allclose(y, nn.functional.conv2d(x, w_fq, qat.bias), atol=1e-6)
    assert bool(bq.is_pow2(qat.weight_fake_quant.scale).all())
    with pytest.raises(ValueError, match="qconfig"):
        nnqat.Conv2d(3, 4, 3)


def test_float_functional_ops_quantize_their_output():
    ff = FloatFunctional()
    with pytest.raises(RuntimeError, match="add"):
        ff(torch.ones(1))
    assert torch.equal(ff.add(torch.ones(2), torch.ones(2)), torch.full((2,), 2.0))  # float until prepared
    holder = nn.Module()
    holder.ff = ff
    holder.qconfig = bq.get_default_qat_qconfig(pow2=True)
    holder.train()
    bq.prepare_qat(holder, inplace=True)
    fq = holder.ff.activation_post_process
    assert isinstance(fq, bq.FakeQuantize)
    a, b = torch.randn(50), torch.randn(50)
    out = holder.ff.add_relu(a, b)
    fq.disable_observer()
    expected = torch.fake_quantize_per_tensor_affine(torch.relu(a + b), fq.scale, fq.zero_point, 0, 255)
    assert torch.equal(out, expected)
    for op, ref in ((lambda: holder.ff.mul(a, b), a * b), (lambda: holder.ff.cat([a, b], 0), torch.cat([a, b]))):
        assert torch.equal(op(), torch.fake_quantize_per_tensor_affine(ref, fq.scale, fq.zero_point, 0, 255))


def test_relu6_variants_clamp_at_six():
    m = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.ReLU6(), nn.Conv2d(3, 3, 1), nn.ReLU6()).train()
    m = bq.fuse_modules_qat(m, [["0", "1", "2"], ["3", "4"]])
    m.qconfig = bq.get_default_qat_qconfig()
    m = bq.prepare_qat(m)
    assert type(m[0]) is nniqat.ConvBnReLU62d and type(m[3]) is nniqat.ConvReLU62d
    y = m(torch.randn(4, 2, 5, 5) * 50)
    assert float(y.min()) >= 0 and float(y.max()) <= 6.0 + float(m[3].activation_post_process.scale)
