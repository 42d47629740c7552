"""Quantization parameters: dtype/qscheme/range validation and (scale, zero_point) from min/max.

Non-power-of-two scales use the same formulas (and the same float32 operation order) as
``torch.ao.quantization``'s min/max observers, so both agree bit for bit:

* affine:    scale = (max(max, 0) - min(min, 0)) / (quant_max - quant_min), at least ``eps``;
             zero_point = clamp(quant_min - round(min(min, 0) / scale), quant_min, quant_max)
* symmetric: scale = max(|min|, |max|) / ((quant_max - quant_min) / 2), at least ``eps``;
             zero_point = 0 (signed), 128 (unsigned) or the midpoint of a custom unsigned range.

Power-of-two scales (``pow2=True``) are exactly ``2**k`` for an integer ``k``:

* ``pow2_rounding="round"``: k = round(log2(scale above)); the zero point is then recomputed.
* ``pow2_rounding="ceil"`` (no clipping): the smallest k whose grid covers the observed range,
  ``(quant_min - zp) * 2**k <= min(min, 0)`` and ``(quant_max - zp) * 2**k >= max(max, 0)``, with
  ``zp = quant_min - floor(min(min, 0) / 2**k)`` (affine) or the fixed symmetric zero point.
  This is decided in float64 on exact values, so it never clips by even one ulp.

Every function here is free of host synchronisation (no ``.item()``), so it is cheap on CUDA.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .pow2 import _SQRT_HALF, check_pow2_rounding

PER_TENSOR_QSCHEMES = (torch.per_tensor_affine, torch.per_tensor_symmetric)
PER_CHANNEL_QSCHEMES = (torch.per_channel_affine, torch.per_channel_symmetric)
SUPPORTED_QSCHEMES = PER_TENSOR_QSCHEMES + PER_CHANNEL_QSCHEMES

# the integer range each supported dtype can hold
DTYPE_RANGES = {
    torch.qint8: (-128, 127),
    torch.int8: (-128, 127),
    torch.quint8: (0, 255),
    torch.uint8: (0, 255),
}
UNSIGNED_DTYPES = (torch.quint8, torch.uint8)
DEFAULT_EPS = torch.finfo(torch.float32).eps  # 2**-23, itself a power of two


INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def bias_grid(weight_scale: torch.Tensor, input_scale: float) -> torch.Tensor:
    """The step of a conv's int32 accumulator, per output channel: input_scale * weight_scale."""
    return weight_scale.detach().float().reshape(-1) * input_scale


def bias_on_grid(bias: torch.Tensor, weight_scale: torch.Tensor, input_scale: float,
                 grid: torch.Tensor | None = None) -> torch.Tensor:
    """round_half_even(bias / (input_scale * weight_scale)): the int32 bias an integer conv adds to its
    accumulator, as float32 integers (not clamped; see ``INT32_MIN``/``INT32_MAX``). One formula for the
    eval-mode QAT convs, `convert` and every export, so they add the very same bias. ``grid``: `bias_grid`'s
    result when the caller has it already."""
    grid = bias_grid(weight_scale, input_scale) if grid is None else grid
    return torch.round(bias.detach().float() / grid)


def check_dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in DTYPE_RANGES:
        names = ", ".join(f"torch.{str(d).split('.')[-1]}" for d in DTYPE_RANGES)
        raise ValueError(f"dtype={dtype} is not supported; use one of {names}")
    return dtype


def check_qscheme(qscheme: torch.qscheme) -> torch.qscheme:
    if qscheme not in SUPPORTED_QSCHEMES:
        names = ", ".join(f"torch.{q}" for q in SUPPORTED_QSCHEMES)
        raise ValueError(f"qscheme={qscheme} is not supported; use one of {names}")
    return qscheme


def is_per_channel(qscheme: torch.qscheme) -> bool:
    return qscheme in PER_CHANNEL_QSCHEMES


def is_symmetric(qscheme: torch.qscheme) -> bool:
    return qscheme in (torch.per_tensor_symmetric, torch.per_channel_symmetric)


