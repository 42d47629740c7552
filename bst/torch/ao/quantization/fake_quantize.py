"""Fake quantizers: an observer plus quantize-dequantize in float, with straight-through gradients.

Rounding is a property of each quantizer (``rounding``): "half_even" (default) is what torch's
fake-quant kernels (``nearbyint`` under the default rounding mode), ``torch.round`` and ONNX
QuantizeLinear do; "half_up" (floor(x + 1/2), ties towards +inf) is what shift hardware does when it
adds 2**(k-1) before an arithmetic right shift by k. The integer reference reproduces either with
shifts (`integer_reference.shift_round`).

Enable flags are uint8 buffers (``fake_quant_enabled``, ``observer_enabled``) so they travel with
``state_dict`` and DDP. Reading a CUDA buffer on every forward would synchronise the host, so each
flag's value is cached together with the tensor's version counter and re-read only after a write to
it (``fill_``, ``copy_``, ``flag[0] = 0``, ``load_state_dict``, a DDP broadcast all bump the version).

State for training code (see `state`): ``scale``, ``zero_point``, the flags, the observer's
``min_val``/``max_val`` and, for `LearnableFakeQuantize`, the parameter ``scale`` (linear mode) or
``log2_scale`` (power-of-two mode) are quantizer state: copy them in EMA, keep them out of weight decay.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

from .factory import with_args
from .fake_quant_ops import check_rounding, fake_quantize_per_channel, fake_quantize_per_tensor
from .observer import (
    FixedQParamsObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
)
from .pow2 import exp2_int, exponent_of_pow2, is_pow2, log2_exponent
from .qparams import is_per_channel, is_symmetric
from .state import QuantizerModule


class FakeQuantizeBase(QuantizerModule):
    """Enable flags (uint8 buffers, cached host-side by version) and the module-level switches."""

    with_args = classmethod(with_args)
    rounding = "half_even"  # class default: quantizers pickled before rounding was a property round half to even

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("fake_quant_enabled", torch.tensor([1], dtype=torch.uint8))
        self.register_buffer("observer_enabled", torch.tensor([1], dtype=torch.uint8))

    def _flag(self, name: str) -> bool:
        tensor = self._buffers[name]
        cache = self.__dict__.setdefault("_flag_cache", {})
        hit = cache.get(name)
        if hit is not None and hit[0] is tensor and hit[1] == tensor._version:
            return hit[2]
        value = bool(tensor[0])  # the one host read, after the flag was written
        cache[name] = (tensor, tensor._version, value)
        return value

    def __getstate__(self):  # pickling / deepcopy: the cache refers to the old tensors
        state = self.__dict__.copy()
        state.pop("_flag_cache", None)
        return state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        incoming = state_dict.get(prefix + "scale")
        if getattr(self, "pow2", False) and incoming is not None and not bool(is_pow2(incoming.float()).all()):
            raise ValueError(f"state_dict[{prefix + 'scale'!r}] = {incoming.flatten()[:4].tolist()}... is not a power "
                             "of two although this quantizer has pow2=True; was quantizer state averaged (EMA)? "
                             "Copy it instead (bst.torch.ao.quantization.copy_quantizer_state_)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _observe(self, x, quantize: bool):
        """Show x to the observer; a calibrator starts tracking its calibrated qparams on the first forward
        with fake quantization on (see `calibrators`)."""
        obs = self.activation_post_process
        if quantize and not getattr(obs, "tracking", True):
            obs.begin_tracking(None if self.__dict__.get("_stale") else (self.scale, self.zero_point))
        obs(x.detach())

    def enable_fake_quant(self, enabled: bool = True) -> FakeQuantizeBase:
        self.fake_quant_enabled.fill_(1 if enabled else 0)
        return self

    def disable_fake_quant(self) -> FakeQuantizeBase:
        return self.enable_fake_quant(False)

    def enable_observer(self, enabled: bool = True) -> FakeQuantizeBase:
        self.observer_enabled.fill_(1 if enabled else 0)
        return self

    def disable_observer(self) -> FakeQuantizeBase:
        return self.enable_observer(False)


def _check_range(quant_min, quant_max):
    if quant_min is not None and quant_max is not None and quant_min > quant_max:
        raise ValueError(f"quant_min={quant_min} must not exceed quant_max={quant_max}")


class FakeQuantize(FakeQuantizeBase):
    """Observer (``activation_post_process``) + ``torch.fake_quantize_per_{tensor,channel}_affine``.

    Each forward with the observer enabled updates its statistics and copies its qparams into the
    ``scale`` / ``zero_point`` buffers (which take per-channel shapes, also on ``load_state_dict``).
    Observers that are expensive to evaluate (``compute_qparams_lazily``, e.g. `MSEObserver`) are
    only evaluated when the qparams are needed: fake quantization on, ``disable_observer()``,
    ``calculate_qparams()`` or ``state_dict()``.
    """

    _resizable = ("scale", "zero_point")

    def __init__(self, observer: Callable[..., ObserverBase] = MovingAverageMinMaxObserver,
                 quant_min: int | None = None, quant_max: int | None = None, rounding: str = "half_even",
                 **observer_kwargs) -> None:
        super().__init__()
        _check_range(quant_min, quant_max)
        self.rounding = check_rounding(rounding)
        if quant_min is not None or quant_max is not None:
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        self.activation_post_process = observer(**observer_kwargs)
        obs = self.activation_post_process
        if not isinstance(obs, ObserverBase):
            raise ValueError(f"observer={observer!r} must build a bst.torch.ao.quantization observer")
        self.quant_min, self.quant_max = obs.quant_min, obs.quant_max
        self.dtype, self.qscheme = obs.dtype, obs.qscheme
        self.is_per_channel = is_per_channel(obs.qscheme)
        self.ch_axis = getattr(obs, "ch_axis", -1)
        self.register_buffer("scale", torch.tensor([1.0]))
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))
        self._stale = False

    @property
    def pow2(self) -> bool:
        return self.activation_post_process.pow2

    @property
    def symmetric(self) -> bool:
        return is_symmetric(self.qscheme)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.activation_post_process.calculate_qparams()

    @torch.no_grad()
    def refresh_qparams(self) -> None:
        """Copy the observer's current qparams into ``scale`` / ``zero_point``."""
        obs = self.activation_post_process
        if self.scale.device.type == "cpu" and self.scale.numel() == 1 and hasattr(obs, "calculate_qparams_scalar"):
            scale, zero_point = obs.calculate_qparams_scalar()
            self.scale.fill_(scale)
            self.zero_point.fill_(zero_point)
            self._stale = False
            return
        if self.scale.device.type == "cpu" and hasattr(obs, "calculate_qparams_numpy"):
            scale, zero_point = (torch.from_numpy(a) for a in obs.calculate_qparams_numpy())
        else:
            scale, zero_point = self.calculate_qparams()
        if self.scale.shape != scale.shape:
            self.scale.resize_(scale.shape)
            self.zero_point.resize_(zero_point.shape)
        self.scale.copy_(scale)
        self.zero_point.copy_(zero_point)
        self._stale = False

    def disable_observer(self) -> FakeQuantizeBase:
        if self.__dict__.get("_stale"):
            self.refresh_qparams()
        return super().disable_observer()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.__dict__.get("_stale"):
            self.refresh_qparams()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _fake_quantize(self, x):
        if self.is_per_channel:
            return fake_quantize_per_channel(x, self.scale, self.zero_point, self.ch_axis % x.dim(),
                                             self.quant_min, self.quant_max, self.rounding)
        return fake_quantize_per_tensor(x, self.scale, self.zero_point, self.quant_min, self.quant_max, self.rounding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantize = self._flag("fake_quant_enabled")
        if self._flag("observer_enabled"):
            self._observe(x, quantize)
            if quantize or not getattr(self.activation_post_process, "compute_qparams_lazily", False):
                self.refresh_qparams()
            else:
                self._stale = True
        if quantize:
            if self.__dict__.get("_stale"):
                self.refresh_qparams()
            x = self._fake_quantize(x)
        return x

    def extra_repr(self) -> str:
        return (f"fake_quant_enabled={int(self.fake_quant_enabled[0])}, "
                f"observer_enabled={int(self.observer_enabled[0])}, "
                f"quant_min={self.quant_min}, quant_max={self.quant_max}, dtype={self.dtype}, qscheme={self.qscheme}, "
                f"ch_axis={self.ch_axis}, pow2={self.pow2}, rounding={self.rounding}, scale={self.scale}, "
                f"zero_point={self.zero_point}")


class FixedQParamsFakeQuantize(FakeQuantize):
    """Fake quantization with constant qparams from a `FixedQParamsObserver` (nothing is observed)."""

    def __init__(self, observer: Callable[..., FixedQParamsObserver], rounding: str = "half_even") -> None:
        super().__init__(observer=observer, rounding=rounding)
        if not isinstance(self.activation_post_process, FixedQParamsObserver):
            raise ValueError(f"observer={observer!r} must build a FixedQParamsObserver")
        self.refresh_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fake_quantize(x) if self._flag("fake_quant_enabled") else x


class FusedMovingAvgObsFakeQuantize(FakeQuantize):
    """Moving-average min/max observation and fake quantization in one core op,
    ``torch.fused_moving_avg_obs_fake_quant`` (no host synchronisation on CUDA).

    The op computes its own qparams (ATen's ``ChooseQuantizationParams``: the zero point is chosen
    by the smaller rounding error, symmetric schemes use max(|min|/128, max/127)-style nudging and a
    zero range gives scale 0.1), which can differ in the last bits from the observers' formula used
    by `FakeQuantize`; ``scale``/``zero_point`` always hold what the op used. Power-of-two scales
    are not possible inside the op: use `FakeQuantize` for ``pow2=True``.
    A batch with non-finite values leaves min/max, scale and zero point as they were.
    """

    def __init__(self, observer: Callable[..., ObserverBase] = MovingAverageMinMaxObserver,
                 quant_min: int | None = None, quant_max: int | None = None, rounding: str = "half_even",
                 **observer_kwargs) -> None:
        if rounding != "half_even":
            raise ValueError(f"rounding={rounding!r}: the fused core op rounds half to even; use FakeQuantize")
        super().__init__(observer, quant_min, quant_max, **observer_kwargs)
        obs = self.activation_post_process
        if type(obs) not in (MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver):
            raise ValueError(f"observer={type(obs).__name__}: FusedMovingAvgObsFakeQuantize needs "
                             "MovingAverageMinMaxObserver or MovingAveragePerChannelMinMaxObserver")
        if obs.pow2:
            raise ValueError("pow2=True: the fused op computes its own (linear) scales; use FakeQuantize for pow2")
        self.register_buffer("_always_on", torch.tensor([1], dtype=torch.uint8), persistent=False)

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.scale, self.zero_point

    def refresh_qparams(self) -> None:  # the op keeps scale/zero_point current itself
        self._stale = False

    @torch.no_grad()
    def _restore_if_not_finite(self, saved):
        obs = self.activation_post_process
        current = (obs.min_val, obs.max_val, self.scale, self.zero_point)
        ok = torch.isfinite(obs.min_val) & torch.isfinite(obs.max_val) & torch.isfinite(self.scale)
        defaults = (float("inf"), float("-inf"), 1.0, 0)
        for now, before, default in zip(current, saved, defaults):
            before = before if before.shape == now.shape else torch.full_like(now, default)
            now.copy_(torch.where(ok.reshape(now.shape), now, before))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantize, observe = self._flag("fake_quant_enabled"), self._flag("observer_enabled")
        if not (quantize or observe):
            return x
        obs = self.activation_post_process
        saved = None
        if observe:
            saved = tuple(t.clone() for t in (obs.min_val, obs.max_val, self.scale, self.zero_point))
        # while calibrating (observer on, fake quant off) the op must still update scale/zero_point
        out = torch.fused_moving_avg_obs_fake_quant(
            x, self.observer_enabled, self.fake_quant_enabled if quantize else self._always_on,
            obs.min_val, obs.max_val, self.scale, self.zero_point, obs.averaging_constant,
            self.quant_min, self.quant_max, self.ch_axis if self.is_per_channel else 0,
            self.is_per_channel, self.symmetric)
        if saved is not None:
            self._restore_if_not_finite(saved)
        return out if quantize else x


class _STE(torch.autograd.Function):
    """``fn(x)`` forward (a rounding: torch.round half to even, half up, torch.ceil), identity backward (the
    straight-through estimator)."""

    @staticmethod
    def forward(ctx, x, fn):
        return fn(x)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _round_half_up(x: torch.Tensor) -> torch.Tensor:
    return torch.floor(x + 0.5)


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by a constant (LSQ's step-size gradient scale)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class LearnableFakeQuantize(FakeQuantizeBase):
    """Fake quantization with a learned step size (LSQ, Esser et al. 2020).

    Gradients: inputs get the straight-through mask; the scale gets LSQ's
    ``round(x/s) - x/s`` inside the range and ``quant_min - zp`` / ``quant_max - zp`` outside, times
    ``grad_factor`` (``"lsq"``: 1/sqrt(numel * quant_max); a float; or None for 1).

    Linear mode: the parameter is ``scale``. Power-of-two mode (observer built with ``pow2=True``):
    the parameter is ``log2_scale``; the forward uses ``2**ceil/round(log2_scale)`` (the observer's
    ``pow2_rounding``) with a straight-through estimator, and the ``scale`` buffer always holds that
    exact power of two. The zero point is not learned: it comes from the observer while it is enabled.
    While the observer is enabled it overwrites the learned values (calibration); disable it to learn.
    Build the optimizer after the first forward when quantizing per channel (the parameter is resized).
    """

    _resizable = ("scale", "zero_point", "log2_scale")

    def __init__(self, observer: Callable[..., ObserverBase] = MovingAverageMinMaxObserver,
                 quant_min: int | None = None, quant_max: int | None = None, scale: float = 1.0,
                 grad_factor: str | float | None = "lsq", rounding: str = "half_even", **observer_kwargs) -> None:
        super().__init__()
        _check_range(quant_min, quant_max)
        self.rounding = check_rounding(rounding)
        if quant_min is not None or quant_max is not None:
            observer_kwargs.update(quant_min=quant_min, quant_max=quant_max)
        self.activation_post_process = observer(**observer_kwargs)
        obs = self.activation_post_process
        if not isinstance(obs, ObserverBase):
            raise ValueError(f"observer={observer!r} must build a bst.torch.ao.quantization observer")
        if not (isinstance(grad_factor, (int, float)) and grad_factor > 0) and grad_factor not in ("lsq", None):
            raise ValueError(f"grad_factor={grad_factor!r} must be 'lsq', None or a positive number")
        self.grad_factor = grad_factor
        self.quant_min, self.quant_max = obs.quant_min, obs.quant_max
        self.dtype, self.qscheme = obs.dtype, obs.qscheme
        self.is_per_channel = is_per_channel(obs.qscheme)
        self.ch_axis = getattr(obs, "ch_axis", -1)
        init = torch.tensor([float(scale)])
        if not (torch.isfinite(init).all() and init.item() > 0):
            raise ValueError(f"scale={scale} must be a positive finite number")
        if obs.pow2:
            k = log2_exponent(init, obs.pow2_rounding)
            self.log2_scale = nn.Parameter(k.float())
            self.register_buffer("scale", exp2_int(k))
        else:
            self.scale = nn.Parameter(init)
        self.register_buffer("zero_point", torch.tensor([0], dtype=torch.int32))

    @property
    def pow2(self) -> bool:
        return self.activation_post_process.pow2

    @property
    def symmetric(self) -> bool:
        return is_symmetric(self.qscheme)

    def _rounded_log2(self):
        rounder = torch.ceil if self.activation_post_process.pow2_rounding == "ceil" else torch.round
        return _STE.apply(self.log2_scale, rounder)

    @torch.no_grad()
    def _sync_pow2_scale(self):
        k = self._rounded_log2().to(torch.int64)
        if self.scale.shape != k.shape:
            self.scale.resize_(k.shape)
        self.scale.copy_(exp2_int(k))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pow2:
            self._sync_pow2_scale()
        return self.scale.detach(), self.zero_point

    @torch.no_grad()
    def _load_observed(self):
        scale, zero_point = self.activation_post_process.calculate_qparams()
        target = self.log2_scale if self.pow2 else self.scale
        value = exponent_of_pow2(scale).float() if self.pow2 else scale
        if target.shape != value.shape:
            target.data = torch.empty(value.shape, dtype=target.dtype, device=target.device)
        target.copy_(value)
        if self.zero_point.shape != zero_point.shape:
            self.zero_point.resize_(zero_point.shape)
        self.zero_point.copy_(zero_point)
        if self.pow2:
            self._sync_pow2_scale()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.pow2:
            self._sync_pow2_scale()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _step_size(self, x):
        if self.pow2:
            k = self._rounded_log2()
            soft = torch.exp2(k)  # carries d scale / d log2_scale = scale * ln 2 through the STE
            scale = exp2_int(k.detach().to(torch.int64)) + (soft - soft.detach())
            self._sync_pow2_scale()
        else:
            with torch.no_grad():
                self.scale.clamp_(min=torch.finfo(torch.float32).eps)
            scale = self.scale
        factor = self.grad_factor
        if factor == "lsq":
            levels = max(abs(self.quant_max), abs(self.quant_min), 1)
            per_scale = x.numel() / scale.numel()
            factor = 1.0 / math.sqrt(per_scale * levels)
        if factor is not None and factor != 1:
            scale = _ScaleGrad.apply(scale, float(factor))
        return scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._flag("observer_enabled"):
            self._observe(x, self._flag("fake_quant_enabled"))
            self._load_observed()
        if not self._flag("fake_quant_enabled"):
            return x
        scale = self._step_size(x)
        zero_point = self.zero_point.to(scale.dtype)
        if self.is_per_channel:
            shape = [1] * x.dim()
            shape[self.ch_axis % x.dim()] = -1
            scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
        rounder = _round_half_up if self.rounding == "half_up" else torch.round
        q = torch.clamp(_STE.apply(x * (1.0 / scale), rounder) + zero_point, self.quant_min, self.quant_max)
        return (q - zero_point) * scale

    def extra_repr(self) -> str:
        name = "log2_scale" if self.pow2 else "scale"
        return (f"learned={name}, quant_min={self.quant_min}, quant_max={self.quant_max}, qscheme={self.qscheme}, "
                f"pow2={self.pow2}, rounding={self.rounding}, grad_factor={self.grad_factor}")


@torch.no_grad()
def qparams_of(quantizer: FakeQuantizeBase) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(scale float32, zero_point int32, quant_min, quant_max) that `quantizer` applies with its observer off: a
    lazily computed observer's pending qparams are evaluated first, a learned power-of-two scale is synced.
    The public way to read a quantizer's frozen qparams (copies, safe to keep)."""
    if isinstance(quantizer, LearnableFakeQuantize):
        scale, zero_point = quantizer.calculate_qparams()
        if not quantizer.pow2:  # its forward clamps the learned scale to eps
            scale = scale.clamp(min=torch.finfo(torch.float32).eps)
    else:
        if quantizer.__dict__.get("_stale"):
            quantizer.refresh_qparams()
        scale, zero_point = quantizer.scale, quantizer.zero_point
    return (scale.detach().clone().float(), zero_point.detach().clone().to(torch.int32), quantizer.quant_min,
            quantizer.quant_max)


@torch.no_grad()
def frozen_qparams(quantizer: nn.Module | None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(scale float32, zero_point int32) that fake quantizer `quantizer` applies in eval mode with its observer off,
    or None when it is not a fake quantizer with fake quantization on. Per-tensor qparams come back 0-d, per-channel
    ones 1-d. A scale that is not a positive finite number (an uncalibrated quantizer) raises ValueError."""
    if not fake_quant_enabled(quantizer):
        return None
    scale, zero_point = qparams_of(quantizer)[:2]
    if not bool((torch.isfinite(scale) & (scale > 0)).all()):
        raise ValueError(f"scale={scale.flatten()[:4].tolist()}: not a positive finite number; calibrate the quantizer "
                         "first")
    if not quantizer.is_per_channel:
        if scale.numel() != 1:
            raise ValueError(f"scale: a per-tensor quantizer holds {scale.numel()} scales")
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return scale, zero_point


def output_quantizer(module: nn.Module) -> FakeQuantizeBase | None:
    """The output quantizer `prepare_qat` attached to `module` (its ``activation_post_process``), or None."""
    quantizer = module._modules.get("activation_post_process")
    return quantizer if isinstance(quantizer, FakeQuantizeBase) else None


def fake_quant_enabled(quantizer: nn.Module | None) -> bool:
    """True when `quantizer` is a fake quantizer with fake quantization on."""
    return isinstance(quantizer, FakeQuantizeBase) and quantizer._flag("fake_quant_enabled")


def enable_fake_quant(module: nn.Module) -> None:
    """For ``model.apply``: turn fake quantization on."""
    if isinstance(module, FakeQuantizeBase):
        module.enable_fake_quant()


def disable_fake_quant(module: nn.Module) -> None:
    """For ``model.apply``: pass tensors through unchanged (observers may still record)."""
    if isinstance(module, FakeQuantizeBase):
        module.disable_fake_quant()


def enable_observer(module: nn.Module) -> None:
    """For ``model.apply``: let observers update statistics and qparams."""
    if isinstance(module, FakeQuantizeBase):
        module.enable_observer()


def disable_observer(module: nn.Module) -> None:
    """For ``model.apply``: freeze qparams (scales stop changing)."""
    if isinstance(module, FakeQuantizeBase):
        module.disable_observer()

