"""Observers: parity with torch.ao.quantization (linear mode), non-finite inputs, invalid configurations,
fixed qparams and the outlier-robust calibrators."""
import warnings

import pytest
import torch

from bst.torch.ao.quantization import (FixedQParamsObserver, MinMaxObserver, MovingAverageMinMaxObserver,
                                       MovingAveragePerChannelMinMaxObserver, MSEObserver, PercentileObserver,
                                       PerChannelMinMaxObserver, is_pow2)

CONFIGS = [  # dtype, qscheme (per tensor), extra kwargs
    (torch.quint8, torch.per_tensor_affine, {}),
    (torch.qint8, torch.per_tensor_affine, {}),
    (torch.qint8, torch.per_tensor_symmetric, {}),
    (torch.quint8, torch.per_tensor_symmetric, {}),
    (torch.quint8, torch.per_tensor_affine, {"reduce_range": True}),
    (torch.qint8, torch.per_tensor_affine, {"quant_min": -15, "quant_max": 15}),
    (torch.quint8, torch.per_tensor_symmetric, {"quant_min": 0, "quant_max": 15}),
]
PER_CHANNEL = {torch.per_tensor_affine: torch.per_channel_affine, torch.per_tensor_symmetric: torch.per_channel_symmetric}


@pytest.fixture(scope="module")
def tq():
    ao = pytest.importorskip("torch.ao.quantization")
    warnings.filterwarnings("ignore", module="torch.ao")
    return ao


def _batches(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 6, 5, 5, generator=g) * (i + 0.5) + (i - 1) * 0.7 for i in range(4)]


@pytest.mark.parametrize("dtype,qscheme,kw", CONFIGS)
@pytest.mark.parametrize("name", ["MinMaxObserver", "MovingAverageMinMaxObserver"])
def test_per_tensor_parity(tq, name, dtype, qscheme, kw):
    ours = globals()[name](dtype=dtype, qscheme=qscheme, **kw)
    theirs = getattr(tq, name)(dtype=dtype, qscheme=qscheme, **kw)
    for x in _batches():
        ours(x)
        theirs(x)
        s1, z1 = ours.calculate_qparams()
        s2, z2 = theirs.calculate_qparams()
        assert torch.equal(ours.min_val, theirs.min_val) and torch.equal(ours.max_val, theirs.max_val)
        assert torch.allclose(s1, s2.float(), rtol=1e-6, atol=0) and torch.equal(z1.long(), z2.long())


@pytest.mark.parametrize("dtype,qscheme,kw", CONFIGS)
@pytest.mark.parametrize("name", ["PerChannelMinMaxObserver", "MovingAveragePerChannelMinMaxObserver"])
@pytest.mark.parametrize("ch_axis", [0, 1])
def test_per_channel_parity(tq, name, dtype, qscheme, kw, ch_axis):
    ours = globals()[name](ch_axis=ch_axis, dtype=dtype, qscheme=PER_CHANNEL[qscheme], **kw)
    theirs = getattr(tq, name)(ch_axis=ch_axis, dtype=dtype, qscheme=PER_CHANNEL[qscheme], **kw)
    for x in _batches(1):
        ours(x)
        theirs(x)
    s1, z1 = ours.calculate_qparams()
    s2, z2 = theirs.calculate_qparams()
    assert s1.shape == (x.shape[ch_axis],)
    assert torch.allclose(s1, s2.float(), rtol=1e-6, atol=0) and torch.equal(z1.long(), z2.long())


def test_unobserved_qparams_are_neutral():
    for obs in (MinMaxObserver(), PerChannelMinMaxObserver(), MovingAverageMinMaxObserver(pow2=True)):
        scale, zp = obs.calculate_qparams()
        assert scale.tolist() == [1.0] and zp.tolist() == [0]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_batches_are_ignored(bad):
    """Documented behaviour: a batch whose min or max is not finite leaves the statistics unchanged."""
    clean = torch.linspace(-1, 3, 50)
    poisoned = clean.clone()
    poisoned[7] = bad
    for obs in (MinMaxObserver(), MovingAverageMinMaxObserver(averaging_constant=0.5),
                MovingAverageMinMaxObserver(pow2=True)):
        obs(poisoned)  # first batch: still unobserved afterwards
        assert obs.min_val.item() == float("inf") and obs.max_val.item() == float("-inf")
        obs(clean)
        before = obs.calculate_qparams()
        obs(poisoned * 10)
        after = obs.calculate_qparams()
        assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
        assert torch.isfinite(after[0]).all()
    per_channel = MovingAveragePerChannelMinMaxObserver(ch_axis=0, averaging_constant=0.5)
    x = torch.randn(3, 20)
    per_channel(x)
    y = x * 4
    y[1, 3] = bad
    per_channel(y)
    assert per_channel.min_val[1] == x[1].min() and per_channel.max_val[1] == x[1].max()  # channel 1 kept
    assert per_channel.max_val[0] == x[0].max() + 0.5 * (y[0].max() - x[0].max())  # others updated


