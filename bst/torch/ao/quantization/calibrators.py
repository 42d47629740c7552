"""Calibrators: per-tensor observers that ignore rare outliers instead of stretching the scale to them.

Min/max observers let one extreme value set the scale, so a long-tailed activation (the seed's
Detect convolutions) wastes most of the integer range. These observers choose a clipping range:

* `PercentileObserver`: the mean over batches of the per-batch low/high percentiles.
* `MSEObserver`: summarises recent batches (exact extremes + a weighted sample) and picks the (scale,
  zero point) with the smallest mean squared quantization error; in power-of-two mode it searches the
  powers of two directly, which is where rounding a min/max scale up to 2**k hurts most.

Which to use: MSE weighs an outlier by its squared error, so it clips only where that pays overall
(heavy tails); the percentile clips a fixed fraction whatever its size, which protects the bulk of
the values when the outliers do not matter downstream (the seed's very negative Detect logits).

Both are meant for a calibration pass (observer on, fake quant off), then ``disable_observer``. They
synchronise with the host (they select values), and they drop non-finite values element by element.
"""
from __future__ import annotations

import torch

from .observer import ObserverBase
from .pow2 import exp2_int, exponent_of_pow2
from .qparams import DEFAULT_EPS, compute_qparams


def _finite_sample(x: torch.Tensor, limit: int) -> torch.Tensor:
    """Finite values of x (float32, flat), thinned by a fixed stride to at most `limit`."""
    values = x.detach().reshape(-1).to(torch.float32)
    values = values[torch.isfinite(values)]
    if values.numel() > limit:
        step = -(-values.numel() // limit)
        values = values[::step]
    return values


class PercentileObserver(ObserverBase):
    """Range = running mean of per-batch percentiles (per tensor).

    Affine schemes take the (100 - p)th and pth percentiles; symmetric ones the pth percentile of |x|.
    """

    def __init__(self, percentile=99.99, max_samples=1 << 16, dtype=torch.quint8, qscheme=torch.per_tensor_affine,
                 reduce_range=False, quant_min=None, quant_max=None, eps=DEFAULT_EPS, pow2=False, pow2_rounding="ceil"):
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile={percentile} must be in (50, 100]")
        if max_samples < 16:
            raise ValueError(f"max_samples={max_samples} must be at least 16")
        self.percentile = float(percentile)
        self.max_samples = int(max_samples)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))

    @torch.no_grad()
    def forward(self, x):
        values = _finite_sample(x, self.max_samples)
        if values.numel() == 0:
            return x
        p = self.percentile / 100
        if self.symmetric:
            high = torch.quantile(values.abs(), p)
            low = -high
        else:
            low, high = torch.quantile(values, torch.tensor([1 - p, p], device=values.device))
        n = self.num_batches.to(torch.float32)
        first = self.num_batches == 0
        self.min_val.copy_(torch.where(first, low, self.min_val + (low - self.min_val) / (n + 1)))
        self.max_val.copy_(torch.where(first, high, self.max_val + (high - self.max_val) / (n + 1)))
        self.num_batches += 1
        return x

    def calculate_qparams(self):
        return self._qparams_from(self.min_val, self.max_val)

    def extra_repr(self):
        return f"{super().extra_repr()}, percentile={self.percentile}, min_val={self.min_val}, max_val={self.max_val}"


