"""Integer-only reference for converted power-of-two models.

Tensors are `QTensor`: int64 values ``q`` with a power-of-two scale ``2**k`` and a zero point ``z``,
meaning the real number ``(q - z) * 2**k``. A converted layer multiplies and accumulates integers
(int8 x int8 -> int64, plus the int32 bias), and requantizes the accumulator to its output exponent
with an arithmetic shift. Floating point appears only in `quantize` (the float input), `QTensor.dequantize`
(the float output) and as float64 carrier of conv products and sums below 2**53, where it is exact.

Rounding: every requantization rounds as the quantizer it came from does (`shift_round`): half to even,
exactly what torch's fake quantization does (``nearbyint`` in the default rounding mode; ``torch.round``),
or half up (``floor(x + 1/2)``, an adder and an arithmetic shift), so a converted model
in float (``Conv2d.forward`` on a float tensor, reference mode) and the same model on `QTensor` inputs
agree bit for bit, provided the float accumulation is itself exact: every partial sum of a conv, in
units of 2**(k_in + k_w), below 2**24 (float32 mantissa), which holds for small layers; beyond that
float32 rounds and a value lying on a tie can differ by one step.

Activations: ReLU and ReLU6 are applied after rounding, ``max(r, 0)`` and ``min(max(r, 0),
round(6 / s_out))``; this equals rounding after the activation because rounding is monotone. Other elementwise
activations (SiLU, Hardswish, ...) between two per-tensor quantizers are lookup tables from input to output
integers (`lookup`, converted `TableActivation` modules).
Integer matrix products run on the CPU (CUDA has no int64 matmul); results return to the input device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .fake_quant_ops import round_

_recorder = None  # the `integer_graph.IntegerGraph` being recorded, if any (integer_graph.recording)


def _note(op: str, inputs: list, output, **attrs):
    """Tell the graph being recorded (if any) that `op` made `output` from `inputs`; returns `output`."""
    if _recorder is not None:
        _recorder.add(op, inputs, output, attrs)
    return output


def exponent_of(scale: float | torch.Tensor, what: str = "scale") -> int:
    """k with scale == 2**k; a ValueError naming `what` otherwise."""
    value = float(scale)
    mantissa, exponent = math.frexp(value)
    if mantissa != 0.5:
        raise ValueError(f"{what}={value}: the integer reference needs power-of-two scales (2**k); "
                         "quantize with pow2=True")
    return exponent - 1


@dataclass(frozen=True)
class QTensor:
    """Integer tensor with power-of-two quantization parameters: per tensor (``axis`` None; ``scale`` a float,
    ``zero_point`` an int), or per channel along ``axis`` (``scale`` and ``zero_point`` 1-d tensors). A per-channel
    QTensor is a model output (a detection head's raw outputs): the integer ops take per-tensor operands."""

    int_repr: torch.Tensor
    scale: float | torch.Tensor
    zero_point: int | torch.Tensor
    quant_min: int
    quant_max: int
    axis: int | None = None

    @property
    def exponent(self) -> int:
        if self.axis is not None:
            raise ValueError("a per-channel QTensor (a model output) is not an operand of the integer reference's ops; "
                             "quantize the tensor per tensor where another layer reads it")
        return exponent_of(self.scale)

    def _broadcast(self, v: torch.Tensor) -> torch.Tensor:
        shape = [1] * self.int_repr.dim()
        shape[self.axis] = -1
        return v.reshape(shape).to(self.int_repr.device)

    def dequantize(self) -> torch.Tensor:
        if self.axis is None:
            return (self.int_repr - self.zero_point).to(torch.float32) * self.scale
        return (self.int_repr - self._broadcast(self.zero_point)).to(torch.float32) * self._broadcast(self.scale)

    def _like(self, values: torch.Tensor) -> "QTensor":
        return QTensor(values, self.scale, self.zero_point, self.quant_min, self.quant_max, self.axis)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        """Grid-preserving functions (max-pool, nearest upsampling, ReLU) run on the integers, so
        nn.MaxPool2d / nn.Upsample / nn.ReLU modules work unchanged in integer mode."""
        impl = _GRID_FUNCTIONS.get(func)
        if impl is None:
            names = ", ".join(f.__name__ for f in _GRID_FUNCTIONS)
            raise TypeError(f"{getattr(func, '__name__', func)} is not part of the integer reference "
                            f"(QTensor supports {names}, converted convs and QFunctional ops)")
        return impl(*args, **(kwargs or {}))


def shift_round(acc: torch.Tensor, shift: int | torch.Tensor, rounding: str = "half_even") -> torch.Tensor:
    """``acc * 2**-shift`` rounded half to even (or half up: ``(acc + 2**(shift-1)) >> shift``), in int64
    (``shift`` an int or a broadcastable tensor).

    shift > 0 is an arithmetic right shift plus the rounding decision on the dropped bits; shift <= 0
    is an exact left shift.
    """
    acc = acc.to(torch.int64)
    shift = torch.as_tensor(shift, dtype=torch.int64, device=acc.device)
    right = torch.clamp_min(shift, 0)
    left = torch.clamp_min(-shift, 0)
    floor = acc >> right  # arithmetic shift: floor division by 2**right, also for negatives
    dropped = acc - (floor << right)
    half = torch.where(right > 0, torch.ones_like(right) << torch.clamp_min(right - 1, 0), torch.zeros_like(right))
    if rounding == "half_up":
        round_up = (right > 0) & (dropped >= half)
    else:
        odd = (floor & 1) == 1
        round_up = (right > 0) & ((dropped > half) | ((dropped == half) & odd))
    return torch.where(shift > 0, floor + round_up.to(torch.int64), acc << left)


def requantize(acc: torch.Tensor, acc_exponent: int | torch.Tensor, out_exponent: int | torch.Tensor,
               zero_point: int | torch.Tensor, quant_min: int, quant_max: int, activation: str | None = None,
               rounding: str = "half_even") -> torch.Tensor:
    """Integer accumulator in units of 2**acc_exponent -> quantized output values (int64). The exponents and the
    zero point are ints, or tensors that broadcast against `acc` (per channel)."""
    out_exponent = torch.as_tensor(out_exponent, dtype=torch.int64, device=acc.device)
    zero_point = torch.as_tensor(zero_point, dtype=torch.int64, device=acc.device)
    r = shift_round(acc, out_exponent - torch.as_tensor(acc_exponent, dtype=torch.int64, device=acc.device), rounding)
    if activation == "relu":
        r = torch.clamp_min(r, 0)
    elif activation == "relu6":
        six = shift_round(torch.tensor(6, device=acc.device), out_exponent, rounding)
        r = torch.minimum(torch.clamp_min(r, 0), six)
    elif activation is not None:
        raise ValueError(f"activation={activation!r} is not supported; use None, 'relu' or 'relu6'")
    return torch.clamp(r + zero_point, quant_min, quant_max)


def quantize(x: torch.Tensor, scale: float | torch.Tensor, zero_point: int, quant_min: int, quant_max: int,
             rounding: str = "half_even") -> QTensor:
    """Float -> QTensor with the same arithmetic as the fake quantization (x * (1/scale), then `rounding`)."""
    exponent_of(scale, "scale")
    inv = torch.tensor(1.0 / float(scale), dtype=torch.float32)
    t = round_(x.to(torch.float32) * inv.to(x.device), rounding)
    q = torch.clamp(t + zero_point, quant_min, quant_max)
    return _note("quantize", [x], QTensor(q.to(torch.int64), float(scale), int(zero_point), quant_min, quant_max),
                 rounding=rounding)


_EXACT_FLOAT64 = 2 ** 53  # every integer of smaller magnitude, and every sum of them below it, is exact in float64


def _int_conv2d(x: torch.Tensor, w: torch.Tensor, stride, padding, dilation, groups) -> torch.Tensor:
    """Integer 2-d convolution (int64). When no partial sum can reach 2**53 (int8-sized operands: always) it is
    computed as a float64 convolution, whose products and sums of such integers are exact in any order; otherwise
    by explicit patches and an int64 product."""
    bound = int(x.abs().max()) * int(w.abs().sum(dim=(1, 2, 3)).max()) if x.numel() and w.numel() else 0
    if bound < _EXACT_FLOAT64:
        y = F.conv2d(x.to(torch.float64), w.to(torch.float64), None, stride, padding, dilation, groups)
        return y.to(torch.int64)
    n, c, _, _ = x.shape
    out_c, c_per_group, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x = F.pad(x, (pw, pw, ph, ph))
    patches = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)[..., ::dh, ::dw]
    ho, wo = patches.shape[2], patches.shape[3]
    patches = patches.reshape(n, groups, c // groups, ho, wo, kh, kw)
    w = w.reshape(groups, out_c // groups, c_per_group, kh, kw)
    out = torch.einsum("ngchwij,gocij->ngohw", patches, w)
    return out.reshape(n, out_c, ho, wo)


def _output_exponent(module) -> int:
    if getattr(module, "output_axis", None) is not None:
        raise ValueError(f"{type(module).__name__}: per-channel output qparams; only a conv's output can have them")
    return exponent_of(module.output_scale, "output_scale")


def conv2d(layer: nn.Module, qx: QTensor) -> QTensor:
    """Run a converted `bst.torch.ao.nn.quantized.Conv2d` on integers."""
    if layer.output_scale is None:
        raise ValueError(f"{layer}: has no output quantizer, so its output is float; integer execution is impossible")
    if layer.padding_mode != "zeros":
        raise ValueError(f"padding_mode={layer.padding_mode!r}: the integer reference supports 'zeros' only")
    device = qx.int_repr.device
    k_in = qx.exponent
    k_w = torch.tensor([exponent_of(s, "weight_scale") for s in layer.weight_scale.tolist()], dtype=torch.int64)
    x = (qx.int_repr - qx.zero_point).cpu()
    w = layer.weight_int8.to(torch.int64).cpu() - layer.weight_zero_point.to(torch.int64).cpu().reshape(-1, 1, 1, 1)
    acc = _int_conv2d(x, w, layer.stride, layer.padding, layer.dilation, layer.groups)
    bias = layer.integer_bias(qx.scale)
    if bias is not None:
        acc = acc + bias.to(torch.int64).cpu().reshape(1, -1, 1, 1)
    if layer.output_axis is None:
        k_out, zp = torch.tensor(_output_exponent(layer)), layer.output_zero_point.to(torch.int64).cpu().reshape(())
        q = requantize(acc, (k_in + k_w).reshape(1, -1, 1, 1), k_out, zp, layer.output_quant_min,
                       layer.output_quant_max, layer.activation, layer.output_rounding)
        out = QTensor(q.to(device), float(layer.output_scale), int(zp), layer.output_quant_min, layer.output_quant_max)
    else:  # one output scale per channel: a requantizing shift and zero point per channel
        k_out = torch.tensor([exponent_of(s, "output_scale") for s in layer.output_scale.tolist()], dtype=torch.int64)
        zp = layer.output_zero_point.to(torch.int64).cpu()
        q = requantize(acc, (k_in + k_w).reshape(1, -1, 1, 1), k_out.reshape(1, -1, 1, 1), zp.reshape(1, -1, 1, 1),
                       layer.output_quant_min, layer.output_quant_max, layer.activation, layer.output_rounding)
        out = QTensor(q.to(device), layer.output_scale.detach().clone().cpu(), zp, layer.output_quant_min,
                      layer.output_quant_max, axis=1)
    return _note("conv2d", [qx], out, weight=layer.weight_int8, weight_zero_point=layer.weight_zero_point,
                 bias=bias, shift=k_out - (k_in + k_w), stride=layer.stride, padding=layer.padding,
                 dilation=layer.dilation, groups=layer.groups, activation=layer.activation,
                 rounding=layer.output_rounding)


def _out(module, values: torch.Tensor) -> QTensor:
    return QTensor(values, float(module.output_scale), int(module.output_zero_point), module.output_quant_min,
                   module.output_quant_max)


def add(module: nn.Module, a: QTensor, b: QTensor, activation: str | None = None) -> QTensor:
    """(a + b) of a converted `QFunctional`: both operands shifted to the finer exponent, summed, requantized."""
    ka, kb = a.exponent, b.exponent
    k = min(ka, kb)
    total = ((a.int_repr - a.zero_point) << (ka - k)) + ((b.int_repr - b.zero_point) << (kb - k))
    q = requantize(total, k, _output_exponent(module), int(module.output_zero_point), module.output_quant_min,
                   module.output_quant_max, activation, module.output_rounding)
    return _note("add", [a, b], _out(module, q), activation=activation, rounding=module.output_rounding)


def mul(module: nn.Module, a: QTensor, b: QTensor) -> QTensor:
    product = (a.int_repr - a.zero_point) * (b.int_repr - b.zero_point)
    q = requantize(product, a.exponent + b.exponent, _output_exponent(module), int(module.output_zero_point),
                   module.output_quant_min, module.output_quant_max, rounding=module.output_rounding)
    return _note("mul", [a, b], _out(module, q), rounding=module.output_rounding)


def cat(module: nn.Module, parts: Sequence[QTensor], dim: int = 0) -> QTensor:
    """Concatenation: each part requantized to the output exponent and zero point, then joined."""
    k_out = _output_exponent(module)
    pieces = [requantize(p.int_repr - p.zero_point, p.exponent, k_out, int(module.output_zero_point),
                         module.output_quant_min, module.output_quant_max, rounding=module.output_rounding)
              for p in parts]
    return _note("cat", list(parts), _out(module, torch.cat(pieces, dim)), dim=dim, rounding=module.output_rounding)


def lookup(module: nn.Module, qx: QTensor) -> QTensor:
    """An elementwise activation of a converted `TableActivation`: each input integer selects its output integer in
    the module's table (index ``q - input_quant_min``); the input must carry the qparams the table was made for."""
    if qx.axis is not None or float(qx.scale) != float(module.input_scale) or \
            int(qx.zero_point) != int(module.input_zero_point):
        raise ValueError(f"{module.function} lookup table: made for input scale {float(module.input_scale)} and zero "
                         f"point {int(module.input_zero_point)}, got scale {qx.scale} and zero point {qx.zero_point}")
    _output_exponent(module)
    lo, hi = module.input_quant_min, module.input_quant_max
    index = torch.clamp(qx.int_repr, lo, hi) - lo
    values = module.table.to(torch.int64).to(index.device)[index]
    return _note("lookup", [qx], _out(module, values), table=module.table, input_min=lo)


# --- grid-preserving functions on QTensor --------------------------------------------------------

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _max_pool2d(q: QTensor, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    (kh, kw), (ph, pw) = _pair(kernel_size), _pair(padding)
    sh, sw = _pair(stride if stride not in (None, [], ()) else kernel_size)
    if _pair(dilation) != (1, 1) or ceil_mode or return_indices:
        raise ValueError("max_pool2d: the integer reference supports dilation=1, ceil_mode=False, return_indices=False")
    lowest = torch.iinfo(torch.int64).min
    x = F.pad(q.int_repr, (pw, pw, ph, ph), value=lowest)
    windows = x.unfold(2, kh, sh).unfold(3, kw, sw)
    return _note("max_pool2d", [q], q._like(windows.amax(dim=(-2, -1))), kernel_size=(kh, kw), stride=(sh, sw),
                 padding=(ph, pw))


def _interpolate(q: QTensor, size=None, scale_factor=None, mode="nearest", align_corners=None,
                 recompute_scale_factor=None, antialias=False):
    h, w = q.int_repr.shape[-2:]
    if size is not None:
        oh, ow = _pair(size)
        factors = (oh // h, ow // w) if oh % h == 0 and ow % w == 0 else None
    else:
        fh, fw = (scale_factor, scale_factor) if isinstance(scale_factor, (int, float)) else tuple(scale_factor)
        factors = (int(fh), int(fw)) if float(fh).is_integer() and float(fw).is_integer() else None
    if mode != "nearest" or factors is None:
        raise ValueError("interpolate: the integer reference supports mode='nearest' with integer factors only")
    out = q._like(q.int_repr.repeat_interleave(factors[0], dim=-2).repeat_interleave(factors[1], dim=-1))
    return _note("upsample_nearest", [q], out, factors=factors)


def _relu(q: QTensor, inplace=False):
    zero = q.zero_point if q.axis is None else q._broadcast(q.zero_point)
    return _note("relu", [q], q._like(torch.clamp_min(q.int_repr, zero)))


_GRID_FUNCTIONS = {F.max_pool2d: _max_pool2d, F.interpolate: _interpolate, F.relu: _relu}
