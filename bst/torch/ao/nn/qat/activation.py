"""QAT elementwise activation (SiLU, Hardswish, ...) whose output gets a quantizer: a lookup table once frozen.

`prepare_qat` with a mapping such as ``{nn.SiLU: TableActivation}`` wraps the activation (``act``) and attaches an
output quantizer (applied by `prepare_qat`'s forward hook). Its input comes from the output quantizer of the layer
before it, so shift hardware applies it as a table from input to output integers. In training it computes
``act(x)``; in eval mode, once `bst.torch.ao.quantization.freeze_qparams` has told it the qparams of the
per-tensor quantizer feeding it (``input_qparams``) and its own output quantizer is frozen (fake quantization on,
observer off), it computes through that table, the converted `bst.torch.ao.nn.quantized.TableActivation` that
`convert` makes: so the PyTorch model, the integer reference, the integer model and an ONNX export compute the same
integers by construction (a float function evaluated by two runtimes can differ in its last bit and round the
other way).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bst.torch.ao.nn.quantized.lookup import QParams
from bst.torch.ao.nn.quantized.lookup import TableActivation as ConvertedTable
from bst.torch.ao.quantization.fake_quantize import fake_quant_enabled, output_quantizer, qparams_of


def set_input_qparams(module: nn.Module, qparams: QParams | None) -> None:
    """The per-tensor qparams (scale, zero_point, quant_min, quant_max) of the quantizer feeding QAT activation
    `module` (None: unknown, it computes its function in float)."""
    module.input_qparams = None if qparams is None else tuple(qparams)


class TableActivation(nn.Module):
    """An elementwise float activation (``act``) between two per-tensor quantizers; see the module docstring."""

    _needs_input_qparams = True  # convert / freeze_qparams tell it the quantizer feeding it

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.act = act
        self.input_qparams = None  # see set_input_qparams

    @classmethod
    def from_float(cls, mod: nn.Module) -> TableActivation:
        qat = cls(mod)
        qat.qconfig = getattr(mod, "qconfig", None)
        return qat

    def lookup_module(self, input_qparams: QParams | None = None) -> ConvertedTable | None:
        """The converted table of the frozen quantizers (`input_qparams`, default the ones freeze_qparams set, and
        the output quantizer), or None where there is none (input unknown, output quantizer off or observing)."""
        input_qparams = self.__dict__.get("input_qparams") if input_qparams is None else input_qparams
        out = output_quantizer(self)
        if input_qparams is None or not fake_quant_enabled(out) or out._flag("observer_enabled"):
            return None
        out_qparams = qparams_of(out)
        key = (tuple(float(v) if isinstance(v, torch.Tensor) else v for v in input_qparams),
               tuple(float(v) if isinstance(v, torch.Tensor) else v for v in out_qparams), out.rounding)
        cached = self.__dict__.get("_lookup")
        if cached is None or cached[0] != key:
            cached = (key, ConvertedTable.from_qat(self, input_qparams))
            self.__dict__["_lookup"] = cached  # not a child module: no state_dict entry
        return cached[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        table = None if self.training else self.lookup_module()
        return self.act(x) if table is None else table(x)
