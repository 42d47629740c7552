"""The float part of a QAT model: its architecture as upstream pickles a model (Conv blocks, Detect convs, no
quantizers) over the QAT model's own tensors. models/checkpoint.py stores a QAT model as this plus its state."""
from __future__ import annotations

from copy import deepcopy

import torch
import torch.nn as nn

import bst.torch.ao.nn.qat as nnqat
from bst.torch.ao.nn.intrinsic import qat as nniqat
from bst.torch.ao.nn.quantized import FloatFunctional
from models.common import Conv
from models.quant.prepare import QuantizedActivation
from models.quant.state import is_quantized
from models.yolo import Detect


def float_model(model):
    """The float architecture of a QAT DetectionModel, as upstream pickles a model (Conv blocks of conv, BN and
    activation; Detect convs; no quantizers), computing what the QAT model computes with fake quantization off. It
    shares the QAT model's weight, bias and BN tensors (so a checkpoint holding both stores them once); where BN was
    folded into the conv before QAT, an identity BN (weight 1, mean 0, variance 1 - eps) carries the conv's bias.
    `prepare_yolo_qat` of it with the QAT model's settings rebuilds the QAT model's architecture (models/checkpoint.py
    stores QAT models this way)."""
    if not is_quantized(model):
        raise ValueError("model: not a QAT model")
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    f = deepcopy(model, shared)  # new modules around the same tensors
    f.__dict__.pop("qat_config", None)
    f._modules.pop("input_quant", None)
    for m in list(f.modules()):
        m._forward_hooks.clear()  # prepare_qat's output-quantizer hooks
        for attr in ("qadd", "qcat"):
            m._modules.pop(attr, None)
        if isinstance(m, Conv):
            _float_conv_block(m)
        elif isinstance(m, Detect):
            m.m = nn.ModuleList(_float_parts(c)[0] for c in m.m)
    if is_quantized(f) or any(isinstance(m, FloatFunctional) for m in f.modules()):
        raise ValueError("model: has quantized modules outside Conv blocks and Detect; no float architecture")
    return f


def _float_parts(mod) -> list:
    """A prepared conv (QAT, or the float fused container of a layer left in float) as plain float modules
    [conv, (BN), (ReLU / ReLU6)] over the same tensors."""
    if isinstance(mod, nn.Sequential):  # a float fused container (a layer the recipe left in float)
        return list(mod)
    if not isinstance(mod, (nnqat.Conv2d, nniqat.ConvBn2d)):
        return [mod]
    conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                     mod.groups, mod.bias is not None, mod.padding_mode, device="meta")
    conv.weight = mod.weight
    conv.bias = mod.bias
    parts = [conv, mod.bn] if isinstance(mod, nniqat.ConvBn2d) else [conv]
    if isinstance(mod, (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d)):
        parts.append(nn.ReLU(inplace=True))
    elif isinstance(mod, (nniqat.ConvBnReLU62d, nniqat.ConvReLU62d)):
        parts.append(nn.ReLU6(inplace=True))
    return parts


def _float_conv_block(block):
    parts = _float_parts(block.conv)
    conv = parts[0]
    bn = next((p for p in parts[1:] if isinstance(p, nn.BatchNorm2d)), None)
    act = next((p for p in parts[1:] if isinstance(p, (nn.ReLU, nn.ReLU6))), None)
    if bn is None:  # BN was folded into the conv before QAT: an identity BN carries the bias
        device = conv.weight.device
        bn = nn.BatchNorm2d(conv.out_channels, eps=1e-3, momentum=0.03, device=device)
        with torch.no_grad():
            bn.running_var.fill_(1 - bn.eps)
        if conv.bias is not None:
            bn.bias = conv.bias
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, False, conv.padding_mode, device="meta")
        plain.weight = conv.weight
        conv = plain
    block.conv, block.bn = conv, bn
    if act is not None:
        block.act = act
    elif isinstance(block.act, QuantizedActivation):
        block.act = block.act.act
