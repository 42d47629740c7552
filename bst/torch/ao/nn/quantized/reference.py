"""Converted (quantized) modules in reference form.

Each holds what an integer kernel needs: int8 weights, int32 bias, weight / input / output scales and
zero points. On float tensors they compute the fake-quantized result (weights dequantized, bias on
its int32 grid, output fake-quantized); on `QTensor` inputs (see `integer_mode` below)
they run the integer-only reference; under ``torch.onnx.export`` they write their ONNX form
(QuantizeLinear / DequantizeLinear, int8 weight and int32 bias initializers; see `onnx_form`).
Scales stay float32 through ``.half()`` like all quantizer state.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import torch
import torch.nn.functional as F

import bst.torch.ao.quantization.integer_reference as iref
from bst.torch.ao.quantization.fake_quant_ops import round_
from bst.torch.ao.quantization.fake_quantize import FakeQuantizeBase, fake_quant_enabled, output_quantizer, qparams_of
from bst.torch.ao.quantization.qparams import INT32_MAX, INT32_MIN, bias_on_grid
from bst.torch.ao.quantization.state import QuantizerModule

from . import onnx_form

if TYPE_CHECKING:
    from bst.torch.ao.nn.quantized.functional_modules import FloatFunctional
    from bst.torch.ao.quantization.stubs import DeQuantStub, QuantStub

_ACTIVATIONS = {None: None, "relu": F.relu, "relu6": F.relu6}


class _OutputQParams(QuantizerModule):
    """Output quantization parameters: one scale and zero point (``output_axis`` None), or one per channel along
    ``output_axis``; ``output_scale`` is None for a float output."""

    output_rounding = "half_even"

    def _set_output(self, qparams, axis=None, rounding="half_even"):
        self.output_axis = axis
        self.output_rounding = rounding
        if qparams is None:
            self.output_scale = None
            self.output_zero_point = None
            self.output_quant_min = self.output_quant_max = None
            return
        scale, zero_point, qmin, qmax = qparams
        if axis is None and scale.numel() != 1:
            raise ValueError(f"output scale: per-tensor quantization expected, got {scale.numel()} scales")
        self.register_buffer("output_scale", scale.reshape(-1))
        self.register_buffer("output_zero_point", zero_point.reshape(-1))
        self.output_quant_min, self.output_quant_max = qmin, qmax

    def _quantize_output(self, y):
        if self.output_scale is None:
            return y
        axis = None if self.output_axis is None else self.output_axis % y.dim()
        return onnx_form.quantize_dequantize(y, self.output_scale.to(y.device), self.output_zero_point.to(y.device),
                                             self.output_quant_min, self.output_quant_max, axis, self.output_rounding,
                                             f"{type(self).__name__} output quantizer")


class Quantize(_OutputQParams):
    """Converted QuantStub: fake-quantizes its float input, or emits a `QTensor` in integer mode. Also the
    converted form of a fake quantizer no other converted module takes over (`from_fake_quant`)."""

    def __init__(self, qparams: tuple[torch.Tensor, torch.Tensor, int, int] | None,
                 rounding: str = "half_even", axis: int | None = None) -> None:
        super().__init__()
        self._set_output(qparams, axis, rounding=rounding)
        self.integer_output = False

    @classmethod
    def from_stub(cls, stub: QuantStub) -> Quantize:
        fq = stub.activation_post_process
        return cls(qparams_of(fq), fq.rounding)

    @classmethod
    def from_fake_quant(cls, fq: FakeQuantizeBase) -> Quantize:
        """The frozen quantize-dequantize of fake quantizer `fq`; with its fake quantization off, the identity."""
        if not fake_quant_enabled(fq):
            return cls(None)
        return cls(qparams_of(fq), fq.rounding, fq.ch_axis if fq.is_per_channel else None)

    def forward(self, x: torch.Tensor | iref.QTensor) -> torch.Tensor | iref.QTensor:
        if isinstance(x, iref.QTensor):
            return x
        if self.integer_output:
            return iref.quantize(x, self.output_scale, int(self.output_zero_point), self.output_quant_min,
                                 self.output_quant_max, self.output_rounding)
        return self._quantize_output(x)


class DeQuantize(torch.nn.Module):
    """Converted DeQuantStub: a `QTensor` back to float; float tensors pass unchanged."""

    def forward(self, x: torch.Tensor | iref.QTensor) -> torch.Tensor:
        return x.dequantize() if isinstance(x, iref.QTensor) else x

    @classmethod
    def from_stub(cls, stub: DeQuantStub) -> DeQuantize:
        return cls()


class Conv2d(_OutputQParams):
    """Quantized Conv2d (+ReLU/ReLU6), BN already folded.

    Buffers: ``weight_int8`` (int8), ``weight_scale`` / ``weight_zero_point`` (per output channel or
    one), ``bias`` (float, folded), ``bias_int32`` (on the grid ``input_scale * weight_scale``; None when
    the input qparams are unknown), ``input_scale`` / ``input_zero_point`` (from the quantizer that
    produced this layer's input while `convert` traced the model), ``output_scale`` / ``output_zero_point`` (one,
    or one per output channel when ``output_axis`` is 1: a model output such as a detection head's, whose channels
    have different ranges; on shift hardware that is a requantizing shift per channel).
    """

    def __init__(self, weight_int8: torch.Tensor, weight_scale: torch.Tensor, weight_zero_point: torch.Tensor,
                 weight_quant_range: tuple[int, int], bias: torch.Tensor | None,
                 input_qparams: tuple[torch.Tensor, torch.Tensor] | None,
                 output_qparams: tuple[torch.Tensor, torch.Tensor, int, int] | None,
                 stride: tuple[int, int], padding: str | tuple[int, int], dilation: tuple[int, int], groups: int,
                 padding_mode: str = "zeros", activation: str | None = None, output_axis: int | None = None,
                 output_rounding: str = "half_even") -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation={activation!r} is not supported; use None, 'relu' or 'relu6'")
        self.register_buffer("weight_int8", weight_int8.to(torch.int8))
        self.register_buffer("weight_scale", weight_scale.float().reshape(-1))
        self.register_buffer("weight_zero_point", weight_zero_point.to(torch.int32).reshape(-1))
        self.weight_quant_min, self.weight_quant_max = weight_quant_range
        self.register_buffer("bias", None if bias is None else bias.float())
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.padding_mode = padding_mode
        self.activation = activation
        if input_qparams is None:
            self.input_scale = self.input_zero_point = self.bias_int32 = None
        else:
            in_scale, in_zero_point = input_qparams[0].reshape(1), input_qparams[1].reshape(1)
            self.register_buffer("input_scale", in_scale)
            self.register_buffer("input_zero_point", in_zero_point)
            self.register_buffer("bias_int32", None if bias is None else self._bias_on_grid(float(in_scale)))
        if output_axis not in (None, 1):
            raise ValueError(f"output_axis={output_axis}: a conv output is quantized per tensor or per channel (1)")
        self._set_output(output_qparams, output_axis, output_rounding)

    @property
    def in_channels(self) -> int:
        return self.weight_int8.shape[1] * self.groups

    @property
    def out_channels(self) -> int:
        return self.weight_int8.shape[0]

    def _bias_on_grid(self, input_scale: float) -> torch.Tensor:
        """round_half_even(bias / (input_scale * weight_scale)) as int32."""
        q = bias_on_grid(self.bias, self.weight_scale, input_scale)
        if bool(((q < INT32_MIN) | (q > INT32_MAX)).any()):
            raise ValueError("bias: does not fit int32 on the grid input_scale * weight_scale "
                             f"(input_scale={input_scale})")
        return q.to(torch.int32)

    def integer_bias(self, input_scale: float) -> torch.Tensor | None:
        """The int32 bias for an input of scale `input_scale` (the stored one when it matches)."""
        if self.bias is None:
            return None
        if self.input_scale is not None:
            if float(self.input_scale) != float(input_scale):
                raise ValueError(f"input_scale={input_scale}: this layer was converted for input scale "
                                 f"{float(self.input_scale)}")
            return self.bias_int32
        return self._bias_on_grid(float(input_scale))

    def dequantized_weight(self) -> torch.Tensor:
        """(weight_int8 - weight_zero_point) * weight_scale as float32."""
        return onnx_form.dequantize(self.weight_int8, self.weight_scale, self.weight_zero_point, 0, "weights")

    def _folds_output_scales(self) -> bool:
        """In the ONNX form, per-channel output scales go into the weight and bias scales (see `onnx_form`)."""
        return (onnx_form.exporting() and self.output_scale is not None and self.output_axis is not None
                and self.activation != "relu6")

    def forward(self, x: torch.Tensor | iref.QTensor) -> torch.Tensor | iref.QTensor:
        if isinstance(x, iref.QTensor):
            return iref.conv2d(self, x)
        fold = self._folds_output_scales()
        if fold:
            if bool(self.output_zero_point.any()):
                raise ValueError("output_zero_point: a per-channel conv output is written to ONNX with zero points 0")
            onnx_form.int_type(self.weight_quant_min, self.weight_quant_max, "weight")
            s_out = self.output_scale.float()
            weight = onnx_form.dequantize(self.weight_int8, self.weight_scale / s_out, self.weight_zero_point, 0,
                                          "weights")
        else:
            weight = self.dequantized_weight()
        if self.bias_int32 is not None:
            grid = self.weight_scale * self.input_scale
            bias = onnx_form.dequantize(self.bias_int32, grid / s_out if fold else grid, None, 0, "biases")
        else:
            bias = None if self.bias is None else (self.bias / s_out if fold else self.bias)
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        if self.padding_mode != "zeros":
            pad = (self.padding[1], self.padding[1], self.padding[0], self.padding[0])
            y = F.conv2d(F.pad(x, pad, mode=self.padding_mode), weight, bias, self.stride, 0, self.dilation,
                         self.groups)
        else:
            y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)
        act = _ACTIVATIONS[self.activation]
        if act is not None:
            y = act(y)
        if fold:
            return onnx_form.round_then_scale(y, self.output_scale, self.output_quant_min, self.output_quant_max,
                                              "Conv2d output quantizer")
        return self._quantize_output(y)

    @classmethod
    def from_qat(cls, mod: torch.nn.Conv2d,
                 input_qparams: tuple[torch.Tensor, torch.Tensor] | None = None) -> Conv2d:
        """From a QAT conv (``nnqat.Conv2d``, ``nniqat.ConvBn2d``, ... ); BN is folded first."""
        weight, bias = mod.folded_weight_bias()
        weight_fq = mod.weight_fake_quant
        with torch.no_grad():
            weight_fq(weight)  # an enabled weight observer sees the final weights, as in training
        w_scale, w_zp, qmin, qmax = qparams_of(weight_fq)
        if weight_fq.is_per_channel and weight_fq.ch_axis % 4 != 0:
            raise ValueError(f"ch_axis={weight_fq.ch_axis}: conv weights must be quantized per output channel (axis 0)")
        if w_scale.numel() not in (1, weight.shape[0]):
            raise ValueError(f"weight_scale: {w_scale.numel()} scales for {weight.shape[0]} output channels")
        shape = (-1, 1, 1, 1)
        scale_b = w_scale.expand(weight.shape[0]).reshape(shape)
        zp_b = w_zp.expand(weight.shape[0]).reshape(shape)
        # the same arithmetic as the fake quantizer: round(w * (1 / s)) + z, clamped
        q = torch.clamp(round_(weight * (1.0 / scale_b), weight_fq.rounding) + zp_b, qmin, qmax)
        output = output_quantizer(mod)
        output_axis = None
        if output is not None and output.is_per_channel:
            output_axis = output.ch_axis % 4
            if output_axis != 1:
                raise ValueError(f"ch_axis={output.ch_axis}: a per-channel conv output is quantized along its "
                                 "channels (axis 1)")
        return cls(q, scale_b.reshape(-1), zp_b.reshape(-1), (qmin, qmax), bias, input_qparams,
                   None if output is None else qparams_of(output), mod.stride, mod.padding, mod.dilation, mod.groups,
                   mod.padding_mode, mod._activation, output_axis,
                   "half_even" if output is None else output.rounding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={tuple(self.weight_int8.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, activation={self.activation}")


class QFunctional(_OutputQParams):
    """Converted FloatFunctional: add / add_relu / mul / cat with a quantized output.

    ``input_qparams``: (scale, zero_point) per operand of the call `convert` traced (None for a float
    operand), empty without ``example_inputs``. The integer reference reads them from its QTensors.
    """

    def __init__(self, output_qparams: tuple[torch.Tensor, torch.Tensor, int, int] | None,
                 rounding: str = "half_even") -> None:
        super().__init__()
        self._set_output(output_qparams, rounding=rounding)
        self.input_qparams = []

    @classmethod
    def from_float(cls, mod: FloatFunctional) -> QFunctional:
        fq = mod.activation_post_process
        return cls(qparams_of(fq), fq.rounding)

    def forward(self, x: torch.Tensor) -> NoReturn:
        raise RuntimeError("QFunctional is not called directly; use its add / add_relu / mul / cat methods")

    def _rounds_after_zero_point(self) -> bool:
        """True when an int8 add that adds the output zero point before rounding (onnxruntime's QLinearAdd) can
        differ from this add: an odd output zero point and a sum that can lie halfway between two output steps (an
        operand finer than the output, or operands not known)."""
        if self.output_zero_point is None or int(self.output_zero_point) % 2 == 0:
            return False
        scales = [q[0] for q in self.input_qparams if q is not None]
        if len(scales) < 2:
            return True
        return any(float(s) < float(self.output_scale) for s in scales)

    def add(self, x: torch.Tensor | iref.QTensor, y: torch.Tensor | iref.QTensor) -> torch.Tensor | iref.QTensor:
        if isinstance(x, iref.QTensor):
            return iref.add(self, x, y)
        return self._quantize_output(onnx_form.add(x, y, self._rounds_after_zero_point()))

    def add_relu(self, x: torch.Tensor | iref.QTensor, y: torch.Tensor | iref.QTensor) -> torch.Tensor | iref.QTensor:
        if isinstance(x, iref.QTensor):
            return iref.add(self, x, y, activation="relu")
        return self._quantize_output(F.relu(onnx_form.add(x, y, self._rounds_after_zero_point())))

    def mul(self, x: torch.Tensor | iref.QTensor, y: torch.Tensor | iref.QTensor) -> torch.Tensor | iref.QTensor:
        if isinstance(x, iref.QTensor):
            return iref.mul(self, x, y)
        return self._quantize_output(torch.mul(x, y))

    def cat(self, tensors: Iterable[torch.Tensor | iref.QTensor], dim: int = 0) -> torch.Tensor | iref.QTensor:
        tensors = list(tensors)
        if tensors and isinstance(tensors[0], iref.QTensor):
            return iref.cat(self, tensors, dim)
        return self._quantize_output(torch.cat(tensors, dim))


@contextmanager
def integer_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, converted `Quantize` modules of `model` emit `QTensor`s, so converted
    convs / functionals run on integers and `DeQuantize` returns their float value."""
    stubs = [m for m in model.modules() if isinstance(m, Quantize)]
    if not stubs:
        raise ValueError("model: has no converted Quantize module (QuantStub); nothing produces integers")
    before = [m.integer_output for m in stubs]
    try:
        for m in stubs:
            m.integer_output = True
        yield model
    finally:
        for m, b in zip(stubs, before):
            m.integer_output = b
