"""Observers: record statistics of a tensor and turn them into (scale, zero_point).

All observers take ``pow2=True`` to produce power-of-two scales (see `qparams` for the ceil and
round rules) and keep their statistics in float32 buffers that survive ``.half()`` (see `state`).

Non-finite inputs: a batch whose minimum or maximum is NaN or +-inf (that is, a tensor holding any
NaN, or an infinity on that side) is ignored by the min/max observers: the running statistics keep
their previous values (per channel for the per-channel observers). This is decided without a host
synchronisation, so it costs nothing on CUDA. The first batch therefore never poisons a scale either.

Per-tensor observers on the CPU update their two statistics with Python scalars (float32 rounding
reproduced with numpy) instead of a dozen tiny tensor ops, per-channel ones with numpy arrays; the tests check
that these paths and the tensor ops agree exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .factory import with_args
from .pow2 import check_pow2_rounding, is_pow2
from .qparams import (
    DEFAULT_EPS,
    PER_CHANNEL_QSCHEMES,
    PER_TENSOR_QSCHEMES,
    check_qscheme,
    compute_qparams,
    compute_qparams_numpy,
    compute_qparams_scalar,
    is_symmetric,
    resolve_quant_range,
    symmetric_zero_point,
)
from .state import QuantizerModule


def min_max(x: torch.Tensor, dims: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(min, max) of float tensor `x`, over all of it or over `dims` (the rest kept), NaN propagated. On the CPU two
    reductions: torch.aminmax takes longer there than amin and amax together (several times longer along a dim)."""
    if dims is None:
        return (x.amin(), x.amax()) if x.device.type == "cpu" else torch.aminmax(x)
    if x.device.type == "cpu":
        return x.amin(dim=dims), x.amax(dim=dims)
    kept = [d for d in range(x.dim()) if d not in dims]
    return torch.aminmax(x.permute(*kept, *dims).flatten(len(kept)), dim=-1)


class ObserverBase(QuantizerModule):
    """Common configuration: dtype, qscheme, integer range, eps and the power-of-two mode."""

    with_args = classmethod(with_args)
    _qschemes = PER_TENSOR_QSCHEMES

    def __init__(self, dtype: torch.dtype = torch.quint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 eps: float = DEFAULT_EPS, pow2: bool = False, pow2_rounding: str = "ceil") -> None:
        super().__init__()
        check_qscheme(qscheme)
        if qscheme not in self._qschemes:
            raise ValueError(f"qscheme={qscheme} does not fit {type(self).__name__}; it takes "
                             f"{', '.join(str(q) for q in self._qschemes)}")
        self.dtype = dtype
        self.qscheme = qscheme
        self.reduce_range = bool(reduce_range)
        self.quant_min, self.quant_max, self.has_customized_qrange = resolve_quant_range(
            dtype, quant_min, quant_max, reduce_range)
        eps = float(torch.tensor(eps, dtype=torch.float32))
        if not eps > 0:
            raise ValueError(f"eps={eps} must be a positive float32 number")
        self.eps = eps
        self.pow2 = bool(pow2)
        self.pow2_rounding = check_pow2_rounding(pow2_rounding)

    @property
    def symmetric(self) -> bool:
        return is_symmetric(self.qscheme)

    @property
    def zero_point_if_symmetric(self) -> int:
        return symmetric_zero_point(self.dtype, self.quant_min, self.quant_max, self.has_customized_qrange)

    def _qparams_from(self, min_val, max_val):
        return compute_qparams(min_val, max_val, quant_min=self.quant_min, quant_max=self.quant_max,
                               symmetric=self.symmetric, zero_point=self.zero_point_if_symmetric, eps=self.eps,
                               pow2=self.pow2, pow2_rounding=self.pow2_rounding)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def extra_repr(self) -> str:
        mode = f", pow2={self.pow2_rounding}" if self.pow2 else ""
        return (f"dtype={self.dtype}, qscheme={self.qscheme}, quant_min={self.quant_min}, "
                f"quant_max={self.quant_max}{mode}")


