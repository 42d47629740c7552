"""Fake quantizers: torch parity, enable flags, state_dict resizing, survival of power-of-two state
(state_dict, .half(), deepcopy, pickle), learnable scales (LSQ) and lazy calibrators."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn

from bst.torch.ao.quantization import (
    FakeQuantize,
    FixedQParamsFakeQuantize,
    FixedQParamsObserver,
    FusedMovingAvgObsFakeQuantize,
    LearnableFakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    MSEObserver,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    is_pow2,
    is_quantizer_state,
    quantizer_parameters,
)

PER_TENSOR = [
    dict(dtype=torch.quint8, qscheme=torch.per_tensor_affine),
    dict(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, quant_min=-128, quant_max=127),
    dict(dtype=torch.qint8, qscheme=torch.per_tensor_affine),
]
PER_CHANNEL = [
    dict(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127, ch_axis=0),
    dict(dtype=torch.quint8, qscheme=torch.per_channel_affine, ch_axis=1),
]


def _inputs(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(3, 5, 4, 4, generator=g) * (1 + i) + i * 0.3) for i in range(n)]


def _compare_fq(ours, theirs):
    for x in _inputs():
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(a), theirs(b)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.allclose(ya, yb, rtol=0, atol=1e-6)
        assert torch.equal(a.grad, b.grad)
        assert torch.allclose(ours.scale, theirs.scale, rtol=1e-6, atol=0)
        assert torch.equal(ours.zero_point.long(), theirs.zero_point.long())


@pytest.mark.parametrize("kw", PER_TENSOR)
def test_fake_quantize_parity_per_tensor(tq, kw):
    _compare_fq(FakeQuantize(observer=MovingAverageMinMaxObserver, averaging_constant=0.2, **kw),
                tq.FakeQuantize(observer=tq.MovingAverageMinMaxObserver, averaging_constant=0.2, **kw))


@pytest.mark.parametrize("kw", PER_CHANNEL)
def test_fake_quantize_parity_per_channel(tq, kw):
    _compare_fq(FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=0.2, **kw),
                tq.FakeQuantize(observer=tq.MovingAveragePerChannelMinMaxObserver, averaging_constant=0.2, **kw))


@pytest.mark.parametrize("kw,observer", [(PER_TENSOR[0], "MovingAverageMinMaxObserver"),
                                         (PER_TENSOR[1], "MovingAverageMinMaxObserver"),
                                         (PER_CHANNEL[0], "MovingAveragePerChannelMinMaxObserver")])
def test_fused_fake_quantize_parity(tq, kw, observer):
    import bst.torch.ao.quantization as bq
    _compare_fq(FusedMovingAvgObsFakeQuantize(observer=getattr(bq, observer), **kw),
                tq.FusedMovingAvgObsFakeQuantize(observer=getattr(tq, observer), **kw))


def test_fused_fake_quantize_calibrates_with_fake_quant_off_and_survives_nan():
    fq = FusedMovingAvgObsFakeQuantize()
    fq.disable_fake_quant()
    x = torch.linspace(-1, 3, 100)
    assert torch.equal(fq(x), x)
    assert fq.scale.item() == pytest.approx(4 / 255, rel=1e-5)  # computed although fake quant was off
    before = [t.clone() for t in (fq.scale, fq.zero_point, fq.activation_post_process.min_val)]
    bad = x.clone()
    bad[3] = float("nan")
    fq.enable_fake_quant()
    fq(bad)
    after = (fq.scale, fq.zero_point, fq.activation_post_process.min_val)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with pytest.raises(ValueError, match="pow2"):
        FusedMovingAvgObsFakeQuantize(pow2=True)


def test_flags_are_uint8_buffers_and_every_write_takes_effect():
    fq = FakeQuantize()
    assert fq.fake_quant_enabled.dtype == torch.uint8 and fq.observer_enabled.dtype == torch.uint8
    assert {"fake_quant_enabled", "observer_enabled"} <= set(fq.state_dict())
    x = torch.linspace(-1, 1, 101)
    fq(x)
    model = nn.Sequential(fq)
    model.apply(disable_fake_quant)
    assert torch.equal(fq(x * 3), x * 3)  # observer still runs, output untouched
    model.apply(disable_observer)
    frozen = fq.scale.clone()
    model.apply(enable_fake_quant)
    fq(x * 10)
    assert torch.equal(fq.scale, frozen)
    fq.observer_enabled[0] = 1  # a direct write, as torch.ao code does, is seen (version counter)
    fq(x * 10)
    assert not torch.equal(fq.scale, frozen)
    state = fq.state_dict()
    state["fake_quant_enabled"] = torch.tensor([0], dtype=torch.uint8)
    fq.load_state_dict(state)
    assert torch.equal(fq(x * 7), x * 7)
    model.apply(enable_observer)
    assert fq.observer_enabled.item() == 1


def test_state_dict_resizes_per_channel_buffers():
    src = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, **PER_CHANNEL[0])
    src(torch.randn(6, 3, 2, 2))
    dst = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, **PER_CHANNEL[0])
    dst.load_state_dict(src.state_dict())
    for name in ("scale", "zero_point"):
        assert torch.equal(getattr(dst, name), getattr(src, name))
    assert torch.equal(dst.activation_post_process.min_val, src.activation_post_process.min_val)
    w = torch.randn(6, 3, 2, 2)
    dst.disable_observer()
    src.disable_observer()
    assert torch.equal(dst(w), src(w))


def _pow2_quantizers():
    a = FakeQuantize(pow2=True)
    a(torch.randn(50) * 3)
    w = FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, pow2=True, **PER_CHANNEL[0])
    w(torch.randn(4, 3, 3, 3) * torch.tensor([1e-3, 1.0, 7.0, 300.0]).reshape(-1, 1, 1, 1))
    return nn.ModuleDict({"act": a, "weight": w, "conv": nn.Conv2d(3, 4, 3)})


def _assert_same_pow2_state(a, b):
    for name in ("act", "weight"):
        qa, qb = a[name], b[name]
        assert qb.scale.dtype == torch.float32 and bool(is_pow2(qb.scale).all())
        assert torch.equal(qa.scale, qb.scale) and torch.equal(qa.zero_point, qb.zero_point)
        for buf in ("min_val", "max_val"):
            va, vb = getattr(qa.activation_post_process, buf), getattr(qb.activation_post_process, buf)
            assert vb.dtype == torch.float32 and torch.equal(va, vb)


def test_pow2_state_survives_round_trips():
    model = _pow2_quantizers()
    fresh = nn.ModuleDict({"act": FakeQuantize(pow2=True), "conv": nn.Conv2d(3, 4, 3),
                           "weight": FakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, pow2=True,
                                                  **PER_CHANNEL[0])})
    fresh.load_state_dict(model.state_dict())
    _assert_same_pow2_state(model, fresh)
    _assert_same_pow2_state(model, copy.deepcopy(model))
    _assert_same_pow2_state(model, pickle.loads(pickle.dumps(model)))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    _assert_same_pow2_state(model, torch.load(buffer, weights_only=False))


@pytest.mark.parametrize("cast", ["half", "bfloat16", "double", "to_half"])
def test_dtype_casts_leave_quantizer_state_float32(cast):
    model = _pow2_quantizers()
    reference = copy.deepcopy(model)
    cast_model = model.to(torch.float16) if cast == "to_half" else getattr(model, cast)()
    assert cast_model.conv.weight.dtype == {"half": torch.float16, "to_half": torch.float16,
                                             "bfloat16": torch.bfloat16, "double": torch.float64}[cast]
    _assert_same_pow2_state(reference, cast_model)  # values exact, dtype float32
    _assert_same_pow2_state(reference, cast_model.float())
    x = torch.randn(2, 3, 5, 5).to(cast_model.conv.weight.dtype)
    model["act"].disable_observer()
    assert model["act"](x).dtype == x.dtype  # a half/bf16 input is fake-quantized with the float32 scale


def test_loading_a_non_pow2_scale_into_a_pow2_quantizer_raises():
    fq = FakeQuantize(pow2=True)
    state = fq.state_dict()
    state["scale"] = torch.tensor([0.3])
    with pytest.raises(ValueError, match="power of two"):
        fq.load_state_dict(state)


def test_fake_quantize_ignores_non_finite_batches():
    fq = FakeQuantize(pow2=True)
    fq(torch.randn(100))
    scale, zp = fq.scale.clone(), fq.zero_point.clone()
    x = torch.randn(100)
    x[5] = float("inf")
    fq(x)
    assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp)


def test_fixed_qparams_fake_quantize():
    fq = FixedQParamsFakeQuantize(FixedQParamsObserver.with_args(scale=1 / 16, zero_point=128, pow2=True))
    x = torch.linspace(-20, 20, 41)
    expected = torch.fake_quantize_per_tensor_affine(x, 1 / 16, 128, 0, 255)
    assert torch.equal(fq(x), expected) and fq.scale.item() == 1 / 16
    with pytest.raises(ValueError, match="observer"):
        FixedQParamsFakeQuantize(MinMaxObserver)


@pytest.mark.parametrize("per_channel", [False, True])
def test_learnable_gradients_match_torch_lsq(per_channel):
    if not hasattr(torch, "_fake_quantize_learnable_per_tensor_affine"):
        pytest.skip("torch has no learnable fake-quant op")
    torch.manual_seed(0)
    if per_channel:
        fq = LearnableFakeQuantize(observer=MovingAveragePerChannelMinMaxObserver, grad_factor=0.37, **PER_CHANNEL[0])
    else:
        fq = LearnableFakeQuantize(grad_factor=0.37)
    x = torch.randn(4, 3, 5, 5) * 2
    fq(x)  # observer initialises scale / zero point
    fq.disable_observer()
    with torch.no_grad():
        fq.scale.mul_(0.6)  # make some values clip
    a = x.clone().requires_grad_()
    y = fq(a)
    g = torch.randn_like(y)
    y.backward(g)
    b = x.clone().requires_grad_()
    scale = fq.scale.detach().clone().requires_grad_()
    zp = fq.zero_point.float()
    if per_channel:
        ref = torch._fake_quantize_learnable_per_channel_affine(b, scale, zp, 0, fq.quant_min, fq.quant_max, 0.37)
    else:
        ref = torch._fake_quantize_learnable_per_tensor_affine(b, scale, zp, fq.quant_min, fq.quant_max, 0.37)
    ref.backward(g)
    assert torch.allclose(y, ref, atol=1e-6)
    assert torch.allclose(a.grad, b.grad, atol=1e-6)
    assert torch.allclose(fq.scale.grad, scale.grad, rtol=1e-4, atol=1e-5)


def test_learnable_pow2_learns_log2_scale():
    fq = LearnableFakeQuantize(pow2=True, pow2_rounding="round")
    names = dict(fq.named_parameters())
    assert set(names) == {"log2_scale"} and quantizer_parameters(nn.Sequential(fq)) == [fq.log2_scale]
    assert is_quantizer_state(fq)
    x = torch.randn(1000) * 3
    fq(x)
    assert fq.log2_scale.item() == float(torch.log2(fq.scale).item()) and bool(is_pow2(fq.scale).all())
    fq.disable_observer()
    opt = torch.optim.Adam(fq.parameters(), lr=0.3)
    start, start_scale = fq.log2_scale.item(), fq.scale.item()
    for step in range(20):  # a loss that prefers a much larger step: clipping error dominates
        loss = (fq(x * 8) - x * 8).square().mean()
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert fq.log2_scale.grad.item() < 0
        opt.step()
        assert bool(is_pow2(fq.scale).all())
    fq(x)
    assert fq.log2_scale.item() > start + 1 and fq.scale.item() == 2.0 ** round(fq.log2_scale.item())
    assert fq.scale.item() >= 4 * start_scale
    assert bool(is_pow2(fq.state_dict()["scale"]).all())


def test_lazy_calibrator_refreshes_when_needed():
    fq = FakeQuantize(observer=MSEObserver, pow2=True)
    fq.disable_fake_quant()
    for i in range(3):
        fq(torch.randn(2000) * (i + 1))
    assert fq.scale.item() == 1.0  # not evaluated yet: nothing needed it
    expected = fq.calculate_qparams()
    assert torch.equal(fq.state_dict()["scale"], expected[0])
    fq.disable_observer()
    assert torch.equal(fq.scale, expected[0]) and torch.equal(fq.zero_point, expected[1])


def test_invalid_fake_quantize_configuration():
    with pytest.raises(ValueError, match="quant_min"):
        FakeQuantize(quant_min=10, quant_max=0)
    with pytest.raises(ValueError, match="observer"):
        FakeQuantize(observer=nn.Identity)
    with pytest.raises(ValueError, match="grad_factor"):
        LearnableFakeQuantize(grad_factor="big")


@pytest.mark.parametrize("seed", range(4))
def test_vectorized_cpu_fake_quant_is_bit_identical_to_core_op(seed):
    from bst.torch.ao.quantization.fake_quant_ops import fake_quantize_per_channel, fake_quantize_per_tensor

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, 7, 9, generator=g) * 10 ** float(torch.randint(-3, 4, (1,), generator=g))
    x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * 0.125  # exact ties for the pow2 scale below
    for scale, zp, qmin, qmax in ((torch.rand(1, generator=g) * 0.3 + 1e-3, 7, 0, 255),
                                  (torch.tensor([0.125]), 0, -128, 127), (torch.tensor([3e-5]), -3, -8, 7)):
        zp_t = torch.tensor([zp], dtype=torch.int32)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = fake_quantize_per_tensor(a, scale, zp_t, qmin, qmax)
        core = torch.fake_quantize_per_tensor_affine(b, scale, zp_t, qmin, qmax)
        assert torch.equal(ours, core)
        grad = torch.randn(x.shape, generator=g)
        ours.backward(grad)
        core.backward(grad)
        assert torch.equal(a.grad, b.grad)
    scales = torch.rand(4, generator=g) * 0.1 + 1e-4
    # one zero point per channel, and one shared by all (symmetric schemes: clamped with Python bounds)
    for zps in (torch.randint(-5, 5, (4,), generator=g, dtype=torch.int32), torch.zeros(4, dtype=torch.int32),
                torch.full((4,), 3, dtype=torch.int32)):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ours = fake_quantize_per_channel(a, scales, zps, 1, -128, 127)
        core = torch.fake_quantize_per_channel_affine(b, scales, zps, 1, -128, 127)
        assert torch.equal(ours, core)
        grad = torch.randn(x.shape, generator=g)
        ours.backward(grad)
        core.backward(grad)
        assert torch.equal(a.grad, b.grad)
