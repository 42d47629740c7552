"""Fake quantization ops: torch's core kernels, or on CPU an equivalent chain of vectorized ops.

torch's CPU fake-quant kernels (``fake_quantize_per_{tensor,channel}_affine``, also inside
``fused_moving_avg_obs_fake_quant``) run a scalar loop; on a float32 tensor they are 20-40x slower
than a multiply. On CPU float32 tensors `fake_quantize` therefore computes the same numbers with
vectorized core ops (multiply by 1/scale, round half to even, clamp, multiply by scale) and keeps the
straight-through mask for the backward pass. Every step is exact or rounds identically to the
kernel (``x * (1/scale)`` in float32, ``nearbyint``, integer clamp), so results are bit-identical;
the tests check this against the core op. CUDA tensors and other dtypes use the core kernels.
"""
from __future__ import annotations

import torch


class _VectorizedFakeQuantize(torch.autograd.Function):
    """Forward: the fake-quantized tensor; backward: the straight-through mask (1 inside the range).

    The mask is kept as float32 (written over the scaled input, no extra allocation): comparisons
    into a bool tensor and bool-times-float products are several times slower on CPU than float ops.
    ``inv_scale``, ``scale`` and the clamp bounds ``low``/``high`` (= quant_min/max - zero_point) are
    Python floats per tensor, or broadcastable tensors per channel.
    """

    @staticmethod
    def forward(ctx, x, inv_scale, scale, low, high):
        t = torch.mul(x, inv_scale)
        t.round_()
        out = torch.clamp(t, low, high)
        mask = torch.eq(out, t, out=t)
        out.mul_(scale)
        ctx.save_for_backward(mask)
        return out

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None


def _use_vectorized(x: torch.Tensor) -> bool:
    return x.device.type == "cpu" and x.dtype == torch.float32


def fake_quantize_per_tensor(x, scale, zero_point, quant_min: int, quant_max: int):
    """= torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)."""
    if not _use_vectorized(x):
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)
    # on the CPU reading the qparams costs nothing; float32 values are exact as Python floats
    scale_f = float(scale.reshape(()))
    inv_f = float(torch.reciprocal(scale.reshape(())))  # 1.0f / scale, as the kernel computes it
    zp = int(zero_point.reshape(()))
    return _VectorizedFakeQuantize.apply(x, inv_f, scale_f, float(quant_min - zp), float(quant_max - zp))


def fake_quantize_per_channel(x, scale, zero_point, axis: int, quant_min: int, quant_max: int):
    """= torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max)."""
    if not _use_vectorized(x):
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max)
    shape = [1] * x.dim()
    shape[axis] = -1
    scale = scale.reshape(shape)
    zp = zero_point.reshape(shape).to(torch.float32)
    return _VectorizedFakeQuantize.apply(x, torch.reciprocal(scale), scale, quant_min - zp, quant_max - zp)