class MinMaxObserver(ObserverBase):
    """Running minimum and maximum over all batches (per tensor)."""

    def __init__(self, dtype: torch.dtype = torch.quint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 eps: float = DEFAULT_EPS, pow2: bool = False, pow2_rounding: str = "ceil") -> None:
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _combine(self, cur_min, cur_max):
        return torch.min(cur_min, self.min_val), torch.max(cur_max, self.max_val)

    def _combine_scalar(self, cur_min: float, cur_max: float):
        return min(cur_min, self.min_val.item()), max(cur_max, self.max_val.item())

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        cur_min, cur_max = min_max(x.detach().to(torch.float32))
        if cur_min.device.type == "cpu":  # two numbers: Python arithmetic beats a dozen tensor ops
            self._update_scalar(cur_min.item(), cur_max.item())
        else:
            self._update_tensor(cur_min, cur_max)
        return x

    def _update_scalar(self, lo: float, hi: float):
        if math.isfinite(lo) and math.isfinite(hi):
            lo, hi = self._combine_scalar(lo, hi)
            self.min_val.fill_(lo)
            self.max_val.fill_(hi)

    def _update_tensor(self, cur_min, cur_max):  # no host synchronisation
        new_min, new_max = self._combine(cur_min, cur_max)
        finite = torch.isfinite(cur_min) & torch.isfinite(cur_max)
        self.min_val.copy_(torch.where(finite, new_min, self.min_val))
        self.max_val.copy_(torch.where(finite, new_max, self.max_val))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._qparams_from(self.min_val, self.max_val)

    def calculate_qparams_scalar(self) -> tuple[float, int]:
        """(scale, zero_point) as Python numbers, equal to `calculate_qparams` (cheaper on the CPU)."""
        return compute_qparams_scalar(self.min_val.item(), self.max_val.item(), quant_min=self.quant_min,
                                      quant_max=self.quant_max, symmetric=self.symmetric,
                                      zero_point=self.zero_point_if_symmetric, eps=self.eps, pow2=self.pow2,
                                      pow2_rounding=self.pow2_rounding)

    def reset_min_max_vals(self) -> None:
        self.min_val.fill_(float("inf"))
        self.max_val.fill_(float("-inf"))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, min_val={self.min_val}, max_val={self.max_val}"


def _moving_average(running_min, running_max, cur_min, cur_max, c, xp=torch):
    """running + c * (current - running) (torch's operation order), or current where nothing was
    observed yet (min and max are set together, so an infinite running min marks both). `xp`: torch for
    tensors, numpy for float32 arrays (then `c` a numpy float32, as torch rounds the scalar)."""
    if c == 1.0:  # exactly the current range (weights): no history to blend, no rounding
        return cur_min, cur_max
    first = xp.isinf(running_min)
    new_min = running_min + c * (cur_min - running_min)
    new_max = running_max + c * (cur_max - running_max)
    # near the float32 limit the difference overflows: keep the running range rather than store inf/NaN
    ok = xp.isfinite(new_min) & xp.isfinite(new_max)
    return (xp.where(first, cur_min, xp.where(ok, new_min, running_min)),
            xp.where(first, cur_max, xp.where(ok, new_max, running_max)))


