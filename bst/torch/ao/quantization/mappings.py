"""Module swap tables: float -> QAT (`prepare_qat`) and QAT -> converted (`convert`).

Built on call, so that callers can extend their own copy. The module classes are imported from their defining
modules (`bst.torch.ao.nn` imports this package's quantizer modules, never this file).
"""
from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

import bst.torch.ao.nn.intrinsic.modules as nni
import bst.torch.ao.nn.intrinsic.qat.conv_fused as nniqat
import bst.torch.ao.nn.qat.activation as nnqat_activation
import bst.torch.ao.nn.qat.conv as nnqat
import bst.torch.ao.nn.quantized.functional_modules as nnq_functional
import bst.torch.ao.nn.quantized.lookup as nnq_lookup
import bst.torch.ao.nn.quantized.reference as nnq

from .stubs import DeQuantStub, QuantStub


def get_default_qat_module_mappings() -> dict[type[nn.Module], type[nn.Module]]:
    """float (or fused float) module type -> QAT module type with ``from_float``. Activations other than ReLU stay
    float unless a mapping names them, e.g. ``{nn.SiLU: bst.torch.ao.nn.qat.TableActivation}`` (a lookup table
    between two quantizers)."""
    return {
        nn.Conv2d: nnqat.Conv2d,
        nni.ConvBn2d: nniqat.ConvBn2d,
        nni.ConvBnReLU2d: nniqat.ConvBnReLU2d,
        nni.ConvBnReLU62d: nniqat.ConvBnReLU62d,
        nni.ConvReLU2d: nniqat.ConvReLU2d,
        nni.ConvReLU62d: nniqat.ConvReLU62d,
    }


def get_default_convert_module_mappings() -> dict[type[nn.Module], Callable[..., nn.Module]]:
    """prepared module type -> converted module type (constructor taking the prepared module)."""
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
        nnq_functional.FloatFunctional: nnq.QFunctional.from_float,
        nnqat_activation.TableActivation: nnq_lookup.TableActivation.from_qat,
    }
