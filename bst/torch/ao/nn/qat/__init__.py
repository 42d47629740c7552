"""QAT modules: Conv2d with a fake-quantized weight; TableActivation, an elementwise activation applied as a
lookup table once frozen."""
from .activation import TableActivation
from .conv import Conv2d

__all__ = ["Conv2d", "TableActivation"]
