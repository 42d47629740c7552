"""FloatFunctional (quantized add / cat / mul for QAT) and the converted reference modules."""
from .functional_modules import FloatFunctional
from .lookup import TableActivation
from .reference import Conv2d, DeQuantize, QFunctional, Quantize

__all__ = ["FloatFunctional", "Conv2d", "DeQuantize", "QFunctional", "Quantize", "TableActivation"]