def resolve_quant_range(dtype: torch.dtype, quant_min: int | None = None, quant_max: int | None = None,
                        reduce_range: bool = False) -> tuple[int, int, bool]:
    """(quant_min, quant_max, customized) for dtype; custom ranges are validated against it."""
    check_dtype(dtype)
    lo, hi = DTYPE_RANGES[dtype]
    if (quant_min is None) != (quant_max is None):
        raise ValueError(f"quant_min={quant_min} and quant_max={quant_max}: give both or neither")
    customized = quant_min is not None
    if customized:
        for name, v in (("quant_min", quant_min), ("quant_max", quant_max)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise ValueError(f"{name}={v!r} must be an int")
        if quant_min >= quant_max:
            raise ValueError(f"quant_min={quant_min} must be less than quant_max={quant_max}")
        if not quant_min <= 0 <= quant_max:
            raise ValueError(f"quant_min={quant_min}, quant_max={quant_max}: the range must include 0")
        if quant_min < lo or quant_max > hi:
            raise ValueError(f"quant_min={quant_min}, quant_max={quant_max} exceed the range [{lo}, {hi}] "
                             f"of dtype {dtype}")
        lo, hi = quant_min, quant_max
    if reduce_range:
        lo, hi = lo // 2, hi // 2
    return lo, hi, customized


def symmetric_zero_point(dtype: torch.dtype, quant_min: int, quant_max: int, customized: bool) -> int:
    if dtype in UNSIGNED_DTYPES:
        return (quant_min + quant_max) // 2 if customized else 128
    return 0


def _float_scale(min_neg, max_pos, quant_min, quant_max, symmetric, eps):
    """Scale in float32, torch's operation order; where (max - min) overflows float32 (huge tensors)
    the same quotient taken term by term."""
    if symmetric:
        return torch.clamp_min(torch.maximum(-min_neg, max_pos) / (float(quant_max - quant_min) / 2), eps)
    levels = float(quant_max - quant_min)
    scale = torch.clamp_min((max_pos - min_neg) / levels, eps)
    return torch.where(torch.isfinite(scale), scale, max_pos / levels - min_neg / levels)


def _pow2_at_least(need):
    """Smallest power of two >= need (float64 tensor of positive normal numbers), exactly:
    need = m * 2**e with m in [0.5, 1), so the answer is need itself when m == 0.5, else 2**e = need / m
    (a correctly rounded division whose exact result is representable)."""
    mantissa, _ = torch.frexp(need)
    return torch.where(mantissa == 0.5, need, need / mantissa)


def _covering_pow2(min_neg, max_pos, quant_min, quant_max, symmetric, zero_point, eps):
    """Smallest power-of-two scale whose integer grid contains [min_neg, max_pos]; decided in float64
    on exact values (a float32 input difference and its quotient by the level count are exact enough
    that only the final coverage test can fail, and it is repeated exactly)."""
    lo, hi = min_neg.double(), max_pos.double()
    if symmetric:
        above, below = quant_max - zero_point, zero_point - quant_min
        need = hi / above if below <= 0 else torch.maximum(hi / above, lo / -below)
        s = _pow2_at_least(torch.clamp_min(need, eps))
        covers = hi <= above * s
        if below > 0:
            covers &= lo >= -below * s
        s = torch.where(covers, s, s * 2)
        return s.float(), torch.full_like(s, zero_point, dtype=torch.int32)
    s = _pow2_at_least(torch.clamp_min((hi - lo) / float(quant_max - quant_min), eps))
    zp = quant_min - torch.floor(lo / s)  # lowest grid point <= min; then check the top end
    s = torch.where((quant_max - zp) * s >= hi, s, s * 2)
    zp = quant_min - torch.floor(lo / s)
    return s.float(), zp.to(torch.int32)


def _nearest_pow2(scale):
    """2**round(log2(scale)) for positive float32 scales (exact)."""
    mantissa, _ = torch.frexp(scale)
    upper = scale / mantissa  # 2**e, exact
    return torch.where(mantissa.double() < _SQRT_HALF, upper * 0.5, upper)


def compute_qparams(min_val: torch.Tensor, max_val: torch.Tensor, *, quant_min: int, quant_max: int,
                    symmetric: bool, zero_point: int = 0, eps: float = DEFAULT_EPS,
                    pow2: bool = False, pow2_rounding: str = "ceil") -> tuple[torch.Tensor, torch.Tensor]:
    """(scale float32, zero_point int32) from running min/max (0-d per tensor, 1-d per channel).

    ``zero_point`` is the fixed zero point of symmetric schemes. Entries never observed (min > max,
    i.e. the initial +inf/-inf) get scale 1 and zero point 0, like torch. Written for few tensor ops:
    each one is a kernel launch on CUDA.
    """
    valid = min_val <= max_val
    min_neg = torch.clamp(min_val, max=0.0)  # unobserved +inf/-inf become 0: no NaN downstream
    max_pos = torch.clamp(max_val, min=0.0)
    if pow2 and check_pow2_rounding(pow2_rounding) == "ceil":
        scale, zp = _covering_pow2(min_neg, max_pos, quant_min, quant_max, symmetric, zero_point, eps)
    else:
        scale = _float_scale(min_neg, max_pos, quant_min, quant_max, symmetric, eps)
        if pow2:
            scale = _nearest_pow2(scale)
        if symmetric:
            zp = torch.full_like(scale, zero_point, dtype=torch.int32)
        else:
            zp = torch.clamp(quant_min - torch.round(min_neg / scale).to(torch.int32), quant_min, quant_max)
    scale = torch.where(valid, scale, 1.0)
    zp = torch.where(valid, zp, 0).to(torch.int32)
    if scale.dim() == 0:
        scale, zp = scale.reshape(1), zp.reshape(1)
    return scale, zp


# --- the same formulas on Python scalars ------------------------------------------------------------
# On the CPU a per-tensor quantizer's statistics are two numbers, and ~30 tensor ops on them cost more
# than the fake quantization itself. These mirror the tensor functions above operation for operation:
# numpy float32 scalars where torch computes in float32, Python floats where it computes in float64.
# The tests check that both give identical results.

_F32 = np.float32


def _pow2_at_least_scalar(need: float) -> float:
    mantissa, _ = math.frexp(need)
    return need if mantissa == 0.5 else need / mantissa


def _float_scale_scalar(min_neg, max_pos, quant_min, quant_max, symmetric, eps):
    with np.errstate(over="ignore", invalid="ignore"):
        if symmetric:
            return max(_F32(max(-min_neg, max_pos)) / _F32((quant_max - quant_min) / 2), _F32(eps))
        levels = _F32(quant_max - quant_min)
        scale = max((_F32(max_pos) - _F32(min_neg)) / levels, _F32(eps))
        if not np.isfinite(scale):
            scale = _F32(max_pos) / levels - _F32(min_neg) / levels
    return scale


def compute_qparams_scalar(min_val: float, max_val: float, *, quant_min: int, quant_max: int, symmetric: bool,
                           zero_point: int = 0, eps: float = DEFAULT_EPS, pow2: bool = False,
                           pow2_rounding: str = "ceil") -> tuple[float, int]:
    """`compute_qparams` for one (min, max) pair of Python floats: (scale float, zero_point int)."""
    if not min_val <= max_val:
        return 1.0, 0
    min_neg, max_pos = min(min_val, 0.0), max(max_val, 0.0)
    if pow2 and check_pow2_rounding(pow2_rounding) == "ceil":
        if symmetric:
            above, below = quant_max - zero_point, zero_point - quant_min
            need = max_pos / above if below <= 0 else max(max_pos / above, min_neg / -below)
            s = _pow2_at_least_scalar(max(need, eps))
            covers = max_pos <= above * s and (below <= 0 or min_neg >= -below * s)
            return float(_F32(s if covers else s * 2)), zero_point
        s = _pow2_at_least_scalar(max((max_pos - min_neg) / float(quant_max - quant_min), eps))
        if (quant_max - (quant_min - math.floor(min_neg / s))) * s < max_pos:
            s *= 2
        return float(_F32(s)), quant_min - math.floor(min_neg / s)
    scale = _float_scale_scalar(min_neg, max_pos, quant_min, quant_max, symmetric, eps)
    if pow2:
        mantissa, _ = math.frexp(float(scale))
        upper = float(scale) / mantissa
        scale = _F32(upper * 0.5 if mantissa < _SQRT_HALF else upper)
    if symmetric:
        return float(scale), zero_point
    zp = quant_min - int(np.rint(_F32(min_neg) / scale))
    return float(scale), min(max(zp, quant_min), quant_max)


# --- the same formulas on numpy arrays ----------------------------------------------------------------
# A per-channel quantizer on the CPU (weights: one scale per output channel, every training step) holds a few
# hundred numbers; numpy evaluates the ~30 steps of `compute_qparams` on them several times faster than tensor
# ops. Same dtypes and operation order as the tensor functions; the tests check that both agree exactly.

_F64 = np.float64


def _pow2_at_least_numpy(need: np.ndarray) -> np.ndarray:
    mantissa, _ = np.frexp(need)
    return np.where(mantissa == 0.5, need, need / mantissa)


def _covering_pow2_numpy(min_neg, max_pos, quant_min, quant_max, symmetric, zero_point, eps):
    lo, hi = min_neg.astype(_F64), max_pos.astype(_F64)
    if symmetric:
        above, below = quant_max - zero_point, zero_point - quant_min
        need = hi / above if below <= 0 else np.maximum(hi / above, lo / -below)
        s = _pow2_at_least_numpy(np.maximum(need, eps))
        covers = hi <= above * s
        if below > 0:
            covers &= lo >= -below * s
        s = np.where(covers, s, s * 2)
        return s.astype(_F32), np.full(s.shape, zero_point, dtype=np.int32)
    s = _pow2_at_least_numpy(np.maximum((hi - lo) / float(quant_max - quant_min), eps))
    zp = quant_min - np.floor(lo / s)
    s = np.where((quant_max - zp) * s >= hi, s, s * 2)
    zp = quant_min - np.floor(lo / s)
    return s.astype(_F32), zp.astype(np.int32)


def _float_scale_numpy(min_neg, max_pos, quant_min, quant_max, symmetric, eps):
    if symmetric:
        return np.maximum(np.maximum(-min_neg, max_pos) / _F32((quant_max - quant_min) / 2), _F32(eps))
    levels = _F32(quant_max - quant_min)
    scale = np.maximum((max_pos - min_neg) / levels, _F32(eps))
    return np.where(np.isfinite(scale), scale, max_pos / levels - min_neg / levels)


def compute_qparams_numpy(min_val: np.ndarray, max_val: np.ndarray, *, quant_min: int, quant_max: int,
                          symmetric: bool, zero_point: int = 0, eps: float = DEFAULT_EPS, pow2: bool = False,
                          pow2_rounding: str = "ceil") -> tuple[np.ndarray, np.ndarray]:
    """`compute_qparams` for 1-d float32 arrays: (scale float32, zero_point int32) arrays, at least one entry."""
    with np.errstate(all="ignore"):  # unobserved or non-finite entries are replaced at the end, as in torch
        valid = min_val <= max_val
        min_neg, max_pos = np.minimum(min_val, _F32(0)), np.maximum(max_val, _F32(0))
        if pow2 and check_pow2_rounding(pow2_rounding) == "ceil":
            scale, zp = _covering_pow2_numpy(min_neg, max_pos, quant_min, quant_max, symmetric, zero_point, eps)
        else:
            scale = _float_scale_numpy(min_neg, max_pos, quant_min, quant_max, symmetric, eps)
            if pow2:
                mantissa, _ = np.frexp(scale)
                upper = scale / mantissa
                scale = np.where(mantissa.astype(_F64) < _SQRT_HALF, upper * _F32(0.5), upper)
            if symmetric:
                zp = np.full(scale.shape, zero_point, dtype=np.int32)
            else:
                zp = np.clip(quant_min - np.rint(min_neg / scale).astype(np.int32), quant_min, quant_max)
        scale = np.where(valid, scale, _F32(1.0)).astype(_F32)
        zp = np.where(valid, zp, 0).astype(np.int32)
    return scale.reshape(-1), zp.reshape(-1)
