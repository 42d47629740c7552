"""Fused QAT modules with simulated BN folding, and the freeze/update BN switches for model.apply."""
from .conv_fused import ConvBn2d, ConvBnReLU2d, ConvBnReLU62d, ConvReLU2d, ConvReLU62d, freeze_bn_stats, update_bn_stats

__all__ = ["ConvBn2d", "ConvBnReLU2d", "ConvBnReLU62d", "ConvReLU2d", "ConvReLU62d", "freeze_bn_stats",
           "update_bn_stats"]
