"""Observers: parity with torch.ao.quantization (linear mode), non-finite inputs, invalid configurations,
fixed qparams and the outlier-robust calibrators."""

import pytest
import torch

from bst.torch.ao.quantization import (
    FixedQParamsObserver,
    HistogramMSEObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelMinMaxObserver,
    is_pow2,
)
from bst.torch.ao.quantization.calibrators import _tied_bulk, _true_per_row
from bst.torch.ao.quantization.observer import min_max

CONFIGS = [  # dtype, qscheme (per tensor), extra kwargs
    (torch.quint8, torch.per_tensor_affine, {}),
    (torch.qint8, torch.per_tensor_affine, {}),
    (torch.qint8, torch.per_tensor_symmetric, {}),
    (torch.quint8, torch.per_tensor_symmetric, {}),
    (torch.quint8, torch.per_tensor_affine, {"reduce_range": True}),
    (torch.qint8, torch.per_tensor_affine, {"quant_min": -15, "quant_max": 15}),
    (torch.quint8, torch.per_tensor_symmetric, {"quant_min": 0, "quant_max": 15}),
]
PER_CHANNEL = {torch.per_tensor_affine: torch.per_channel_affine,
               torch.per_tensor_symmetric: torch.per_channel_symmetric}


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
    for obs in (PercentileObserver(percentile=100), MSEObserver(), HistogramMSEObserver()):
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
    for name, obs in {"minmax": MinMaxObserver(pow2=pow2), "mse": MSEObserver(pow2=pow2),
                      "mse_histogram": HistogramMSEObserver(pow2=pow2)}.items():
        errors[name] = _fq_mse(data, *_calibrate(obs, batches), obs.quant_min, obs.quant_max)
    assert errors["mse"] < ratio * errors["minmax"], errors
    assert errors["mse_histogram"] < ratio * errors["minmax"], errors


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


# --- calibrators: the fast observing paths give exactly the straightforward result -----------------------------

