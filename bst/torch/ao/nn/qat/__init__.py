"""QAT modules: Conv2d with a fake-quantized weight."""
from .conv import Conv2d

__all__ = ["Conv2d"]
