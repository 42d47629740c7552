"""QuantStub / DeQuantStub: mark where a float tensor enters and leaves the quantized region."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from .qconfig import QConfig


class QuantStub(nn.Module):
    """Identity until `prepare_qat` gives it an ``activation_post_process`` (the input quantizer)."""

    def __init__(self, qconfig: QConfig | None = None) -> None:
        super().__init__()
        if qconfig is not None:
            self.qconfig = qconfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        quantizer = self._modules.get("activation_post_process")
        return x if quantizer is None else quantizer(x)


class DeQuantStub(nn.Module):
    """Identity in float and QAT models; `convert` turns it into a dequantize step."""

    def __init__(self, qconfig: QConfig | None = None) -> None:
        super().__init__()
        if qconfig is not None:
            self.qconfig = qconfig

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