class _ReferenceCalibration:
    """What a calibrator's observing means, written the plain way: drop non-finite elements (a copy), take the
    min/max, update the average batch range with tensor ops; MSE: topk of the m largest and smallest, the values
    strictly between them compacted and thinned by a stride, written into the sample ring; percentile: the running
    mean of the per-batch quantiles of the thinned values. The observers' fast paths must match it bit for bit."""

    def __init__(self, obs):
        self.obs = obs
        self.min_val, self.max_val = torch.tensor(float("inf")), torch.tensor(float("-inf"))
        self.batch_range, self.batch_count = torch.zeros(2), torch.tensor(0)
        self.num_batches = 0
        if isinstance(obs, MSEObserver):
            self.samples, self.weights, self.cursor = torch.zeros(obs.num_samples), torch.zeros(obs.num_samples), 0

    def __call__(self, x):
        obs = self.obs
        values = x.detach().reshape(-1).to(torch.float32)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return
        low, high = torch.aminmax(values)
        weight = 1.0 / torch.clamp(self.batch_count + 1, max=round(1 / obs.averaging_constant)).float()
        self.batch_range = self.batch_range + (torch.stack([low, high]) - self.batch_range) * weight
        self.batch_count = self.batch_count + 1
        if isinstance(obs, MSEObserver):
            self._mse(values, low, high)
        else:
            self._percentile(values)

    def _mse(self, values, low, high):
        obs = self.obs
        self.min_val, self.max_val = torch.minimum(self.min_val, low), torch.maximum(self.max_val, high)
        m = min(obs.num_extremes, values.numel() // 4)
        top, bottom = torch.topk(values, m).values, -torch.topk(-values, m).values
        bulk = values[(values < top[-1]) & (values > bottom[-1])] if m else values
        room = obs.num_samples // 8 - 2 * m
        sample = bulk[::-(-bulk.numel() // room)] if bulk.numel() > room else bulk
        entries = torch.cat([top, bottom, sample])
        weights = torch.cat([torch.ones(2 * m), torch.full_like(sample, bulk.numel() / max(sample.numel(), 1))])
        at = (self.cursor + torch.arange(entries.numel())) % obs.num_samples
        self.samples[at], self.weights[at] = entries, weights
        self.cursor = (self.cursor + entries.numel()) % obs.num_samples

    def _percentile(self, values):
        obs = self.obs
        if values.numel() > obs.max_samples:
            values = values[::-(-values.numel() // obs.max_samples)]
        p = obs.percentile / 100
        if obs.symmetric:
            high = torch.quantile(values.abs(), p)
            low = -high
        else:
            low, high = torch.quantile(values, torch.tensor([1 - p, p]))
        if self.num_batches == 0:
            self.min_val, self.max_val = low, high
        else:
            n1 = torch.tensor(float(self.num_batches)) + 1
            self.min_val = self.min_val + (low - self.min_val) / n1
            self.max_val = self.max_val + (high - self.max_val) / n1
        self.num_batches += 1

    def state(self):
        state = {"min_val": self.min_val, "max_val": self.max_val, "batch_range": self.batch_range,
                 "batch_count": self.batch_count}
        if isinstance(self.obs, MSEObserver):
            state.update(samples=self.samples, weights=self.weights)
        else:
            state["num_batches"] = torch.tensor(self.num_batches)
        return state


def _bits(t):
    t = t.detach().reshape(-1)
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same_bits(ours, reference, what):
    assert ours.dtype == reference.dtype and torch.equal(_bits(ours), _bits(reference)), what


def _tensor_zoo(g):
    """Batches that reach every observing path: tiny (fewer than 4 * num_extremes values), at and around the size
    where the block search starts, large with a short last block; ties at one or both extremes (ReLU zeros, ReLU6
    saturation, a flat SiLU minimum, few distinct values), extremes clustered in a few blocks or in the last one,
    zeros of both signs among the extremes, constant tensors, NaN and infinities, non-contiguous, offset and
    float16 inputs."""
    def randn(*shape):
        return torch.randn(*shape, generator=g)

    def mixed_zeros(x):
        x[torch.rand(x.shape, generator=g) < 0.5] *= -1  # flips the sign of some zeros too
        return x

    saturated = torch.full((30011,), 6.0)
    saturated[::97] = torch.rand(310, generator=g) * 6
    clustered = torch.clamp(randn(50000) * 4, -6, 6)
    clustered[20000:20300] += 20
    clustered[100:400] -= 20
    last = randn(70001)
    last[-3:] = torch.tensor([40.0, -50.0, 50.0])
    non_finite = randn(40000)
    non_finite[[7, 20000, 39999]] = torch.tensor([float("nan"), float("inf"), float("-inf")])
    wide = randn(2, 64, 100, 100)
    return [
        randn(3), randn(17), randn(255) * 3, randn(5000), randn(16384), randn(16383), randn(16385),
        torch.nn.functional.silu(randn(4, 16, 80, 80) * 3),  # ties at the flat minimum
        torch.relu(randn(40000)), torch.clamp(randn(60000) * 4, 0, 6), saturated, -torch.relu(randn(40000)),
        torch.round(torch.rand(50000, generator=g) * 255) / 255, clustered, last,
        mixed_zeros(torch.relu(randn(40000))), mixed_zeros(-torch.relu(randn(40000))),
        mixed_zeros(torch.zeros(30000)), torch.full((30000,), 1.5), torch.zeros(20), non_finite,
        torch.full((20000,), float("nan")), torch.empty(0), randn(40000) ** 3 * 100, (randn((1 << 20) + 5) * 2 - 1),
        wide.transpose(1, 3), wide.reshape(-1)[3:70003], randn(4, 8, 40, 40).half(),
    ]


CALIBRATION_CASES = [
    (MSEObserver, {}),
    (MSEObserver, {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric, "pow2": True}),
    (MSEObserver, {"pow2": True, "num_samples": 1 << 17}),  # room for the whole bulk of a 16384-value batch
    (MSEObserver, {"num_samples": 1024, "num_extremes": 7}),  # the ring wraps every few batches
    (MSEObserver, {"num_extremes": 0}),
    (MSEObserver, {"num_extremes": 1, "qscheme": torch.per_tensor_symmetric}),
    (PercentileObserver, {"pow2": True}),
    (PercentileObserver, {"dtype": torch.qint8, "qscheme": torch.per_tensor_symmetric, "max_samples": 1000}),
]


@pytest.mark.parametrize("observer,kw", CALIBRATION_CASES)
def test_calibrator_observing_matches_the_plain_definition_bit_for_bit(observer, kw):
    obs = observer(**kw)
    reference = _ReferenceCalibration(observer(**kw))
    for i, x in enumerate(_tensor_zoo(torch.Generator().manual_seed(7))):
        obs(x)
        reference(x)
        for name, value in reference.state().items():
            _assert_same_bits(getattr(obs, name), value, f"batch {i}: {name}")
        assert getattr(obs, "_cursor", 0) == getattr(reference, "cursor", 0), f"batch {i}"
        twin = observer(**kw)  # the qparams of the reference state
        for name, value in reference.state().items():
            getattr(twin, name).copy_(value)
        for ours, theirs in zip(obs.calculate_qparams(), twin.calculate_qparams()):
            _assert_same_bits(ours, theirs, f"batch {i}: qparams")


@pytest.mark.parametrize("numel", [1, 7, 8, 33, 1000, 65536 + 3])
def test_min_max_propagates_nan(numel):
    """The calibrators observe a batch in place when both ends of `min_max` are finite: that must mean no NaN
    anywhere (its reductions propagate NaN) as well as no infinity."""
    for at in {0, numel // 2, numel - 1}:
        x = torch.randn(numel)
        x[at] = float("nan")
        low, high = min_max(x)
        assert low.isnan() and high.isnan()


@pytest.mark.parametrize("numel", [64 * 1000, 8 * 999, 16 * 501 * 3, 3 * 1001, 40])
def test_tied_bulk_is_every_step_th_value_between_the_ends(numel):
    """The bulk sample under ties: row counts (flags added eight at a time where rows allow), one comparison when
    only one side's positions are listed, and a running count within the chosen rows pick the values a running
    count over the whole tensor picks."""
    g = torch.Generator().manual_seed(numel)
    values = torch.relu(torch.randn(numel, generator=g))  # ties at 0
    values[torch.rand(numel, generator=g) < 0.2] = 3.0  # and at 3
    low, high = torch.tensor(0.0), torch.tensor(3.0)
    inside = (values < high) & (values > low)
    for room in (10 ** 9, 64, 1000):
        running = torch.cumsum(inside, 0)
        total = int(running[-1])
        wanted = torch.arange(1, total + 1, -(-total // room))
        expected = values[torch.searchsorted(running, wanted)] if total > room else values[inside]
        top_at, bottom_at = torch.nonzero(values >= high).flatten(), torch.nonzero(values <= low).flatten()
        for listed in ((None, None), (top_at, None), (None, bottom_at)):
            sample, count = _tied_bulk(values, low, high, *listed, room)
            assert count == total and torch.equal(sample, expected)
    rows = (torch.rand(999, 64, generator=g) < 0.3)
    assert torch.equal(_true_per_row(rows), rows.sum(1))


# --- calibrators after calibration: tracking the calibrated qparams (training_update="track") -----------------

def _calibrated_fq(observer, pow2, batches, **kw):
    """A FakeQuantize over `observer`, calibrated on `batches` (observer on, fake quant off), then fake quant on."""
    from bst.torch.ao.quantization import FakeQuantize

    fq = FakeQuantize(observer=observer, pow2=pow2, **kw)
    fq.disable_fake_quant()
    for b in batches:
        fq(b)
    fq.disable_observer()
    calibrated = (fq.scale.clone(), fq.zero_point.clone())
    fq.enable_fake_quant()
    fq.enable_observer()
    return fq, calibrated


TRACK_CASES = [(obs, pow2, dtype, qs) for obs in (MSEObserver, HistogramMSEObserver, PercentileObserver)
               for pow2 in (False, True)
               for dtype, qs in ((torch.quint8, torch.per_tensor_affine), (torch.qint8, torch.per_tensor_symmetric))]


@pytest.mark.parametrize("observer,pow2,dtype,qscheme", TRACK_CASES)
def test_tracking_starts_from_the_calibrated_qparams_and_follows_the_range(observer, pow2, dtype, qscheme):
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(4000, generator=g) * 2 + 0.5 for _ in range(8)]
    fq, (scale, zp) = _calibrated_fq(observer, pow2, batches, dtype=dtype, qscheme=qscheme)
    obs = fq.activation_post_process
    fq(torch.randn(4000, generator=g) * 2 + 0.5)  # same distribution: the calibrated qparams, to the bit (pow2)
    assert obs.tracking
    if pow2:
        assert fq.scale.item() == scale.item() and fq.zero_point.item() == zp.item()
    else:
        assert fq.scale.item() == pytest.approx(scale.item(), rel=0.05)
        assert abs(fq.zero_point.item() - zp.item()) <= 2

    def no_search():
        raise AssertionError("searched while tracking")
    obs._search_qparams = no_search  # from now on every step is one min/max and a few scalar ops
    for _ in range(400):  # the range grows 4x: the scale follows, 4x (exactly 2**2 in pow2 mode)
        fq(torch.randn(4000, generator=g) * 8 + 2.0)
    ratio = fq.scale.item() / scale.item()
    assert ratio == 4.0 if pow2 else ratio == pytest.approx(4.0, rel=0.05)
    if pow2:
        assert bool(is_pow2(fq.scale).all())


def test_tracking_keeps_one_signed_data_at_the_range_end():
    g = torch.Generator().manual_seed(2)
    batches = [torch.rand(4000, generator=g) * 3 for _ in range(4)]  # after ReLU: zero point at quant_min
    fq, (scale, zp) = _calibrated_fq(MSEObserver, True, batches)
    assert zp.item() == 0
    for _ in range(300):
        fq(torch.rand(4000, generator=g) * 0.7)
    assert fq.zero_point.item() == 0 and fq.scale.item() == scale.item() / 4


def test_tracking_ignores_non_finite_batches():
    g = torch.Generator().manual_seed(3)
    fq, (scale, zp) = _calibrated_fq(MSEObserver, True, [torch.randn(4000, generator=g) for _ in range(4)])
    fq(torch.randn(4000, generator=g))
    before = fq.activation_post_process.batch_range.clone()
    for bad in (float("nan"), float("inf"), float("-inf")):
        x = torch.randn(4000, generator=g)
        x[7] = bad
        fq(x)
    assert torch.equal(fq.activation_post_process.batch_range, before) and fq.scale.item() == scale.item()


def test_search_mode_repeats_the_full_search():
    g = torch.Generator().manual_seed(4)
    batches = [torch.randn(4000, generator=g) for _ in range(4)]
    fq, _ = _calibrated_fq(MSEObserver, True, batches, training_update="search")
    x = torch.randn(4000, generator=g) * 8
    fq(x)
    obs = fq.activation_post_process
    assert not obs.tracking and fq.scale.item() == obs._search_qparams()[0].item()
    with pytest.raises(ValueError, match="training_update"):
        MSEObserver(training_update="sometimes")


def test_tracking_state_survives_state_dict_and_pickle_and_old_state_loads():
    import pickle

    g = torch.Generator().manual_seed(5)
    fq, _ = _calibrated_fq(MSEObserver, True, [torch.randn(4000, generator=g) for _ in range(4)])
    for _ in range(3):
        fq(torch.randn(4000, generator=g) * 3)
    from bst.torch.ao.quantization import FakeQuantize

    fresh = FakeQuantize(observer=MSEObserver, pow2=True)
    fresh.load_state_dict(fq.state_dict())  # strict
    copy = pickle.loads(pickle.dumps(fq))
    for other in (fresh, copy):
        obs = other.activation_post_process
        assert obs.tracking and torch.equal(obs.reference, fq.activation_post_process.reference)
        assert torch.equal(obs.calculate_qparams()[0], fq.activation_post_process.calculate_qparams()[0])
    # state written before tracking existed: loads strictly, and the observer calibrates as it did then
    old = {k: v for k, v in fq.state_dict().items()
           if k.split(".")[-1] not in ("batch_range", "batch_count", "reference")}
    fresh.load_state_dict(old)
    assert not fresh.activation_post_process.tracking
    # a pickle from before tracking existed gets the tracking state back
    legacy = MSEObserver(pow2=True)
    for k in ("batch_range", "batch_count", "reference"):
        del legacy._buffers[k]
    del legacy.__dict__["training_update"], legacy.__dict__["_tracking"]
    restored = pickle.loads(pickle.dumps(legacy))
    assert restored.training_update == "track" and not restored.tracking and restored.reference.shape == (4,)


@pytest.mark.parametrize("observer,pow2,dtype,qscheme", TRACK_CASES)
def test_tracking_scalar_path_equals_the_tensor_path(observer, pow2, dtype, qscheme):
    """On the CPU a tracking calibrator updates with numpy float32 scalars; CUDA uses tensor ops without host
    synchronisation. Both must give the same state and qparams, bit for bit."""
    g = torch.Generator().manual_seed(6)
    fq, _ = _calibrated_fq(observer, pow2, [torch.randn(3000, generator=g) * 2 + 0.3 for _ in range(3)],
                           dtype=dtype, qscheme=qscheme)
    fq(torch.randn(3000, generator=g))
    obs = fq.activation_post_process
    twin = pickle_copy(obs)
    for i in range(150):
        x = torch.randn(3000, generator=g) * (1 + i / 20) + (i % 7 - 3) * 0.4
        low, high = torch.aminmax(x)
        obs._update_batch_range_scalar(low.item(), high.item())
        twin._update_batch_range(low, high)
        assert torch.equal(obs.batch_range, twin.batch_range) and torch.equal(obs.batch_count, twin.batch_count)
        scale, zero_point = obs._tracked_qparams()
        assert (scale.item(), zero_point.item()) == obs.calculate_qparams_scalar()


def pickle_copy(module):
    import pickle

    return pickle.loads(pickle.dumps(module))


def _images(n, seed):
    """n images (4, 24, 40) whose ranges differ, so that which image comes first changes the running range."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 4, 24, 40, generator=g) * (0.5 + i % 4) + (i % 5 - 2) * 0.7 for i in range(n)]


@pytest.mark.parametrize("pow2", [False, True])
def test_histogram_mse_is_the_same_for_any_order_and_grouping_of_the_images(pow2):
    images = _images(30, 7)
    results = []
    for order, batch in ((range(30), 8), (reversed(range(30)), 5), ([(7 * i) % 30 for i in range(30)], 1)):
        obs = HistogramMSEObserver(pow2=pow2, samples_per_image=700, bins=512)
        xs = [images[i] for i in order]
        for k in range(0, len(xs), batch):
            obs(torch.cat(xs[k:k + batch]))
        results.append((obs.calculate_qparams(), obs._grid, obs.histogram.clone()))
    for (qparams, grid, hist) in results[1:]:
        assert torch.equal(qparams[0], results[0][0][0]) and torch.equal(qparams[1], results[0][0][1])
        assert grid == results[0][1] and torch.equal(hist, results[0][2])
    # each image stands for all its values (weights in 1/256ths, each image's rounded to its sample size), and its
    # extremes are counted exactly: the bins of the smallest and the largest value hold them
    e, origin = results[0][1]
    hist = results[0][2]
    data = torch.cat(images).reshape(-1)
    assert abs(int(hist.sum()) - 256 * data.numel()) <= 30 * 549 // 2  # 549 = 3840 values at a step of 7
    ends = (torch.stack(torch.aminmax(data)) * 2.0 ** -e).floor().to(torch.int64) - origin
    assert int(ends[0]) == 0 and hist[ends[0]] >= 256 and hist[ends[1]] >= 256


def test_histogram_mse_picks_the_best_power_of_two_of_the_full_data():
    """The search on bin centres chooses what the exact MSE over every value chooses among the same candidates."""
    torch.manual_seed(8)
    batches = [torch.distributions.StudentT(3.0).sample((4, 8, 32, 32)) * 1.5 + 0.4 for _ in range(3)]
    data = torch.cat([b.reshape(-1) for b in batches])
    obs = HistogramMSEObserver(pow2=True, samples_per_image=1 << 13)  # every value of each 8 x 32 x 32 image
    scale, zp = _calibrate(obs, batches)
    exact = obs._mse_search(data, torch.ones_like(data))
    assert (scale.item(), zp.item()) == (exact[0].item(), exact[1].item())
    assert obs.histogram.sum() == data.numel() * 256


@pytest.mark.parametrize("value", [0.0, 5.0, -1e-30])
def test_histogram_mse_widens_from_a_constant_first_batch(value):
    """A first batch of one value (a ReLU output of zeros) gives the finest grid; the next batch widens it by a huge
    exponent step, and the result equals observing that batch together with the first."""
    g = torch.Generator().manual_seed(9)
    later = torch.randn(2, 3, 8, 8, generator=g) * 4
    first = torch.full((2, 3, 8, 8), value)
    obs, together = HistogramMSEObserver(pow2=True), HistogramMSEObserver(pow2=True)
    obs(first)
    obs(later)
    together(torch.cat([first, later]))
    assert obs._grid == together._grid and torch.equal(obs.histogram, together.histogram)
    assert torch.equal(obs.calculate_qparams()[0], together.calculate_qparams()[0])


def _histogram_state(batches, **kw):
    obs = HistogramMSEObserver(**kw)
    for b in batches:
        obs(b)
    return obs.calculate_qparams(), obs._grid, obs.histogram.clone()


def _same_state(a, b):
    return torch.equal(a[0][0], b[0][0]) and torch.equal(a[0][1], b[0][1]) and a[1] == b[1] and torch.equal(a[2], b[2])


@pytest.mark.parametrize("holes", [1, 2])
def test_histogram_mse_order_free_with_non_finite_values(holes):
    """An image's NaN / inf values are dropped from that image alone: its other values count as in any batch."""
    g = torch.Generator().manual_seed(10)
    a, b = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) * 3
    a[0, 0, 0, :holes] = float("nan")
    a[0, 1, 1, 1] = float("inf")
    kw = {"samples_per_image": 16}
    reference = _histogram_state([a, b], **kw)
    for batches in ([torch.cat([a, b])], [torch.cat([b, a])], [b, a]):
        assert _same_state(_histogram_state(batches, **kw), reference)


def test_histogram_mse_bins_tiny_values_exactly_on_a_wide_grid():
    """A value far below the bin width still lands in the bin below zero, whichever grid it was first counted on."""
    small, big = torch.tensor([[-1e-33, 1.0]]), torch.tensor([[-1e15, 1e15]])
    kw = {"bins": 64, "samples_per_image": 16}
    assert _same_state(_histogram_state([small, big], **kw), _histogram_state([big, small], **kw))


def test_mse_calibrators_start_afresh_after_load_state_dict():
    """Loading state replaces min/max: what the observer had counted before is dropped with them."""
    for cls in (HistogramMSEObserver, MSEObserver):
        used, loaded = cls(), cls()
        used(torch.tensor([[-50.0, 50.0]]))
        loaded(torch.tensor([[1.0, 2.0]]))
        used.load_state_dict(loaded.state_dict())
        used(torch.tensor([[1.5, 1.7]]))
        fresh = cls()
        fresh.load_state_dict(loaded.state_dict())
        fresh(torch.tensor([[1.5, 1.7]]))
        assert torch.equal(used.calculate_qparams()[0], fresh.calculate_qparams()[0])
        assert 0 < float(used.calculate_qparams()[0]) < 0.01


@pytest.mark.parametrize("observer", [MSEObserver, HistogramMSEObserver])
def test_a_copied_calibrated_quantizer_tracks_from_its_calibrated_qparams(observer):
    """deepcopy, pickle and state_dict leave the search's working memory behind: tracking then starts from the
    qparams the fake quantizer holds, not from an empty search's (1, 0)."""
    import copy

    from bst.torch.ao.quantization import FakeQuantize

    g = torch.Generator().manual_seed(11)
    fq = FakeQuantize(observer=observer, pow2=True)
    fq.disable_fake_quant()
    for _ in range(3):
        fq(torch.randn(2, 3, 8, 8, generator=g) * 4)
    fq.enable_fake_quant()
    fq.disable_observer()
    scale, zero_point = fq.scale.clone(), fq.zero_point.clone()
    twin = copy.deepcopy(fq)
    twin.enable_observer()
    twin(torch.randn(2, 3, 8, 8, generator=g) * 4)
    assert twin.activation_post_process.tracking
    assert torch.equal(twin.activation_post_process.reference[:2], torch.cat([scale, zero_point.float()]))
    assert torch.equal(twin.scale, scale)  # the zero point follows the batch's minimum, as tracking does
