"""FloatFunctional: tensor arithmetic whose result goes through an output quantizer.

Eager-mode QAT can only quantize what passes through a module, so skip-adds and concats call a
`FloatFunctional` instead of ``+`` / ``torch.cat``. ``activation_post_process`` is an Identity until
`prepare_qat` replaces it with ``qconfig.activation()`` (set a ``qconfig`` on the FloatFunctional or
any parent); with ``qconfig = None`` it stays float.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import NoReturn

import torch
import torch.nn as nn
import torch.nn.functional as F


class FloatFunctional(nn.Module):
    """``add``, ``add_relu``, ``mul``, ``cat``, each fake-quantizing its output."""

    def __init__(self) -> None:
        super().__init__()
        self.activation_post_process = nn.Identity()

    def forward(self, x: torch.Tensor) -> NoReturn:
        raise RuntimeError("FloatFunctional is not called directly; use its add / add_relu / mul / cat methods")

    def _finish(self, out, inputs):
        recorder = self.__dict__.get("_input_recorder")  # set only while `convert` traces the model
        if recorder is not None:
            recorder(self, inputs)
        return self.activation_post_process(out)

    def add(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._finish(torch.add(x, y), (x, y))

    def add_relu(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._finish(F.relu(torch.add(x, y)), (x, y))

    def mul(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self._finish(torch.mul(x, y), (x, y))

    def cat(self, tensors: Iterable[torch.Tensor], dim: int = 0) -> torch.Tensor:
        tensors = list(tensors)
        return self._finish(torch.cat(tensors, dim), tuple(tensors))
