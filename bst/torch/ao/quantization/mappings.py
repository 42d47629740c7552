"""Module swap tables: float -> QAT (`prepare_qat`) and QAT -> converted (`convert`).

Built on call, not at import: `bst.torch.ao.nn` imports this package, so importing it back here at
module level would be circular.
"""
from __future__ import annotations

import torch.nn as nn


def get_default_qat_module_mappings() -> dict:
    """float (or fused float) module type -> QAT module type with ``from_float``."""
    from bst.torch.ao.nn import intrinsic as nni
    from bst.torch.ao.nn import qat as nnqat
    from bst.torch.ao.nn.intrinsic import qat as nniqat

    return {
        nn.Conv2d: nnqat.Conv2d,
        nni.ConvBn2d: nniqat.ConvBn2d,
        nni.ConvBnReLU2d: nniqat.ConvBnReLU2d,
        nni.ConvBnReLU62d: nniqat.ConvBnReLU62d,
        nni.ConvReLU2d: nniqat.ConvReLU2d,
        nni.ConvReLU62d: nniqat.ConvReLU62d,
    }


def get_default_convert_module_mappings() -> dict:
    """prepared module type -> converted module type (constructor taking the prepared module)."""
    from bst.torch.ao.nn import qat as nnqat
    from bst.torch.ao.nn import quantized as nnq
    from bst.torch.ao.nn.intrinsic import qat as nniqat

    from .stubs import DeQuantStub, QuantStub

    conv = nnq.Conv2d.from_qat
    return {
        nnqat.Conv2d: conv,
        nniqat.ConvBn2d: conv,
        nniqat.ConvBnReLU2d: conv,
        nniqat.ConvBnReLU62d: conv,
        nniqat.ConvReLU2d: conv,
        nniqat.ConvReLU62d: conv,
        QuantStub: nnq.Quantize.from_stub,
        DeQuantStub: nnq.DeQuantize.from_stub,
        nnq.FloatFunctional: nnq.QFunctional.from_float,
    }
