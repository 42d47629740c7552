"""Fused QAT modules: Conv+BN with simulated BN folding, optionally + ReLU/ReLU6; Conv+ReLU/ReLU6.

Simulated folding (Jacob et al. 2018, Krishnamoorthi 2018), in the form torch.ao also uses:
the weight that gets fake-quantized is ``w * gamma / sqrt(running_var + eps)``, i.e. exactly the
folded inference weight; the conv output is divided back by that factor and goes through the live
BatchNorm, so training still sees batch statistics. After `freeze_bn_stats` BN is a fixed per-channel affine
map, and training runs the folded conv itself (weight and bias folded from the running statistics, as in eval):
the same function without the divide-and-multiply round trip, as TensorFlow's folding does once statistics
are frozen.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from bst.torch.ao.nn.intrinsic import modules as nni
from bst.torch.ao.nn.intrinsic.folding import bn_scale, fold_bn
from bst.torch.ao.nn.qat.conv import Conv2d as QATConv2d
from bst.torch.ao.nn.qat.conv import eval_bias, finish_output, require_weight_qconfig

if TYPE_CHECKING:
    from bst.torch.ao.quantization.qconfig import QConfig


class _DivideChannels(torch.autograd.Function):
    """``x / factor`` per channel (dim 1), with a leaner backward.

    Autograd's division backward allocates three activation-sized temporaries for d/d(factor)
    (``-grad * ((x / f) / f)`` then a sum); this evaluates the same expression, in the same order
    (so the gradients are bit-identical), from the saved output y = x / f, which BatchNorm keeps
    alive anyway, with one temporary updated in place."""

    @staticmethod
    def forward(ctx, x, factor):
        y = x / factor.reshape(1, -1, 1, 1)
        ctx.save_for_backward(y, factor)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, factor = ctx.saved_tensors
        grad_x = grad / factor.reshape(1, -1, 1, 1) if ctx.needs_input_grad[0] else None
        grad_factor = None
        if ctx.needs_input_grad[1]:
            t = y / factor.reshape(1, -1, 1, 1)
            grad_factor = -t.mul_(grad).sum(dim=(0, 2, 3))
        return grad_x, grad_factor


class ConvBn2d(nn.Conv2d):
    """Conv2d + BatchNorm2d for QAT with simulated BN folding."""

    _float_module = nni.ConvBn2d
    _activation = None
    _quantizes_own_output = True
    _state_attributes = ("freeze_bn",)  # not in the state_dict; see quantization.state.module_attributes

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: str | int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = False, padding_mode: str = "zeros",
                 eps: float = 1e-5, momentum: float = 0.1, freeze_bn: bool = False, qconfig: QConfig | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode,
                         device=device, dtype=dtype)
        self.qconfig = require_weight_qconfig(qconfig, type(self).__name__)
        self.bn = nn.BatchNorm2d(out_channels, eps, momentum, affine=True, track_running_stats=True,
                                 device=device, dtype=dtype)
        self.weight_fake_quant = qconfig.weight()
        self.input_scale = None  # see bst.torch.ao.nn.qat.conv.set_input_scale
        self.freeze_bn = freeze_bn if self.training else True
        if self.freeze_bn:
            self.bn.train(False)

    # --- BN statistics ---------------------------------------------------------------------------
    def freeze_bn_stats(self) -> ConvBn2d:
        """BN uses and keeps its running statistics (no batch statistics, no updates)."""
        self.freeze_bn = True
        self.bn.training = False
        return self

    def update_bn_stats(self) -> ConvBn2d:
        """BN normalises with batch statistics and updates its running ones (training mode)."""
        self.freeze_bn = False
        self.bn.training = True
        return self

    def train(self, mode: bool = True) -> ConvBn2d:
        self.training = mode
        for child in self.children():
            child.train(False if (child is self.bn and self.freeze_bn) else mode)
        return self

    # --- forward -----------------------------------------------------------------------------------
    def _bn_scale_factor(self):
        return bn_scale(self.bn)

    def _conv_bn(self, x):
        if not self.training or self.freeze_bn:
            # BN on its running statistics (inference, or training with frozen statistics): the deployed conv
            # itself, BN folded into weight and bias, so the fake-quant model computes what the exported QDQ graph
            # and integer kernels compute. In training the gradients reach gamma, beta and the weight through the
            # folding; dividing the conv output by the factor and multiplying it back in BN (the live form below)
            # is the same function with two more roundings and a backward over every output for gamma.
            weight, bias = self._folded()
            weight = self.weight_fake_quant(weight)
            return self._conv_forward(x, weight, eval_bias(self, bias))
        factor = self._bn_scale_factor()
        weight = self.weight_fake_quant(self.weight * factor.reshape(-1, 1, 1, 1))
        y = _DivideChannels.apply(self._conv_forward(x, weight, None), factor)
        if self.bias is not None:
            y = y + self.bias.reshape(1, -1, 1, 1)
        return self.bn(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return finish_output(self, self._conv_bn(x))

    # --- conversion --------------------------------------------------------------------------------
    @classmethod
    def from_float(cls, mod: nn.Sequential) -> ConvBn2d:
        """From the float fused container (conv, bn[, relu]) carrying ``qconfig``; shares its tensors."""
        if type(mod) is not cls._float_module:
            raise ValueError(f"mod: {cls.__name__}.from_float takes a {cls._float_module.__name__}, "
                             f"got {type(mod).__name__}")
        conv, bn = mod[0], mod[1]
        if not (bn.affine and bn.track_running_stats):
            raise ValueError(f"mod: {cls.__name__} needs BatchNorm2d(affine=True, track_running_stats=True)")
        qat = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, bn.eps, bn.momentum, False,
                  getattr(mod, "qconfig", None), device=conv.weight.device, dtype=conv.weight.dtype)
        qat.weight = conv.weight
        qat.bias = conv.bias
        qat.bn = bn
        qat.train(mod.training)
        return qat

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        return fold_bn(self.weight, self.bias, self.bn)

    def folded_weight_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, bias) with BN folded in, from its running statistics; the weight is the very tensor
        that ``weight_fake_quant`` sees in forward."""
        with torch.no_grad():
            weight, bias = fold_bn(self.weight, self.bias, self.bn)
        return weight.detach(), bias.detach()

    to_float = QATConv2d.to_float


class ConvBnReLU2d(ConvBn2d):
    _float_module = nni.ConvBnReLU2d
    _activation = "relu"


class ConvBnReLU62d(ConvBn2d):
    _float_module = nni.ConvBnReLU62d
    _activation = "relu6"


class ConvReLU2d(QATConv2d):
    _float_module = nni.ConvReLU2d
    _activation = "relu"


class ConvReLU62d(QATConv2d):
    _float_module = nni.ConvReLU62d
    _activation = "relu6"


def freeze_bn_stats(module: nn.Module) -> None:
    """For ``model.apply``: stop BN statistics in every fused Conv+BN QAT module."""
    if isinstance(module, ConvBn2d):
        module.freeze_bn_stats()


def update_bn_stats(module: nn.Module) -> None:
    """For ``model.apply``: resume BN statistics in every fused Conv+BN QAT module."""
    if isinstance(module, ConvBn2d):
        module.update_bn_stats()
