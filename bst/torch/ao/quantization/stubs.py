"""QuantStub / DeQuantStub: mark where a float tensor enters and leaves the quantized region."""
from __future__ import annotations

import torch.nn as nn


class QuantStub(nn.Module):
    """Identity until `prepare_qat` gives it an ``activation_post_process`` (the input quantizer)."""

    def __init__(self, qconfig=None):
        super().__init__()
        if qconfig is not None:
            self.qconfig = qconfig

    def forward(self, x):
        quantizer = self._modules.get("activation_post_process")
        return x if quantizer is None else quantizer(x)


class DeQuantStub(nn.Module):
    """Identity in float and QAT models; `convert` turns it into a dequantize step."""

    def __init__(self, qconfig=None):
        super().__init__()
        if qconfig is not None:
            self.qconfig = qconfig

    def forward(self, x):
        return x