class MSEObserver(ObserverBase):
    """Minimum-MSE clipping range, searched on a weighted summary of the observed values (per tensor).

    Each batch contributes its ``num_extremes`` largest and smallest values exactly (weight 1), so rare
    outliers are costed at their true value, plus a strided sample of the rest weighted by how many
    values each sample stands for. ``samples``/``weights`` are ring buffers over the recent batches (not
    saved in state_dict). Candidates: scales from the full min/max scale down by 2**-max_shrink_log2
    (8 per octave, or every power of two in pow2 mode; the MSE picks the power directly); for affine
    schemes each scale is tried with five grid placements from "ends at the maximum" to "starts at
    the minimum", and with the zero point of the full range.
    """

    compute_qparams_lazily = True

    def __init__(self, num_samples=1 << 14, num_extremes=64, max_shrink_log2=10, dtype=torch.quint8,
                 qscheme=torch.per_tensor_affine, reduce_range=False, quant_min=None, quant_max=None, eps=DEFAULT_EPS,
                 pow2=False, pow2_rounding="ceil"):
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        if num_samples < 64:
            raise ValueError(f"num_samples={num_samples} must be at least 64")
        if not 0 <= 4 * num_extremes < num_samples // 8:
            raise ValueError(f"num_extremes={num_extremes} must be in [0, num_samples / 32)")
        if not 0 <= max_shrink_log2 <= 24:
            raise ValueError(f"max_shrink_log2={max_shrink_log2} must be in [0, 24]")
        self.num_samples = int(num_samples)
        self.num_extremes = int(num_extremes)
        self.max_shrink_log2 = int(max_shrink_log2)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("samples", torch.zeros(self.num_samples), persistent=False)
        self.register_buffer("weights", torch.zeros(self.num_samples), persistent=False)
        self._cursor = 0

    def _summarise(self, values):
        """(entries, weights) standing for all of `values`: exact extremes + a weighted strided sample."""
        budget = self.num_samples // 8
        m = min(self.num_extremes, values.numel() // 4)
        if m == 0:
            bulk, extremes = values, values[:0]
        else:
            top = torch.topk(values, m).values
            bottom = -torch.topk(-values, m).values
            bulk = values[(values < top[-1]) & (values > bottom[-1])]
            extremes = torch.cat([top, bottom])
        room = budget - extremes.numel()
        sample = bulk[::-(-bulk.numel() // room)] if bulk.numel() > room else bulk
        weight = bulk.numel() / max(sample.numel(), 1)
        entries = torch.cat([extremes, sample])
        weights = torch.cat([torch.ones_like(extremes), torch.full_like(sample, weight)])
        return entries, weights

    @torch.no_grad()
    def forward(self, x):
        values = x.detach().reshape(-1).to(torch.float32)
        values = values[torch.isfinite(values)]
        if values.numel() == 0:
            return x
        low, high = torch.aminmax(values)
        self.min_val.copy_(torch.minimum(self.min_val, low))
        self.max_val.copy_(torch.maximum(self.max_val, high))
        entries, weights = self._summarise(values)
        n, at = entries.numel(), self._cursor
        first = min(n, self.num_samples - at)
        self.samples[at:at + first] = entries[:first]
        self.weights[at:at + first] = weights[:first]
        self.samples[:n - first] = entries[first:]
        self.weights[:n - first] = weights[first:]
        self._cursor = (at + n) % self.num_samples
        return x

    def _candidate_scales(self):
        full_scale, _ = compute_qparams(self.min_val, self.max_val, quant_min=self.quant_min, quant_max=self.quant_max,
                                        symmetric=self.symmetric, zero_point=self.zero_point_if_symmetric,
                                        eps=self.eps, pow2=self.pow2, pow2_rounding="ceil")
        if self.pow2:
            k = exponent_of_pow2(full_scale) - torch.arange(self.max_shrink_log2 + 1, device=full_scale.device)
            return exp2_int(k)
        steps = torch.arange(8 * self.max_shrink_log2 + 1, device=full_scale.device, dtype=torch.float32)
        return torch.clamp_min(full_scale * torch.exp2(-steps / 8), self.eps)

    @torch.no_grad()
    def calculate_qparams(self):
        used = self.weights > 0
        if not bool(used.any()):
            device = self.min_val.device
            return torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
        values, weights = self.samples[used], self.weights[used]
        weights = weights / weights.sum()
        scales = self._candidate_scales()
        qmin, qmax = self.quant_min, self.quant_max
        if self.symmetric:
            zero_points = torch.full_like(scales, self.zero_point_if_symmetric)
        else:
            lo = torch.clamp_max(self.min_val, 0)
            hi = torch.clamp_min(self.max_val, 0)
            at_min = (qmin - torch.round(lo / scales)).clamp(qmin, qmax)  # grid starts at the minimum
            at_max = (qmax - torch.round(hi / scales)).clamp(qmin, qmax)  # grid ends at the maximum
            if bool(self.min_val >= 0) or bool(self.max_val <= 0):
                # one-signed data (e.g. after ReLU): the grid starts (ends) at zero, zero point = quant_min
                # (quant_max); integer kernels and requantizing adds need exactly that, and the MSE can only tie
                zero_points = torch.full_like(scales, qmin if bool(self.min_val >= 0) else qmax)
            else:
                full = torch.round(qmin - lo / scales[0]).clamp(qmin, qmax).expand_as(scales)
                placements = [torch.round(at_max + (at_min - at_max) * t) for t in (0.0, 0.25, 0.5, 0.75, 1.0)]
                zero_points = torch.cat(placements + [full])
                scales = scales.repeat(len(placements) + 1)
        errors = torch.empty_like(scales)
        for start in range(0, scales.numel(), 16):  # chunks bound the memory at 16 x num_samples
            s = scales[start:start + 16, None]
            z = zero_points[start:start + 16, None]
            q = torch.clamp(torch.round(values * (1.0 / s)) + z, qmin, qmax)
            errors[start:start + 16] = (((q - z) * s - values).square() * weights).sum(dim=1)
        best = int(torch.argmin(errors))  # ties go to the first, i.e. the widest range
        return scales[best].reshape(1).clone(), zero_points[best].reshape(1).to(torch.int32)

    def __getstate__(self):
        # the sample ring buffers are working memory of the search (not state_dict state either): pickles and
        # checkpoints leave them out, which keeps a QAT checkpoint near the size of its float model
        state = self.__dict__.copy()
        buffers = dict(state["_buffers"])
        for k in ("samples", "weights"):
            buffers[k] = buffers[k].new_zeros(0)
        state["_buffers"] = buffers
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        for k in ("samples", "weights"):
            if self._buffers[k].numel() == 0:
                self._buffers[k] = self.min_val.new_zeros(self.num_samples)
        self._cursor = 0

    def extra_repr(self):
        return f"{super().extra_repr()}, num_samples={self.num_samples}, min_val={self.min_val}, max_val={self.max_val}"
