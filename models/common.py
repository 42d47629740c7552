"""YOLOv5 v7.0 building blocks.

Class names and attribute names (conv/bn/act, cv1/cv2/cv3/m, add, d, ...) are those of upstream
YOLOv5, because official release checkpoints pickle whole modules at `models.common.<Name>`.

The activation is passed in (`act=`), never read from a class attribute: `act=True` means SiLU (the
release default), `False`/`None` no activation, an `nn.Module` that module, a name ('silu', 'relu',
'relu6', ...) the activation of that name.

Quantization hooks: a module may carry `qadd` / `qcat` (objects with `.add(a, b)` / `.cat(xs, dim)`,
e.g. `bst.torch.ao.nn.quantized.FloatFunctional`) that the QAT preparation attaches; then the
skip-add or concat goes through them so its output is fake-quantized. Without them it is plain
torch arithmetic. Checkpoints written by upstream lack these attributes, hence `getattr`.
"""
from __future__ import annotations

import torch
import torch.nn as nn

ACTIVATIONS = {
    "silu": nn.SiLU,
    "relu": nn.ReLU,
    "relu6": nn.ReLU6,
    "hardswish": nn.Hardswish,
    "leakyrelu": lambda: nn.LeakyReLU(0.1),
    "identity": nn.Identity,
}


def activation_name(act) -> str:
    """Normalise 'ReLU', 'nn.ReLU()', 'relu' or an nn.Module to a key of ACTIVATIONS."""
    if isinstance(act, nn.Module):
        return type(act).__name__.lower()
    key = str(act).strip().lower()
    for prefix in ("torch.nn.", "nn."):
        key = key[len(prefix):] if key.startswith(prefix) else key
    key = key.removesuffix("()")
    if key not in ACTIVATIONS:
        raise ValueError(f"activation {act!r} is not supported; choose one of {', '.join(ACTIVATIONS)}")
    return key


def model_activation(model: nn.Module) -> str:
    """The activation a model uses (a key of ACTIVATIONS): its yaml's record if present, else its first Conv block's
    module, else SiLU (upstream's default)."""
    yaml = getattr(model, "yaml", None)
    if isinstance(yaml, dict) and yaml.get("activation"):
        return activation_name(yaml["activation"])
    for m in model.modules():
        if isinstance(m, Conv):
            return activation_name(m.act)
    return "silu"


def make_activation(act=True) -> nn.Module:
    """A fresh activation module from True (SiLU) / False / None / a name / a module."""
    if act is True:
        return nn.SiLU()
    if act is False or act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    return ACTIVATIONS[activation_name(act)]()


def autopad(k, p=None, d=1):
    """'same' padding for kernel k and dilation d."""
    if d > 1:
        k = d * (k - 1) + 1 if isinstance(k, int) else [d * (x - 1) + 1 for x in k]
    if p is None:
        p = k // 2 if isinstance(k, int) else [x // 2 for x in k]
    return p


def skip_add(module: nn.Module, a, b):
    op = getattr(module, "qadd", None)
    return a + b if op is None else op.add(a, b)


def concat(module: nn.Module, xs, dim: int):
    op = getattr(module, "qcat", None)
    return torch.cat(xs, dim) if op is None else op.cat(list(xs), dim)


class Conv(nn.Module):
    """Conv2d + BatchNorm2d + activation."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, d=1, act=True):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), groups=g, dilation=d, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = make_activation(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))

    def forward_fuse(self, x):
        return self.act(self.conv(x))


class DWConv(Conv):
    """Depth-wise convolution (groups = gcd(c1, c2))."""

    def __init__(self, c1, c2, k=1, s=1, d=1, act=True):
        super().__init__(c1, c2, k, s, g=torch.gcd(torch.tensor(c1), torch.tensor(c2)).item(), d=d, act=act)


class Bottleneck(nn.Module):
    """1x1 then 3x3 conv, with a skip-add when shortcut and c1 == c2."""

    def __init__(self, c1, c2, shortcut=True, g=1, e=0.5, act=True):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_, c2, 3, 1, g=g, act=act)
        self.add = shortcut and c1 == c2

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return skip_add(self, x, y) if self.add else y


class C3(nn.Module):
    """CSP bottleneck with 3 convolutions."""

    def __init__(self, c1, c2, n=1, shortcut=True, g=1, e=0.5, act=True):
        super().__init__()
        c_ = int(c2 * e)
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c1, c_, 1, 1, act=act)
        self.cv3 = Conv(2 * c_, c2, 1, act=act)
        self.m = nn.Sequential(*(Bottleneck(c_, c_, shortcut, g, e=1.0, act=act) for _ in range(n)))

    def forward(self, x):
        return self.cv3(concat(self, (self.m(self.cv1(x)), self.cv2(x)), 1))


class SPP(nn.Module):
    """Spatial pyramid pooling (YOLOv3-SPP), found in older checkpoints."""

    def __init__(self, c1, c2, k=(5, 9, 13), act=True):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * (len(k) + 1), c2, 1, 1, act=act)
        self.m = nn.ModuleList(nn.MaxPool2d(kernel_size=x, stride=1, padding=x // 2) for x in k)

    def forward(self, x):
        x = self.cv1(x)
        return self.cv2(concat(self, [x] + [m(x) for m in self.m], 1))


class SPPF(nn.Module):
    """Fast SPP: three chained 5x5 max-pools, equivalent to SPP(k=(5, 9, 13))."""

    def __init__(self, c1, c2, k=5, act=True):
        super().__init__()
        c_ = c1 // 2
        self.cv1 = Conv(c1, c_, 1, 1, act=act)
        self.cv2 = Conv(c_ * 4, c2, 1, 1, act=act)
        self.m = nn.MaxPool2d(kernel_size=k, stride=1, padding=k // 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        return self.cv2(concat(self, (x, y1, y2, self.m(y2)), 1))


class Focus(nn.Module):
    """Space-to-depth then conv (YOLOv5 <= v5.0 stem)."""

    def __init__(self, c1, c2, k=1, s=1, p=None, g=1, act=True):
        super().__init__()
        self.conv = Conv(c1 * 4, c2, k, s, p, g, act=act)

    def forward(self, x):
        parts = (x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2])
        return self.conv(concat(self, parts, 1))


class Concat(nn.Module):
    """Concatenate a list of tensors along dimension d."""

    def __init__(self, dimension=1):
        super().__init__()
        self.d = dimension

    def forward(self, x):
        return concat(self, x, self.d)
