"""QConfig: which fake quantizer to build for a module's output (activation) and weight."""
from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable

import torch
import torch.nn as nn

from .fake_quant_ops import check_rounding
from .fake_quantize import FakeQuantize, FusedMovingAvgObsFakeQuantize, LearnableFakeQuantize
from .observer import (
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)
from .pow2 import check_pow2_rounding


class QConfig(namedtuple("QConfig", ["activation", "weight"])):
    """``QConfig(activation=..., weight=...)``: each a constructor (``X.with_args(...)``) or None.

    Module instances are refused, since every module that uses the qconfig needs its own quantizer.
    """

    __slots__ = ()

    def __new__(cls, activation: Callable[[], nn.Module] | None, weight: Callable[[], nn.Module] | None) -> QConfig:
        for name, value in (("activation", activation), ("weight", weight)):
            if isinstance(value, nn.Module) or (value is not None and not callable(value)):
                raise ValueError(f"{name}={value!r}: QConfig takes constructors such as "
                                 "FakeQuantize.with_args(...), not module instances")
        return super().__new__(cls, activation, weight)


def get_default_qat_qconfig(pow2: bool = False, pow2_rounding: str = "ceil", per_channel: bool = True,
                            learnable: bool = False, fused: bool = False,
                            activation_observer: Callable[..., ObserverBase] | None = None,
                            averaging_constant: float = 0.01, activation_dtype: torch.dtype = torch.quint8,
                            activation_qscheme: torch.qscheme = torch.per_tensor_affine,
                            rounding: str = "half_even") -> QConfig:
    """A QAT qconfig: 8-bit affine activations, 8-bit symmetric weights (zero point 0).

    * activations: moving-average min/max (``averaging_constant``) unless ``activation_observer`` (a
      constructor, e.g. ``MSEObserver``) is given; ``activation_dtype`` / ``activation_qscheme``.
    * weights: qint8 in [-128, 127], symmetric, per output channel unless ``per_channel=False``; their
      min/max follow the current weights (averaging constant 1), so weights are never clipped in ceil mode.
    * ``pow2``: every scale is 2**k (``pow2_rounding`` "ceil" never clips, "round" is nearest in log2).
    * ``learnable``: `LearnableFakeQuantize` (LSQ) for activations and weights.
    * ``fused``: `FusedMovingAvgObsFakeQuantize` (core fused op); linear scales only.
    * ``rounding``: "half_even" or "half_up", for every quantizer (see `fake_quantize`).
    """
    check_pow2_rounding(pow2_rounding)
    check_rounding(rounding)
    if fused and rounding != "half_even":
        raise ValueError(f"fused=True: the fused core op rounds half to even, not {rounding}")
    if fused and (pow2 or learnable):
        raise ValueError("fused=True: the fused core op supports neither pow2 nor learnable scales")
    if fused and activation_observer is not None:
        raise ValueError("fused=True: the fused core op has its own moving-average observer; drop activation_observer")
    quantizer = LearnableFakeQuantize if learnable else FusedMovingAvgObsFakeQuantize if fused else FakeQuantize
    mode = {"pow2": True, "pow2_rounding": pow2_rounding} if pow2 else {}
    if not fused:
        mode["rounding"] = rounding
    if activation_observer is None:
        act_observer = {"observer": MovingAverageMinMaxObserver, "averaging_constant": averaging_constant}
    else:
        act_observer = {"observer": activation_observer}
    activation = quantizer.with_args(**act_observer, dtype=activation_dtype, qscheme=activation_qscheme, **mode)
    if per_channel:
        weight = quantizer.with_args(observer=MovingAveragePerChannelMinMaxObserver, averaging_constant=1.0,
                                     ch_axis=0, dtype=torch.qint8, qscheme=torch.per_channel_symmetric,
                                     quant_min=-128, quant_max=127, **mode)
    else:
        weight = quantizer.with_args(observer=MovingAverageMinMaxObserver, averaging_constant=1.0, dtype=torch.qint8,
                                     qscheme=torch.per_tensor_symmetric, quant_min=-128, quant_max=127, **mode)
    return QConfig(activation=activation, weight=weight)


def get_default_calibration_qconfig(pow2: bool = False, pow2_rounding: str = "ceil", per_channel: bool = True,
                                    activation_observer: Callable[..., ObserverBase] = MinMaxObserver,
                                    rounding: str = "half_even") -> QConfig:
    """Plain min/max (or ``activation_observer``) statistics for a calibration pass; weights per channel."""
    check_pow2_rounding(pow2_rounding)
    mode = {"pow2": True, "pow2_rounding": pow2_rounding} if pow2 else {}
    mode["rounding"] = check_rounding(rounding)
    activation = FakeQuantize.with_args(observer=activation_observer, dtype=torch.quint8,
                                        qscheme=torch.per_tensor_affine, **mode)
    if per_channel:
        weight = FakeQuantize.with_args(observer=PerChannelMinMaxObserver, ch_axis=0, dtype=torch.qint8,
                                        qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127, **mode)
    else:
        weight = FakeQuantize.with_args(observer=MinMaxObserver, dtype=torch.qint8, qscheme=torch.per_tensor_symmetric,
                                        quant_min=-128, quant_max=127, **mode)
    return QConfig(activation=activation, weight=weight)
