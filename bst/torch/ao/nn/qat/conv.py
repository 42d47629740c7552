"""QAT Conv2d: the weight goes through ``weight_fake_quant``; the output through
``activation_post_process`` once `prepare_qat` attached one (inside forward, no hook needed).

In eval mode, once `bst.torch.ao.quantization.freeze_qparams` has told a conv the scale of the quantizer
that feeds it (``input_scale``), the conv adds its bias on the int32 grid ``input_scale * weight_scale``,
as the integer kernel, `convert` and every export do. With power-of-two scales every product and sum
of such a conv is then exact in float32, so the PyTorch model, the integer reference and an exported
graph compute the same numbers whatever their summation order (a float bias leaves sums a rounding
away from a tie of the output quantizer, and two runtimes round such sums differently).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from bst.torch.ao.nn.intrinsic.modules import ConvReLU2d as FloatConvReLU2d
from bst.torch.ao.nn.intrinsic.modules import ConvReLU62d as FloatConvReLU62d
from bst.torch.ao.quantization.fake_quantize import fake_quant_enabled
from bst.torch.ao.quantization.qparams import INT32_MAX, INT32_MIN, bias_grid, bias_on_grid

if TYPE_CHECKING:
    from bst.torch.ao.quantization.qconfig import QConfig

ACTIVATIONS = {None: None, "relu": F.relu, "relu6": F.relu6}


def require_weight_qconfig(qconfig: QConfig | None, owner: str) -> QConfig:
    if qconfig is None or getattr(qconfig, "weight", None) is None:
        raise ValueError(f"qconfig={qconfig!r}: {owner} needs a qconfig with a weight fake-quantizer constructor")
    return qconfig


def set_input_scale(module: nn.Module, scale: float | None) -> None:
    """The per-tensor scale of the quantizer feeding QAT conv `module` (None: unknown, the bias stays float)."""
    module.input_scale = None if scale is None else float(scale)


def eval_bias(module: nn.Module, bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias an eval-mode QAT conv adds: on the int32 grid input_scale * weight_scale once its input scale is
    known and its weight is fake-quantized (straight-through gradient), else `bias` itself. Call it after
    ``weight_fake_quant`` ran in the same forward (a learned weight scale is synced there)."""
    input_scale = module.__dict__.get("input_scale")
    if bias is None or module.training or input_scale is None or not fake_quant_enabled(module.weight_fake_quant):
        return bias
    weight_scale = module.weight_fake_quant.scale
    grid = bias_grid(weight_scale, input_scale)
    q = bias_on_grid(bias, weight_scale, input_scale, grid).clamp(INT32_MIN, INT32_MAX)
    return bias + (q * grid - bias).detach()


def finish_output(module: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """Apply the module's activation, then its output quantizer if it has one."""
    act = ACTIVATIONS[module._activation]
    if act is not None:
        y = act(y)
    quantizer = module._modules.get("activation_post_process")
    return y if quantizer is None else quantizer(y)


class Conv2d(nn.Conv2d):
    """Conv2d with fake-quantized weight (and output, after prepare_qat)."""

    _float_module = nn.Conv2d
    _activation = None
    _quantizes_own_output = True  # prepare_qat needs no forward hook for the output quantizer

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: str | int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros",
                 qconfig: QConfig | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.qconfig = require_weight_qconfig(qconfig, type(self).__name__)
        self.weight_fake_quant = qconfig.weight()
        self.input_scale = None  # see set_input_scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_fake_quant(self.weight)
        return finish_output(self, self._conv_forward(x, weight, eval_bias(self, self.bias)))

    @classmethod
    def from_float(cls, mod: nn.Conv2d | nn.Sequential) -> Conv2d:
        """From an nn.Conv2d (or, for the ReLU subclasses, the fused float container) carrying ``qconfig``."""
        if type(mod) is not cls._float_module:
            raise ValueError(f"mod: {cls.__name__}.from_float takes a {cls._float_module.__name__}, "
                             f"got {type(mod).__name__}")
        qconfig = getattr(mod, "qconfig", None)
        conv = mod[0] if isinstance(mod, nn.Sequential) else mod
        qat = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, qconfig=qconfig,
                  device=conv.weight.device, dtype=conv.weight.dtype)
        qat.weight = conv.weight
        qat.bias = conv.bias
        qat.train(mod.training)
        return qat

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight, bias) of the equivalent float conv, before weight fake quantization."""
        bias = self.bias.detach() if self.bias is not None else None
        return self.weight.detach(), bias

    def to_float(self) -> nn.Conv2d | nn.Sequential:
        """Plain float modules computing this layer without quantization."""
        weight, bias = self.folded_weight_bias()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, bias is not None, self.padding_mode,
                         device=self.weight.device, dtype=self.weight.dtype)
        with torch.no_grad():
            conv.weight.copy_(weight)
            if bias is not None:
                conv.bias.copy_(bias)
        if self._activation == "relu":
            return FloatConvReLU2d(conv, nn.ReLU())
        if self._activation == "relu6":
            return FloatConvReLU62d(conv, nn.ReLU6())
        return conv
