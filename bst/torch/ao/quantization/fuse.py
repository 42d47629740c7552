"""fuse_modules (inference: BN folded into the conv) and fuse_modules_qat (QAT: fused containers)."""
from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn as nn

import bst.torch.ao.nn.intrinsic.modules as nni
from bst.torch.ao.nn.intrinsic.folding import fold_bn

SUPPORTED_PATTERNS = (
    (nn.Conv2d, nn.BatchNorm2d),
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU),
    (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6),
    (nn.Conv2d, nn.ReLU),
    (nn.Conv2d, nn.ReLU6),
)


def _pattern_names(pattern):
    return "+".join(t.__name__ for t in pattern)


@torch.no_grad()
def fuse_conv_bn_weights(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the conv that equals conv followed by BN in eval mode."""
    return fold_bn(conv.weight, conv.bias, bn)


def _folded_conv(conv, bn):
    fused = copy.deepcopy(conv)
    weight, bias = fuse_conv_bn_weights(conv, bn)
    fused.weight = nn.Parameter(weight.detach().clone())
    fused.bias = nn.Parameter(bias.detach().clone())
    return fused


def _fuse_eval(mods):
    conv = mods[0]
    if len(mods) >= 2 and type(mods[1]) is nn.BatchNorm2d:
        conv = _folded_conv(conv, mods[1])
        rest = mods[2:]
    else:
        rest = mods[1:]
    if not rest:
        return conv
    return nni.ConvReLU2d(conv, rest[0]) if type(rest[0]) is nn.ReLU else nni.ConvReLU62d(conv, rest[0])


def _fuse_qat(mods):
    containers = {
        (nn.Conv2d, nn.BatchNorm2d): nni.ConvBn2d,
        (nn.Conv2d, nn.BatchNorm2d, nn.ReLU): nni.ConvBnReLU2d,
        (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6): nni.ConvBnReLU62d,
        (nn.Conv2d, nn.ReLU): nni.ConvReLU2d,
        (nn.Conv2d, nn.ReLU6): nni.ConvReLU62d,
    }
    return containers[tuple(type(m) for m in mods)](*mods)


def _groups(modules_to_fuse):
    if not isinstance(modules_to_fuse, (list, tuple)) or not modules_to_fuse:
        raise ValueError(f"modules_to_fuse={modules_to_fuse!r} must be a list of names or a list of such lists")
    if all(isinstance(n, str) for n in modules_to_fuse):
        return [list(modules_to_fuse)]
    if all(isinstance(g, (list, tuple)) and g and all(isinstance(n, str) for n in g) for g in modules_to_fuse):
        return [list(g) for g in modules_to_fuse]
    raise ValueError(f"modules_to_fuse={modules_to_fuse!r} must be a list of names or a list of such lists")


def _fuse(model, modules_to_fuse, inplace, fuser, want_training):
    if not inplace:
        model = copy.deepcopy(model)
    for names in _groups(modules_to_fuse):
        mods = []
        for name in names:
            try:
                mods.append(model.get_submodule(name))
            except AttributeError:
                raise ValueError(f"modules_to_fuse: {name!r} is not a submodule of the model") from None
        pattern = tuple(type(m) for m in mods)
        if pattern not in SUPPORTED_PATTERNS:
            supported = ", ".join(_pattern_names(p) for p in SUPPORTED_PATTERNS)
            raise ValueError(f"modules_to_fuse: {names} is {_pattern_names(pattern)}, which cannot be fused; "
                             f"supported patterns: {supported}")
        for name, m in zip(names, mods):
            if m.training != want_training:
                need = "model.train()" if want_training else "model.eval()"
                raise ValueError(f"modules_to_fuse: {name!r} is in {'training' if m.training else 'eval'} mode; "
                                 f"call {need} first")
            if m._forward_hooks or m._forward_pre_hooks:
                raise ValueError(f"modules_to_fuse: {name!r} has forward hooks; remove them before fusing")
        fused = fuser(mods)
        if "qconfig" in mods[0].__dict__:
            fused.qconfig = mods[0].qconfig
        fused.train(want_training)
        for i, name in enumerate(names):
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, fused if i == 0 else nn.Identity())
    return model


def fuse_modules(model: nn.Module, modules_to_fuse: Sequence[str] | Sequence[Sequence[str]],
                 inplace: bool = False) -> nn.Module:
    """Inference fusion (model in eval mode): Conv+BN becomes one Conv2d with BN folded in;
    a trailing ReLU/ReLU6 makes it a ConvReLU2d/ConvReLU62d container. The other names become Identity."""
    return _fuse(model, modules_to_fuse, inplace, _fuse_eval, want_training=False)


def fuse_modules_qat(model: nn.Module, modules_to_fuse: Sequence[str] | Sequence[Sequence[str]],
                     inplace: bool = False) -> nn.Module:
    """QAT fusion (model in training mode): Conv+BN(+ReLU/ReLU6) and Conv+ReLU/ReLU6 become fused
    containers that `prepare_qat` turns into QAT modules with simulated BN folding."""
    return _fuse(model, modules_to_fuse, inplace, _fuse_qat, want_training=True)
