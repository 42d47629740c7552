"""Fused float modules (Conv+BN+ReLU/ReLU6 containers) that the QAT swap maps from."""
from .modules import ConvBn2d, ConvBnReLU2d, ConvBnReLU62d, ConvReLU2d, ConvReLU62d

__all__ = ["ConvBn2d", "ConvBnReLU2d", "ConvBnReLU62d", "ConvReLU2d", "ConvReLU62d"]