def _check_averaging_constant(averaging_constant):
    if not 0 < averaging_constant <= 1:
        raise ValueError(f"averaging_constant={averaging_constant} must be in (0, 1]")
    return float(averaging_constant)


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of the per-batch minimum and maximum (per tensor):
    ``running + c * (batch - running)`` in float32 like torch; ``c = 1`` is exactly the latest batch."""

    def __init__(self, averaging_constant: float = 0.01, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = DEFAULT_EPS,
                 pow2: bool = False, pow2_rounding: str = "ceil") -> None:
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        self.averaging_constant = _check_averaging_constant(averaging_constant)

    def _combine(self, cur_min, cur_max):
        return _moving_average(self.min_val, self.max_val, cur_min, cur_max, self.averaging_constant)

    def _combine_scalar(self, cur_min: float, cur_max: float):
        run_min, run_max = self.min_val.item(), self.max_val.item()
        if math.isinf(run_min) or self.averaging_constant == 1.0:
            return cur_min, cur_max
        c = np.float32(self.averaging_constant)  # torch rounds the Python scalar to the tensor's float32
        with np.errstate(over="ignore", invalid="ignore"):
            new_min = float(np.float32(run_min) + c * (np.float32(cur_min) - np.float32(run_min)))
            new_max = float(np.float32(run_max) + c * (np.float32(cur_max) - np.float32(run_max)))
        if not (math.isfinite(new_min) and math.isfinite(new_max)):  # overflow: keep the running range
            return run_min, run_max
        return new_min, new_max


class PerChannelMinMaxObserver(ObserverBase):
    """Running minimum and maximum of each slice along ``ch_axis`` (weights: ``ch_axis=0``)."""

    _qschemes = PER_CHANNEL_QSCHEMES
    _resizable = ("min_val", "max_val")

    def __init__(self, ch_axis: int = 0, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_channel_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = DEFAULT_EPS,
                 pow2: bool = False, pow2_rounding: str = "ceil") -> None:
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        if isinstance(ch_axis, bool) or not isinstance(ch_axis, int):
            raise ValueError(f"ch_axis={ch_axis!r} must be an int")
        self.ch_axis = ch_axis
        self.register_buffer("min_val", torch.tensor([]))
        self.register_buffer("max_val", torch.tensor([]))

    def _axis(self, x):
        if not -x.dim() <= self.ch_axis < x.dim():
            raise ValueError(f"ch_axis={self.ch_axis} is out of range for a {x.dim()}-d tensor "
                             f"of shape {tuple(x.shape)}")
        return self.ch_axis % x.dim()

    def _combine(self, cur_min, cur_max):
        return torch.min(cur_min, self.min_val), torch.max(cur_max, self.max_val)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == 0:
            return x
        axis = self._axis(x)
        values = x.detach().to(torch.float32)
        if values.dim() == 1:  # each element is its own channel
            cur_min, cur_max = values, values
        else:
            cur_min, cur_max = min_max(values, tuple(d for d in range(values.dim()) if d != axis))
        channels = cur_min.numel()
        if self.min_val.numel() == 0:  # resized in place: DDP and optimizers hold these tensor objects
            self.min_val.resize_(channels).fill_(float("inf"))
            self.max_val.resize_(channels).fill_(float("-inf"))
        elif self.min_val.numel() != channels:
            raise ValueError(f"ch_axis={self.ch_axis}: the tensor has {channels} channels but this observer "
                             f"has seen {self.min_val.numel()}")
        if cur_min.device.type == "cpu" and self.min_val.dtype == torch.float32:
            self._update_numpy(cur_min.numpy(), cur_max.numpy())
        else:
            self._update_tensor(cur_min, cur_max)
        return x

    def _update_tensor(self, cur_min, cur_max):  # no host synchronisation
        new_min, new_max = self._combine(cur_min, cur_max)
        finite = torch.isfinite(cur_min) & torch.isfinite(cur_max)
        self.min_val.copy_(torch.where(finite, new_min, self.min_val))
        self.max_val.copy_(torch.where(finite, new_max, self.max_val))

    def _combine_numpy(self, cur_min: np.ndarray, cur_max: np.ndarray):
        return np.minimum(cur_min, self.min_val.numpy()), np.maximum(cur_max, self.max_val.numpy())

    def _update_numpy(self, cur_min: np.ndarray, cur_max: np.ndarray):
        """The tensor update on the CPU with numpy arrays (a few hundred channels: numpy's per-call cost is a
        fraction of a tensor op's); the same float32 arithmetic, so the same bits."""
        with np.errstate(all="ignore"):
            new_min, new_max = self._combine_numpy(cur_min, cur_max)
            finite = np.isfinite(cur_min) & np.isfinite(cur_max)
            self.min_val.copy_(torch.from_numpy(np.where(finite, new_min, self.min_val.numpy())))
            self.max_val.copy_(torch.from_numpy(np.where(finite, new_max, self.max_val.numpy())))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.min_val.numel() == 0:
            device = self.min_val.device
            return torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
        return self._qparams_from(self.min_val, self.max_val)

    def calculate_qparams_numpy(self) -> tuple[np.ndarray, np.ndarray]:
        """`calculate_qparams` as numpy arrays, for an observer on the CPU (the same numbers, cheaper)."""
        if self.min_val.numel() == 0:
            return np.ones(1, dtype=np.float32), np.zeros(1, dtype=np.int32)
        return compute_qparams_numpy(self.min_val.numpy(), self.max_val.numpy(), quant_min=self.quant_min,
                                     quant_max=self.quant_max, symmetric=self.symmetric,
                                     zero_point=self.zero_point_if_symmetric, eps=self.eps, pow2=self.pow2,
                                     pow2_rounding=self.pow2_rounding)

    def reset_min_max_vals(self) -> None:
        self.min_val.resize_(0)
        self.max_val.resize_(0)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, ch_axis={self.ch_axis}, min_val={self.min_val}, max_val={self.max_val}"


class MovingAveragePerChannelMinMaxObserver(PerChannelMinMaxObserver):
    """Per-channel exponential moving average of the per-batch minimum and maximum."""

    def __init__(self, averaging_constant: float = 0.01, ch_axis: int = 0, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_channel_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = DEFAULT_EPS,
                 pow2: bool = False, pow2_rounding: str = "ceil") -> None:
        super().__init__(ch_axis, dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        self.averaging_constant = _check_averaging_constant(averaging_constant)

    def _combine(self, cur_min, cur_max):
        return _moving_average(self.min_val, self.max_val, cur_min, cur_max, self.averaging_constant)

    def _combine_numpy(self, cur_min, cur_max):
        return _moving_average(self.min_val.numpy(), self.max_val.numpy(), cur_min, cur_max,
                               np.float32(self.averaging_constant), xp=np)


class FixedQParamsObserver(ObserverBase):
    """Always reports the given scale and zero point (e.g. a known output range such as sigmoid's)."""

    def __init__(self, scale: float, zero_point: int, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, quant_min: int = 0, quant_max: int = 255,
                 pow2: bool = False) -> None:
        super().__init__(dtype, qscheme, False, quant_min, quant_max, DEFAULT_EPS, pow2, "ceil")
        scale_t = torch.tensor([float(scale)], dtype=torch.float32)
        if not (torch.isfinite(scale_t).all() and scale_t.item() > 0):
            raise ValueError(f"scale={scale} must be a positive finite number")
        if pow2 and not bool(is_pow2(scale_t).all()):
            raise ValueError(f"scale={scale} is not a power of two (2**k) although pow2=True")
        if (isinstance(zero_point, bool) or not isinstance(zero_point, int)
                or not self.quant_min <= zero_point <= self.quant_max):
            raise ValueError(f"zero_point={zero_point!r} must be an int in [{self.quant_min}, {self.quant_max}]")
        self.register_buffer("scale", scale_t)
        self.register_buffer("zero_point", torch.tensor([zero_point], dtype=torch.int32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, scale={self.scale.item()}, zero_point={self.zero_point.item()}"