def test_calibrators_drop_non_finite_elements():
    x = torch.linspace(-2, 2, 1000)
    x[10], x[20] = float("nan"), float("inf")
    for obs in (PercentileObserver(percentile=100), MSEObserver()):
        obs(x)
        scale, zp = obs.calculate_qparams()
        assert torch.isfinite(scale).all() and 0 < float(scale) < 1


@pytest.mark.parametrize("kwargs,word", [
    ({"quant_min": 10, "quant_max": 5}, "quant_min"),
    ({"quant_min": 0, "quant_max": 0}, "quant_min"),
    ({"quant_min": -300, "quant_max": 10, "dtype": torch.qint8}, "quant_min"),
    ({"quant_min": 5, "quant_max": 10}, "include 0"),
    ({"quant_min": 0}, "quant_max"),
    ({"dtype": torch.float16}, "dtype"),
    ({"dtype": torch.qint32}, "dtype"),
    ({"qscheme": torch.per_channel_affine_float_qparams}, "qscheme"),
    ({"qscheme": torch.per_channel_affine}, "qscheme"),
    ({"pow2_rounding": "floor"}, "pow2_rounding"),
    ({"eps": 0.0}, "eps"),
    ({"averaging_constant": 0.0}, "averaging_constant"),
])
def test_invalid_configuration_names_the_parameter(kwargs, word):
    with pytest.raises(ValueError, match=word):
        MovingAverageMinMaxObserver(**kwargs)


def test_per_channel_axis_errors():
    with pytest.raises(ValueError, match="ch_axis"):
        PerChannelMinMaxObserver(ch_axis=4)(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="ch_axis"):
        PerChannelMinMaxObserver(ch_axis="0")
    obs = PerChannelMinMaxObserver(ch_axis=0)
    obs(torch.randn(3, 4))
    with pytest.raises(ValueError, match="ch_axis"):
        obs(torch.randn(5, 4))
    with pytest.raises(ValueError, match="qscheme"):
        PerChannelMinMaxObserver(qscheme=torch.per_tensor_affine)


def test_fixed_qparams_observer():
    obs = FixedQParamsObserver(scale=8 / 128, zero_point=0, pow2=True)
    obs(torch.randn(10) * 100)
    scale, zp = obs.calculate_qparams()
    assert scale.item() == 0.0625 and zp.item() == 0
    with pytest.raises(ValueError, match="scale"):
        FixedQParamsObserver(scale=0.1, zero_point=0, pow2=True)
    with pytest.raises(ValueError, match="scale"):
        FixedQParamsObserver(scale=-1.0, zero_point=0)
    with pytest.raises(ValueError, match="zero_point"):
        FixedQParamsObserver(scale=1.0, zero_point=300)


def _fq_mse(x, scale, zp, qmin, qmax):
    return (torch.fake_quantize_per_tensor_affine(x, scale, zp, qmin, qmax) - x).square().mean().item()


def _calibrate(obs, batches):
    for x in batches:
        obs(x)
    scale, zp = obs.calculate_qparams()
    if obs.pow2:
        assert bool(is_pow2(scale).all())
    return scale, zp


@pytest.mark.parametrize("pow2,ratio", [(False, 0.95), (True, 0.7)])
def test_mse_observer_beats_min_max_on_heavy_tails(pow2, ratio):
    torch.manual_seed(0)
    batches = [torch.distributions.StudentT(4.0).sample((20000,)) for _ in range(4)]
    data = torch.cat(batches)
    errors = {}
    for name, obs in {"minmax": MinMaxObserver(pow2=pow2), "mse": MSEObserver(pow2=pow2)}.items():
        errors[name] = _fq_mse(data, *_calibrate(obs, batches), obs.quant_min, obs.quant_max)
    assert errors["mse"] < ratio * errors["minmax"], errors


@pytest.mark.parametrize("pow2", [False, True])
def test_percentile_observer_keeps_resolution_despite_outliers(pow2):
    """The seed's failure: a few very negative outputs (Detect logits) inflate a min/max scale and
    crush the resolution of every other value."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randn(20000, generator=g)
        x[torch.randint(0, x.numel(), (10,), generator=g)] = -torch.rand(10, generator=g) * 200 - 50
        batches.append(x)
    data = torch.cat(batches)
    bulk = data[data > -10]
    errors = {}
    for name, obs in {"minmax": MinMaxObserver(pow2=pow2), "percentile": PercentileObserver(99.9, pow2=pow2)}.items():
        errors[name] = _fq_mse(bulk, *_calibrate(obs, batches), obs.quant_min, obs.quant_max)
    assert errors["percentile"] < 0.05 * errors["minmax"], errors


def test_mse_observer_symmetric_and_lazy_flag():
    obs = MSEObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, pow2=True)
    assert obs.compute_qparams_lazily
    obs(torch.randn(5000))
    scale, zp = obs.calculate_qparams()
    assert zp.item() == 0 and bool(is_pow2(scale).all())
