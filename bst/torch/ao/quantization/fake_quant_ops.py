"""Fake quantization ops: torch's core kernels, or on CPU an equivalent chain of vectorized ops.

torch's CPU fake-quant kernels (``fake_quantize_per_{tensor,channel}_affine``, also inside
``fused_moving_avg_obs_fake_quant``) run a scalar loop; on a float32 tensor they are 20-40x slower
than a multiply. On CPU float32 tensors `fake_quantize` therefore computes the same numbers with
vectorized core ops (multiply by 1/scale, round half to even, clamp, multiply by scale) and keeps the
straight-through mask for the backward pass. Every step is exact or rounds identically to the
kernel (``x * (1/scale)`` in float32, ``nearbyint``, integer clamp), so results are bit-identical;
the tests check this against the core op. CUDA tensors and other dtypes use the core kernels.

Rounding "half_up" (floor(x * (1/scale) + 1/2): what an adder and an arithmetic shift compute) has
no core kernel; it always takes the vectorized path, on every device.
"""
from __future__ import annotations

import torch

ROUNDINGS = ("half_even", "half_up")  # how a value halfway between two integers is rounded


def check_rounding(rounding: str) -> str:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}: use 'half_even' (torch, ONNX QuantizeLinear) or 'half_up' (an "
                         "adder and an arithmetic shift: floor(x + 1/2))")
    return rounding


def round_(t: torch.Tensor, rounding: str = "half_even") -> torch.Tensor:
    """Round `t` in place to integers: half to even, or half up (floor(t + 1/2), ties towards +inf)."""
    if rounding == "half_up":
        return t.add_(0.5).floor_()
    return t.round_()


class _VectorizedFakeQuantize(torch.autograd.Function):
    """Forward: the fake-quantized tensor; backward: the straight-through mask (1 inside the range).

    The mask is kept as float32 (written over the scaled input, no extra allocation): comparisons
    into a bool tensor and bool-times-float products are several times slower on CPU than float ops.
    ``inv_scale``, ``scale`` and the clamp bounds ``low``/``high`` (= quant_min/max - zero_point) are
    Python floats per tensor, or broadcastable tensors per channel.
    """

    @staticmethod
    def forward(ctx, x, inv_scale, scale, low, high, rounding="half_even"):
        t = torch.mul(x, inv_scale)
        round_(t, rounding)
        out = torch.clamp(t, low, high)
        mask = torch.eq(out, t, out=t)
        out.mul_(scale)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def _use_vectorized(x: torch.Tensor) -> bool:
    # torch.jit.trace cannot save a custom autograd function: a traced model (TorchScript) gets the core kernels,
    # which compute the same numbers
    return x.device.type == "cpu" and x.dtype == torch.float32 and not torch.jit.is_tracing()


def fake_quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                             quant_max: int, rounding: str = "half_even") -> torch.Tensor:
    """= torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max); with rounding "half_up"
    the same arithmetic with floor(x * (1/scale) + 1/2) in place of round half to even (no core kernel has it)."""
    if rounding == "half_up" and not _use_vectorized(x):
        inv = torch.reciprocal(scale.reshape(()).float()).to(x.dtype)
        zp = zero_point.reshape(()).to(x.dtype)
        return _VectorizedFakeQuantize.apply(x, inv, scale.reshape(()).to(x.dtype), quant_min - zp, quant_max - zp,
                                             rounding)
    if not _use_vectorized(x):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)
    # on the CPU reading the qparams costs nothing; float32 values are exact as Python floats
    scale_f = float(scale.reshape(()))
    inv_f = float(torch.reciprocal(scale.reshape(())))  # 1.0f / scale, as the kernel computes it
    zp = int(zero_point.reshape(()))
    return _VectorizedFakeQuantize.apply(x, inv_f, scale_f, float(quant_min - zp), float(quant_max - zp), rounding)


def fake_quantize_per_channel(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int,
                              quant_min: int, quant_max: int, rounding: str = "half_even") -> torch.Tensor:
    """= torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max); "half_up"
    rounding as in `fake_quantize_per_tensor`."""
    if rounding != "half_up" and not _use_vectorized(x):
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max)
    shape = [1] * x.dim()
    shape[axis] = -1
    scale = scale.reshape(shape).float()
    inv = torch.reciprocal(scale)
    shared = _shared_zero_point(zero_point)
    if shared is not None:  # symmetric schemes: one clamp range for every channel, as Python numbers (much faster)
        low, high = float(quant_min - shared), float(quant_max - shared)
        if x.dtype != torch.float32:
            scale, inv = scale.to(x.dtype), inv.to(x.dtype)
        return _VectorizedFakeQuantize.apply(x, inv, scale, low, high, rounding)
    zp = zero_point.reshape(shape).to(torch.float32)
    if x.dtype != torch.float32:
        scale, inv, zp = scale.to(x.dtype), inv.to(x.dtype), zp.to(x.dtype)
    return _VectorizedFakeQuantize.apply(x, inv, scale, quant_min - zp, quant_max - zp, rounding)


def _shared_zero_point(zero_point: torch.Tensor) -> int | None:
    """The zero point every channel has, for a zero-point tensor on the CPU with one value throughout; else None."""
    if zero_point.device.type != "cpu" or zero_point.numel() == 0:
        return None
    values = zero_point.detach().reshape(-1).numpy()
    first = values[0]
    return int(first) if bool((values == first).all()) else None
