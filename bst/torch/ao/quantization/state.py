"""Quantizer state: which modules, buffers and parameters hold it, and how it survives dtype casts.

Observers and fake quantizers derive from `QuantizerModule`. Their floating buffers and parameters
(scale, min_val/max_val, histograms, learnable scales) are float32 and *stay* float32 when the whole
model is cast: ``model.half()``, ``model.to(torch.bfloat16)`` or ``model.double()`` convert everything
else but leave quantizer state untouched (values and dtype), while device moves (``.to('cuda')``,
``.cpu()``) still apply. A half-precision scale would be rounded (2**-25 becomes 0, 2**16 becomes inf)
and min/max statistics would lose precision; that is why upstream's ``.half()`` checkpoints are safe.

Training code that averages weights (EMA) or decays them must treat quantizer state specially:
`quantizer_state_keys` names the state-dict entries to copy rather than average, and
`quantizer_parameters` lists the learnable scales to keep out of weight decay.
"""
from __future__ import annotations

import torch
import torch.nn as nn


class QuantizerModule(nn.Module):
    """Base class of observers and fake quantizers (see the module docstring).

    Buffers/parameters named in ``_resizable`` (per-channel statistics and qparams, whose length is
    only known after the first batch) take the shape of the incoming tensor on ``load_state_dict``.
    """

    _resizable: tuple[str, ...] = ()

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._resizable:
            incoming = state_dict.get(prefix + name)
            if incoming is None:
                continue
            current = self._buffers.get(name)
            if current is None:
                current = self._parameters.get(name)
            if current is not None and current.shape != incoming.shape:
                with torch.no_grad():  # in place: DDP and optimizers hold these tensor objects
                    current.data = torch.empty(incoming.shape, dtype=current.dtype, device=current.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _apply(self, fn, recurse=True):
        buffers = {n: b for n, b in self._buffers.items() if b is not None and b.is_floating_point()}
        params = {n: p.detach().clone() for n, p in self._parameters.items() if p is not None and p.is_floating_point()}
        super()._apply(fn, recurse)
        for name, old in buffers.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        for name, old in params.items():
            p = self._parameters[name]
            if p is not None and p.dtype != torch.float32:
                p.data = old.to(device=p.device, dtype=torch.float32)
        return self


def is_quantizer_state(module: nn.Module) -> bool:
    """True for observers and fake quantizers: their state must be copied, never averaged."""
    return isinstance(module, QuantizerModule)


def quantizer_state_keys(model: nn.Module) -> set[str]:
    """State-dict keys of `model` that belong to observers / fake quantizers (scale, zero_point,
    min_val, max_val, enable flags, learnable scales, ...)."""
    keys = set()
    for name, module in model.named_modules():
        if is_quantizer_state(module):
            prefix = f"{name}." if name else ""
            keys.update(prefix + k for k in module.state_dict().keys())
    return keys


def quantizer_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Learnable quantization parameters (``scale`` / ``log2_scale``): exclude them from weight decay."""
    seen, out = set(), []
    for module in model.modules():
        if is_quantizer_state(module):
            for p in module.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


@torch.no_grad()
def copy_quantizer_state_(dst: nn.Module, src: nn.Module, keys: set[str] | None = None,
                          src_state: dict[str, torch.Tensor] | None = None,
                          dst_state: dict[str, torch.Tensor] | None = None) -> None:
    """Copy every quantizer buffer/parameter of `src` into `dst` (same architecture), resizing
    per-channel entries as needed. Meant for EMA models, which must not average this state. A caller that copies
    every step may pass what does not change between calls (`keys`, from `quantizer_state_keys`) and the state
    dicts it already holds (`dst_state` must be ``dst.state_dict(keep_vars=True)``, whose tensors are dst's own)."""
    src_state = src.state_dict() if src_state is None else src_state
    dst_state = dst.state_dict(keep_vars=True) if dst_state is None else dst_state
    for key in quantizer_state_keys(src) if keys is None else keys:
        if key not in dst_state:
            raise ValueError(f"dst: has no quantizer entry {key!r}; is it the same architecture as src?")
        target, value = dst_state[key], src_state[key]
        if target.shape != value.shape:
            target.data = torch.empty(value.shape, dtype=target.dtype, device=target.device)
        target.copy_(value)


def module_attributes(model: nn.Module) -> dict[str, dict[str, object]]:
    """The plain-Python settings a state_dict does not hold, of every module that names them in its class's
    ``_state_attributes`` (a fused Conv+BN's ``freeze_bn``): {module name: {attribute: value}}. A checkpoint that
    stores a prepared model as its state_dict stores this beside it; `load_module_attributes` puts it back."""
    out = {}
    for name, module in model.named_modules():
        names = getattr(type(module), "_state_attributes", ())
        if names:
            out[name] = {a: getattr(module, a) for a in names}
    return out


def load_module_attributes(model: nn.Module, attributes: dict[str, dict[str, object]]) -> None:
    """Set what `module_attributes` returned on a model of the same architecture, then re-apply each such module's
    training mode (its settings may change what ``train()`` does to its children)."""
    for name, values in attributes.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"attributes: the model has no module {name!r}; is it the same architecture?") from None
        allowed = getattr(type(module), "_state_attributes", ())
        unknown = sorted(set(values) - set(allowed))
        if unknown:
            raise ValueError(f"attributes: {name} ({type(module).__name__}) has no settable state {unknown}")
        for a, v in values.items():
            setattr(module, a, v)
        module.train(module.training)
