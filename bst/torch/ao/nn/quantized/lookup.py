"""An elementwise float function between two per-tensor quantizers, converted to a lookup table.

Shift hardware applies an activation such as SiLU or Hardswish as a table: the integer its input quantizer produced
selects the integer its output quantizer produces. `lookup_table` computes that table once from the two quantizers'
qparams and the function (the function runs on the dequantized value of every input integer, in float32, and the
output quantizer's arithmetic rounds each result). `TableActivation` holds it: on float tensors it re-quantizes its
input to the input integers (exact, the input lies on that grid), looks them up and dequantizes (the same numbers as
the QAT model's eval forward, which computes through this module too, see `bst.torch.ao.nn.qat.TableActivation`); on
`QTensor` inputs it runs the integer reference's `lookup`; under ``torch.onnx.export`` it writes QuantizeLinear -> Cast
-> Gather on a table initializer -> DequantizeLinear (see `onnx_form.lookup`).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

import bst.torch.ao.quantization.integer_reference as iref
from bst.torch.ao.quantization.fake_quant_ops import check_rounding, round_
from bst.torch.ao.quantization.fake_quantize import fake_quant_enabled, output_quantizer, qparams_of

from . import onnx_form
from .reference import _OutputQParams

QParams = tuple[torch.Tensor, torch.Tensor, int, int]  # (scale, zero_point, quant_min, quant_max), per tensor


def _per_tensor(qparams: QParams, what: str) -> tuple[torch.Tensor, int, int, int]:
    scale, zero_point, quant_min, quant_max = qparams
    if scale.numel() != 1 or zero_point.numel() != 1:
        raise ValueError(f"{what}: a lookup table needs a per-tensor quantizer, got {scale.numel()} scales")
    if quant_max - quant_min + 1 > 1 << 16:
        raise ValueError(f"{what}: range [{quant_min}, {quant_max}] is too wide for a lookup table (at most 16 bits)")
    return scale.detach().float().reshape(()).cpu(), int(zero_point), int(quant_min), int(quant_max)


@torch.no_grad()
def lookup_table(fn: Callable[[torch.Tensor], torch.Tensor], input_qparams: QParams, output_qparams: QParams,
                 rounding: str = "half_even") -> torch.Tensor:
    """The output integer for every input integer q in [quant_min, quant_max] of `input_qparams` (int32, index
    q - quant_min): ``clamp(round(fn((q - z_in) * s_in) * (1 / s_out)) + z_out)``, each step in float32 as the fake
    quantizers compute it, rounding ties as `rounding` says."""
    check_rounding(rounding)
    s_in, z_in, lo, hi = _per_tensor(input_qparams, "input quantizer")
    s_out, z_out, out_lo, out_hi = _per_tensor(output_qparams, "output quantizer")
    x = (torch.arange(lo, hi + 1, dtype=torch.int64) - z_in).to(torch.float32) * s_in
    y = fn(x).to(torch.float32)
    if y.shape != x.shape:
        raise ValueError(f"fn: must be elementwise; mapped {tuple(x.shape)} values to {tuple(y.shape)}")
    t = round_(y * torch.reciprocal(s_out), rounding)
    return torch.clamp(t + z_out, out_lo, out_hi).to(torch.int32)


class TableActivation(_OutputQParams):
    """Converted elementwise activation: a lookup table from each input integer to an output integer.

    Buffers: ``table`` (int32, one entry per input integer, index ``q - input_quant_min``), ``input_scale`` /
    ``input_zero_point`` (the quantizer that produces its input), ``output_scale`` / ``output_zero_point``;
    ``function`` names what the table holds (e.g. "SiLU")."""

    def __init__(self, table: torch.Tensor, input_qparams: QParams, output_qparams: QParams,
                 rounding: str = "half_even", function: str = "activation") -> None:
        super().__init__()
        s_in, z_in, lo, hi = _per_tensor(input_qparams, "input quantizer")
        _per_tensor(output_qparams, "output quantizer")
        table = table.detach().to(torch.int32).reshape(-1).cpu()
        if table.numel() != hi - lo + 1:
            raise ValueError(f"table: {table.numel()} entries for the {hi - lo + 1} input integers [{lo}, {hi}]")
        self.register_buffer("table", table)
        self.register_buffer("input_scale", s_in.reshape(1))
        self.register_buffer("input_zero_point", torch.tensor([z_in], dtype=torch.int32))
        self.input_quant_min, self.input_quant_max = lo, hi
        self._set_output(output_qparams, rounding=rounding)
        self.function = function

    @classmethod
    def from_function(cls, fn: Callable[[torch.Tensor], torch.Tensor], input_qparams: QParams,
                      output_qparams: QParams, rounding: str = "half_even") -> TableActivation:
        """The table of `fn` (an elementwise module or function) between the two quantizers (see `lookup_table`)."""
        table = lookup_table(fn, input_qparams, output_qparams, rounding)
        return cls(table, input_qparams, output_qparams, rounding, getattr(fn, "__name__", type(fn).__name__))

    @classmethod
    def from_qat(cls, mod: torch.nn.Module, input_qparams: QParams) -> TableActivation:
        """From a QAT `bst.torch.ao.nn.qat.TableActivation` (its ``act`` and output quantizer) fed by a quantizer
        with `input_qparams`: the table its eval forward computes through."""
        out = output_quantizer(mod)
        if not fake_quant_enabled(out):
            raise ValueError(f"{type(mod).__name__}: its output quantizer is off; a lookup table needs one")
        return cls.from_function(mod.act, input_qparams, qparams_of(out), out.rounding)

    def forward(self, x: torch.Tensor | iref.QTensor) -> torch.Tensor | iref.QTensor:
        if isinstance(x, iref.QTensor):
            return iref.lookup(self, x)
        return onnx_form.lookup(x, self.table, (self.input_scale, self.input_zero_point, self.input_quant_min,
                                                self.input_quant_max),
                                (self.output_scale, self.output_zero_point, self.output_quant_min,
                                 self.output_quant_max), f"{self.function} lookup table")

    def extra_repr(self) -> str:
        return (f"{self.function}, input [{self.input_quant_min}, {self.input_quant_max}] scale "
                f"{float(self.input_scale):g}, output [{self.output_quant_min}, {self.output_quant_max}] scale "
                f"{float(self.output_scale):g}")
