"""BatchNorm folding: the one place that computes the conv equal to conv followed by BN in eval mode.

With g = gamma / sqrt(running_var + eps) per output channel: w' = w * g and b' = beta + (b - running_mean) * g.
Plain differentiable tensor arithmetic (no ``no_grad`` here): callers detach or wrap ``torch.no_grad`` as
they need. Depends on torch only, so both bst.torch.ao.quantization and bst.torch.ao.nn can import it.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def bn_scale(bn: nn.BatchNorm2d, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Per-channel BN folding factor gamma / sqrt(running_var + eps), computed in ``dtype`` if given."""
    gamma, var = bn.weight, bn.running_var
    if dtype is not None:
        gamma, var = gamma.to(dtype), var.to(dtype)
    return gamma / torch.sqrt(var + bn.eps)


def fold_bn(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.BatchNorm2d,
            dtype: torch.dtype | None = None, upstream_rounding: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of conv-then-``bn`` in eval mode; bias None means zeros; computed in ``dtype`` if given.

    The bias is beta + (bias - mean) x factor, as every QAT module folds it (a QAT model's quantizers round what
    training rounded, so this order must not change). upstream_rounding=True rounds it as YOLOv5 v7.0's
    fuse_conv_and_bn does instead, factor x bias + (beta - gamma x mean / std): the same value to the last bit or
    so, and a fused float model then computes bit for bit what upstream's does."""
    factor = bn_scale(bn, dtype)
    mean, beta = bn.running_mean, bn.bias
    if dtype is not None:
        weight, mean, beta = weight.to(dtype), mean.to(dtype), beta.to(dtype)
        bias = bias.to(dtype) if bias is not None else None
    if upstream_rounding:
        gamma, std = bn.weight, torch.sqrt(bn.running_var + bn.eps)
        if dtype is not None:
            gamma, std = gamma.to(dtype), std.to(dtype)
        shift = beta - gamma * mean / std
        return weight * factor.reshape(-1, 1, 1, 1), shift if bias is None else factor * bias + shift
    if bias is None:
        bias = torch.zeros_like(mean)
    return weight * factor.reshape(-1, 1, 1, 1), beta + (bias - mean) * factor
