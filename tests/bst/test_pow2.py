"""Power-of-two scales: exactness, no clipping in ceil mode, robustness to any range (hypothesis)."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bst.torch.ao.quantization import (
    FakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    PerChannelMinMaxObserver,
    is_pow2,
)
from bst.torch.ao.quantization.integer_reference import shift_round
from bst.torch.ao.quantization.observer import min_max
from bst.torch.ao.quantization.pow2 import exp2_int, log2_exponent
from bst.torch.ao.quantization.qparams import compute_qparams, compute_qparams_numpy

FLOAT32_MAX = float(torch.finfo(torch.float32).max)
finite32 = st.floats(min_value=-FLOAT32_MAX, max_value=FLOAT32_MAX, allow_nan=False, width=32)
positive32 = st.floats(min_value=float(torch.finfo(torch.float32).tiny), max_value=FLOAT32_MAX, width=32)
SCHEMES = [  # (dtype, qscheme, quant_min, quant_max, symmetric zero point)
    (torch.quint8, torch.per_tensor_affine, 0, 255, 0),
    (torch.qint8, torch.per_tensor_affine, -128, 127, 0),
    (torch.qint8, torch.per_tensor_symmetric, -128, 127, 0),
    (torch.quint8, torch.per_tensor_symmetric, 0, 255, 128),
    (torch.qint8, torch.per_tensor_affine, -8, 7, 0),
]
fast = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(positive32)
def test_log2_exponent_is_exact(x):
    t = torch.tensor([x], dtype=torch.float32)
    value = float(t)  # the float32 value actually tested
    k_ceil = int(log2_exponent(t, "ceil"))
    assert 2.0 ** k_ceil >= value > 2.0 ** (k_ceil - 1)
    k_round = int(log2_exponent(t, "round"))
    assert abs(math.log2(value) - k_round) <= 0.5 + 1e-12


def test_exp2_int_builds_exact_powers():
    k = torch.arange(-126, 128)
    s = exp2_int(k)
    assert s.dtype == torch.float32
    assert all(float(v) == 2.0 ** int(e) for v, e in zip(s, k))
    assert bool(is_pow2(s).all())
    assert not bool(is_pow2(torch.tensor([3.0, 0.0, -2.0, float("inf"), float("nan"), 0.75])).any())


def _check_grid(scale, zp, lo, hi, qmin, qmax, ceil):
    s = float(scale)
    assert math.isfinite(s) and s > 0 and math.frexp(s)[0] == 0.5, s
    assert qmin <= int(zp) <= qmax
    if ceil:  # exact float64 arithmetic: the integer grid covers the observed range
        assert (qmin - int(zp)) * s <= min(lo, 0.0)
        assert (qmax - int(zp)) * s >= max(hi, 0.0)


@fast
@given(finite32, finite32, st.sampled_from(SCHEMES), st.sampled_from(["ceil", "round"]))
def test_pow2_qparams_any_range(a, b, scheme, rounding):
    dtype, qscheme, qmin, qmax, zero = scheme
    lo, hi = min(a, b), max(a, b)
    symmetric = qscheme == torch.per_tensor_symmetric
    scale, zp = compute_qparams(torch.tensor(lo), torch.tensor(hi), quant_min=qmin, quant_max=qmax,
                                symmetric=symmetric, zero_point=zero, pow2=True, pow2_rounding=rounding)
    _check_grid(scale, zp, lo, hi, qmin, qmax, rounding == "ceil")


@fast
@given(st.lists(finite32, min_size=1, max_size=40), st.sampled_from(SCHEMES), st.sampled_from(["ceil", "round"]))
def test_pow2_observer_on_tensors(values, scheme, rounding):
    dtype, qscheme, qmin, qmax, _ = scheme
    x = torch.tensor(values, dtype=torch.float32)
    obs = MinMaxObserver(dtype=dtype, qscheme=qscheme, quant_min=qmin, quant_max=qmax, pow2=True,
                         pow2_rounding=rounding)
    obs(x)
    scale, zp = obs.calculate_qparams()
    _check_grid(scale, zp, float(x.min()), float(x.max()), qmin, qmax, rounding == "ceil")
    if rounding == "ceil":  # nothing is clipped: fake quantization errs by at most half a step
        s, z = float(scale), int(zp)  # in float64: near float32's maximum the grid itself overflows float32
        q = torch.clamp(torch.round(x.double() / s) + z, qmin, qmax)
        assert bool((((q - z) * s - x.double()).abs() <= s / 2).all())


@pytest.mark.parametrize("x", [
    torch.zeros(16), torch.full((16,), 3.0), torch.full((16,), -1e-30), torch.tensor([1e38, -1e38, 3.0]),
    torch.tensor([1e-40, 2e-45, 0.0]), torch.tensor([FLOAT32_MAX, -FLOAT32_MAX]),
])
@pytest.mark.parametrize("rounding", ["ceil", "round"])
def test_pow2_edge_tensors(x, rounding):
    for obs in (MovingAverageMinMaxObserver(pow2=True, pow2_rounding=rounding),
                MinMaxObserver(dtype=torch.qint8, qscheme=torch.per_tensor_symmetric, pow2=True,
                               pow2_rounding=rounding)):
        obs(x)
        obs(x * 0.5)
        scale, zp = obs.calculate_qparams()
        assert bool(is_pow2(scale).all()) and torch.isfinite(scale).all()
        _check_grid(scale, zp, float(obs.min_val), float(obs.max_val), obs.quant_min, obs.quant_max, rounding == "ceil")


def test_pow2_scale_stays_exact_through_moving_average_updates():
    torch.manual_seed(0)
    fq = FakeQuantize(observer=MovingAverageMinMaxObserver, averaging_constant=0.3, pow2=True)
    seen = set()
    for i in range(30):
        fq(torch.randn(64) * (1 + i % 7) ** 2)
        assert bool(is_pow2(fq.scale).all())
        seen.add(float(fq.scale))
    assert len(seen) > 1  # the exponent really follows the statistics


def test_pow2_per_channel_ceil_covers_each_channel():
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.logspace(-6, 6, 6).reshape(-1, 1, 1, 1)
    obs = PerChannelMinMaxObserver(dtype=torch.qint8, qscheme=torch.per_channel_symmetric, quant_min=-128,
                                   quant_max=127, pow2=True)
    obs(w)
    scale, zp = obs.calculate_qparams()
    assert scale.shape == (6,) and bool(is_pow2(scale).all()) and bool((zp == 0).all())
    fq = torch.fake_quantize_per_channel_affine(w.double(), scale, zp, 0, -128, 127)
    assert bool(((fq - w.double()).abs() <= scale.double().reshape(-1, 1, 1, 1) / 2).all())
    # ceil is the smallest such power: with half the scale, [-64 s, 63.5 s] misses each channel's extreme
    # value, unless the scale sits at the eps floor (2**-23)
    half_clips = (w.flatten(1).amax(1) > 63.5 * scale) | (w.flatten(1).amin(1) < -64 * scale)
    assert bool((half_clips | (scale == 2.0 ** -23)).all())


def test_round_mode_picks_nearest_power():
    lo, hi = torch.tensor(0.0), torch.tensor(255 * 0.7)  # linear scale 0.7: log2 = -0.51 -> 2**-1
    scale, _ = compute_qparams(lo, hi, quant_min=0, quant_max=255, symmetric=False, pow2=True, pow2_rounding="round")
    assert float(scale) == 0.5
    scale, _ = compute_qparams(lo, hi, quant_min=0, quant_max=255, symmetric=False, pow2=True, pow2_rounding="ceil")
    assert float(scale) == 1.0


@fast
@given(st.lists(st.integers(min_value=-(2 ** 40), max_value=2 ** 40), min_size=1, max_size=50),
       st.integers(min_value=-8, max_value=30))
def test_shift_round_is_round_half_even(values, shift):
    acc = torch.tensor(values, dtype=torch.int64)
    got = shift_round(acc, shift)
    exact = torch.round(acc.double() * 2.0 ** -shift)  # exact in float64 for these magnitudes
    assert torch.equal(got, exact.to(torch.int64))


def test_shift_round_ties_match_fake_quant():
    acc = torch.arange(-40, 41, dtype=torch.int64)
    fq = torch.fake_quantize_per_tensor_affine(acc.float() * 0.25, torch.tensor([1.0]),
                                               torch.tensor([0], dtype=torch.int32), -1000, 1000)
    assert torch.equal(shift_round(acc, 2), fq.to(torch.int64))  # includes .5 ties both ways


@fast
@given(finite32, finite32, st.sampled_from(SCHEMES),
       st.sampled_from([(False, "ceil"), (True, "ceil"), (True, "round")]))
def test_scalar_and_tensor_qparams_agree_exactly(a, b, scheme, mode):
    """The CPU shortcut (Python scalars) and the device path (tensor ops) are the same formulas."""
    from bst.torch.ao.quantization.qparams import compute_qparams_scalar

    _, qscheme, qmin, qmax, zero = scheme
    pow2, rounding = mode
    kwargs = dict(quant_min=qmin, quant_max=qmax, symmetric=qscheme == torch.per_tensor_symmetric, zero_point=zero,
                  pow2=pow2, pow2_rounding=rounding)
    lo, hi = min(a, b), max(a, b)
    scale, zp = compute_qparams(torch.tensor(lo), torch.tensor(hi), **kwargs)
    s, z = compute_qparams_scalar(float(torch.tensor(lo)), float(torch.tensor(hi)), **kwargs)
    assert float(scale) == s and int(zp) == z


@fast
@given(st.lists(st.tuples(finite32, finite32), min_size=1, max_size=6), st.sampled_from([0.01, 0.3, 1.0]))
def test_scalar_and_tensor_observer_updates_agree_exactly(batches, c):
    cpu_path = MovingAverageMinMaxObserver(averaging_constant=c, pow2=True)
    tensor_path = MovingAverageMinMaxObserver(averaging_constant=c, pow2=True)
    for a, b in batches:
        lo, hi = torch.tensor(min(a, b)), torch.tensor(max(a, b))
        cpu_path._update_scalar(float(lo), float(hi))
        tensor_path._update_tensor(lo, hi)
        assert torch.equal(cpu_path.min_val, tensor_path.min_val) and torch.equal(cpu_path.max_val, tensor_path.max_val)
    scale, zp = tensor_path.calculate_qparams()
    assert (scale.item(), zp.item()) == cpu_path.calculate_qparams_scalar()



def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.view(torch.int32), b.view(torch.int32))


# pairs of float32 ends: any finite values, plus the unobserved (inf, -inf) and reversed ends of never-seen channels
ends32 = st.one_of(st.tuples(finite32, finite32).map(sorted), st.just((float("inf"), float("-inf"))),
                   st.tuples(finite32, finite32).map(lambda p: sorted(p, reverse=True)))


@fast
@given(st.lists(ends32, min_size=1, max_size=12), st.sampled_from(SCHEMES),
       st.sampled_from([(False, "ceil"), (True, "ceil"), (True, "round")]))
def test_numpy_and_tensor_qparams_agree_exactly(pairs, scheme, mode):
    """The per-channel CPU shortcut (numpy arrays) computes the tensor formulas to the bit, never-seen channels
    included."""
    _, qscheme, qmin, qmax, zero = scheme
    pow2, rounding = mode
    kwargs = dict(quant_min=qmin, quant_max=qmax, symmetric=qscheme == torch.per_tensor_symmetric, zero_point=zero,
                  pow2=pow2, pow2_rounding=rounding)
    lo = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    hi = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    scale, zp = compute_qparams(lo, hi, **kwargs)
    s, z = compute_qparams_numpy(lo.numpy(), hi.numpy(), **kwargs)
    assert _same_bits(scale, torch.from_numpy(s)) and torch.equal(zp, torch.from_numpy(z))


special32 = st.one_of(finite32, st.sampled_from([float("inf"), float("-inf"), float("nan"), 0.0, -0.0]))


@fast
@given(st.lists(st.lists(special32, min_size=8, max_size=8), min_size=1, max_size=5),
       st.sampled_from([None, 0.01, 0.3, 1.0]), st.booleans())
def test_per_channel_numpy_and_tensor_updates_agree_exactly(batches, c, pow2):
    """Per-channel observers on the CPU update with numpy; the tensor update (other devices) gives the same values
    (torch itself picks either zero's sign for min(-0.0, 0.0)) and the same qparams to the bit, with non-finite
    batches skipped channel by channel."""
    def make():
        kwargs = dict(ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric, pow2=pow2)
        obs = PerChannelMinMaxObserver(**kwargs) if c is None else \
            MovingAveragePerChannelMinMaxObserver(averaging_constant=c, **kwargs)
        obs.min_val.resize_(4).fill_(float("inf"))
        obs.max_val.resize_(4).fill_(float("-inf"))
        return obs

    cpu_path, tensor_path = make(), make()
    for batch in batches:
        lo, hi = min_max(torch.tensor(batch, dtype=torch.float32).reshape(2, 4), (0,))  # 4 channels of 2 values
        cpu_path._update_numpy(lo.numpy(), hi.numpy())
        tensor_path._update_tensor(lo, hi)
        assert torch.equal(cpu_path.min_val, tensor_path.min_val) and torch.equal(cpu_path.max_val, tensor_path.max_val)
    scale, zp = tensor_path.calculate_qparams()
    s, z = cpu_path.calculate_qparams_numpy()
    assert _same_bits(scale, torch.from_numpy(s)) and torch.equal(zp, torch.from_numpy(z))


def test_min_max_equals_aminmax():
    """Two reductions on the CPU (faster than torch.aminmax there) give aminmax's values, NaN included, over the
    whole tensor or over all dims but the channel axis."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 7, 9, generator=g)
    for whole in (x, x[:, 1:4], x.transpose(1, 3)):
        assert torch.equal(torch.stack(min_max(whole)), torch.stack(torch.aminmax(whole)))
    lo, hi = min_max(x, (0, 2, 3))
    ref = torch.aminmax(x.transpose(0, 1).flatten(1), dim=1)
    assert torch.equal(lo, ref.min) and torch.equal(hi, ref.max)
    x[1, 2, 3, 4] = float("nan")
    assert all(math.isnan(float(v)) for v in min_max(x))
    lo, hi = min_max(x, (0, 2, 3))
    assert math.isnan(float(lo[2])) and math.isnan(float(hi[2])) and bool(torch.isfinite(lo[[0, 1, 3, 4]]).all())

def test_moving_average_overflow_never_stores_nan():
    """Found by hypothesis: blending ranges near the float32 limit overflowed into inf, then NaN."""
    for update in ("_update_scalar", "_update_tensor"):
        obs = MovingAverageMinMaxObserver(averaging_constant=0.01, pow2=True)
        for a, b in [(0.0, 2.9495377760520625e+38), (-4.532857917452741e+37, -4.532857917452741e+37), (0.0, 0.0)]:
            lo, hi = min(a, b), max(a, b)
            getattr(obs, update)(*((lo, hi) if update == "_update_scalar" else (torch.tensor(lo), torch.tensor(hi))))
        assert torch.isfinite(obs.min_val) and torch.isfinite(obs.max_val)
        scale, _ = obs.calculate_qparams()
        assert torch.isfinite(scale).all() and bool(is_pow2(scale).all())
