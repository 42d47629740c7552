"""Float fused containers: what `fuse_modules_qat` puts in place of Conv(+BN)(+ReLU/ReLU6).

They compute exactly what the unfused modules did; `prepare_qat` swaps them for their QAT versions
(`bst.torch.ao.nn.intrinsic.qat`).
"""
from __future__ import annotations

import torch.nn as nn


class _FusedModule(nn.Sequential):
    _parts: tuple = ()

    def __init__(self, *modules: nn.Module) -> None:
        expected = self._parts
        if len(modules) != len(expected) or not all(type(m) is t for m, t in zip(modules, expected)):
            got = ", ".join(type(m).__name__ for m in modules)
            want = ", ".join(t.__name__ for t in expected)
            raise ValueError(f"modules=({got}): {type(self).__name__} takes ({want})")
        super().__init__(*modules)


class ConvReLU2d(_FusedModule):
    _parts = (nn.Conv2d, nn.ReLU)


class ConvReLU62d(_FusedModule):
    _parts = (nn.Conv2d, nn.ReLU6)


class ConvBn2d(_FusedModule):
    _parts = (nn.Conv2d, nn.BatchNorm2d)


class ConvBnReLU2d(_FusedModule):
    _parts = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU)


class ConvBnReLU62d(_FusedModule):
    _parts = (nn.Conv2d, nn.BatchNorm2d, nn.ReLU6)
