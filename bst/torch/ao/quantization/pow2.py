"""Power-of-two scales: exact exponent extraction and exact construction of 2**k.

All decisions are made on the binary representation (``torch.frexp``), never on a floating
``log2`` whose rounding could turn ``2**k * (1 + ulp)`` into ``k`` and silently clip.
A scale ``s`` is a power of two when ``frexp(s).mantissa == 0.5``.
"""
from __future__ import annotations

import torch

POW2_ROUNDINGS = ("ceil", "round")

# float32 normal exponents: 2**-126 .. 2**127 are exact normal numbers
MIN_EXPONENT = -126
MAX_EXPONENT = 127

_SQRT_HALF = 0.7071067811865476  # mantissa threshold for round(log2(x)), compared in float64


def check_pow2_rounding(pow2_rounding: str) -> str:
    if pow2_rounding not in POW2_ROUNDINGS:
        raise ValueError(f"pow2_rounding={pow2_rounding!r} is not supported; use one of {POW2_ROUNDINGS}")
    return pow2_rounding


def log2_exponent(x: torch.Tensor, rounding: str = "ceil") -> torch.Tensor:
    """Integer k (int64) with 2**k >= x ('ceil') or k = round(log2 x) ('round'), for finite x > 0.

    Exact for every positive finite float: x = m * 2**e with m in [0.5, 1); ceil is e unless m == 0.5
    (then x is 2**(e-1) itself); round is e when log2(m) >= -0.5, i.e. m >= sqrt(1/2).
    """
    mantissa, exponent = torch.frexp(x)
    exponent = exponent.to(torch.int64)
    if rounding == "ceil":
        return exponent - (mantissa == 0.5).to(torch.int64)
    if rounding == "round":
        return exponent - (mantissa.to(torch.float64) < _SQRT_HALF).to(torch.int64)
    raise ValueError(f"rounding={rounding!r} is not supported; use one of {POW2_ROUNDINGS}")


def exp2_int(k: torch.Tensor) -> torch.Tensor:
    """2**k as float32, built from the IEEE-754 bits (exact), k clamped to the normal range."""
    k = k.to(torch.int32).clamp(MIN_EXPONENT, MAX_EXPONENT)
    return ((k + 127) << 23).view(torch.float32)


def is_pow2(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: x is a positive finite exact power of two."""
    mantissa, _ = torch.frexp(x)
    return torch.isfinite(x) & (x > 0) & (mantissa == 0.5)


def exponent_of_pow2(x: torch.Tensor) -> torch.Tensor:
    """k such that x == 2**k, for x that is known to be a power of two (int64)."""
    _, exponent = torch.frexp(x)
    return exponent.to(torch.int64) - 1


