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
synchronise with the host (they select values), and they drop non-finite values element by element (a batch
without any is observed in place). The MSE observer finds its extremes and sample on a large batch from block
maxima and positions, in a few passes over the batch instead of two sorts and a compacting copy, with the same
result to the bit.

After calibration (``training_update="track"``, the default), an observer that stays on while fake
quantization is on (QAT training with observers on) no longer searches: its first such forward fixes
the calibrated (scale, zero point) and the average batch range seen so far as the reference; from then
on each batch costs one min/max, the average batch range follows it (running mean over the first
``1 / averaging_constant`` batches, then an exponential moving average), and the qparams are the
calibrated ones scaled by how much that average range has grown or shrunk since the reference (to the
nearest power of two in pow2 mode). The zero point keeps the calibrated grid placement (and stays at
the range end for one-signed data). ``training_update="search"`` repeats the full search on every batch
instead, as a plain observer would (much slower).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .observer import ObserverBase, _check_averaging_constant, min_max
from .pow2 import _SQRT_HALF, MAX_EXPONENT, MIN_EXPONENT, exp2_int, exponent_of_pow2, log2_exponent
from .qparams import DEFAULT_EPS, compute_qparams


def _thinned(values: torch.Tensor, limit: int) -> torch.Tensor:
    """A flat tensor thinned by a fixed stride to at most `limit` values."""
    if values.numel() > limit:
        step = -(-values.numel() // limit)
        values = values[::step]
    return values


# The int32 bit pattern of -0.0: the smallest of all int32 values, so no other float32 maps to it
_NEGATIVE_ZERO_BITS = -(1 << 31)


def _has_both_zeros(values: torch.Tensor) -> bool:
    """Whether the float32 `values` hold both +0.0 and -0.0, the only equal float32 numbers with different bits:
    only then can the choice between tied elements (which one a selection returns) show in its result."""
    bits = values.view(torch.int32)
    return bool(bits.amin() == _NEGATIVE_ZERO_BITS) and bool((bits == 0).any())


def _block_size(numel: int, m: int) -> int:
    """Block length for `_largest_by_blocks`: a power of two in [32, 1024] near sqrt(numel / m), where the block
    maxima to rank (numel / size) and the values in the ~m blocks chosen (m * size) are about as many."""
    return 1 << min(max(round(math.log2(numel / m) / 2), 5), 10)


def _largest_by_blocks(values: torch.Tensor, keys: torch.Tensor, size: int, m: int, negate: bool):
    """``torch.topk(v, m).values`` of v = `values` (or of -values when `negate`), from the maxima `keys` of v over
    consecutive blocks of `size` elements, and the positions in `values` of every element of v >= the m-th largest
    (None when ties make them too many to list).

    The m-th largest block maximum t is at most the m-th largest element, so the blocks with maximum >= t hold
    every element the answer can contain, ties with it included. Usually that is about m blocks; when ties at t
    make it many, the blocks with maximum > t (fewer than m) hold every element > t, and the rest of the answer
    is t repeated. Tied elements are returned by value: that gives topk's bits exactly unless the ties are
    zeros of both signs, which the caller rules out."""
    numel = values.numel()
    t = torch.topk(keys, m).values[-1]
    chosen = keys >= t
    complete = int(chosen.sum()) * size <= numel // 8
    if not complete:
        chosen = keys > t
    blocks = chosen.nonzero().squeeze(1)
    positions = (blocks[:, None] * size + torch.arange(size, device=values.device)).reshape(-1)
    if numel % size and positions.numel() and int(positions[-1]) >= numel:  # the short last block
        positions = positions[positions < numel]
    candidates = -values[positions] if negate else values[positions]
    if not complete:
        above = candidates > t
        count = int(above.sum())
        if count < m:  # the m-th largest is t: the elements above it, then t for the ties
            ties = t.reshape(1).expand(m - count)
            return torch.cat([torch.sort(candidates[above], descending=True).values, ties]), None
        # else the m-th largest is > t, so every element >= it is among the candidates after all
    largest = torch.topk(candidates, m).values
    return largest, positions[candidates >= largest[-1]]


# Below this many values the MSE summary sorts and compacts the tensor directly (it is cheap there)
_BLOCKED_MIN_NUMEL = 1 << 14
_COUNT_ROW = 64  # row length (or the largest power of two dividing the size) of the bulk count under ties


def _true_per_row(rows: torch.Tensor) -> torch.Tensor:
    """The number of True values in each row of a contiguous 2-d bool tensor, int64. Rows of a multiple of 8 bytes
    are added as int64 words (8 flags each, every byte 0 or 1): the byte lanes of a row's word sum stay below 256, so
    no lane carries into the next, and the lanes then add up to the count. Several times faster than summing the
    flags one by one."""
    width = rows.shape[1]
    if width % 8 or width // 8 > 255 or rows.device.type != "cpu":
        return rows.sum(1, dtype=torch.int32).to(torch.int64)
    lanes = rows.view(torch.int64).sum(1).view(torch.uint8).reshape(-1, 8)
    return lanes.sum(1, dtype=torch.int64)


def _kth_true(rows: torch.Tensor, counts: torch.Tensor, ends: torch.Tensor, wanted: torch.Tensor) -> torch.Tensor:
    """Flat positions of the k-th True element of the flattened bool `rows` for each k (1-based, ascending) in
    `wanted`, given the True count of each row (`counts`) and its running total (`ends`, int64). The row of each k comes
    from the running total, then a running count inside that row alone: the same positions as a running count over
    the whole tensor, without writing one."""
    row = torch.searchsorted(ends, wanted)
    rank = (wanted - (ends[row] - counts[row])).unsqueeze(1)
    within = torch.searchsorted(torch.cumsum(rows[row], 1, dtype=torch.int64), rank).squeeze(1)
    return row * rows.shape[1] + within


def _tied_bulk(values: torch.Tensor, low, high, top_at, bottom_at, room: int):
    """(sample, bulk_count) of the bulk, the values strictly between `low` and `high`, when ties at an extreme made
    its positions too many to list (`top_at` or `bottom_at` None): every step-th bulk value in order, as many as fit
    in `room`. Where one side's positions are listed (ReLU zeros tie at the low end only) one comparison finds the
    bulk and that side's few values, which are then cleared by position. The bulk is counted row by row."""
    if top_at is None and bottom_at is None:
        inside = (values < high) & (values > low)
    else:
        inside = values > low if bottom_at is None else values < high
        inside[top_at if bottom_at is None else bottom_at] = False
    rows = inside.view(-1, math.gcd(values.numel(), _COUNT_ROW))
    counts = _true_per_row(rows)
    ends = torch.cumsum(counts, 0)
    bulk_count = int(ends[-1])
    if bulk_count <= room:
        return values[inside], bulk_count
    wanted = torch.arange(1, bulk_count + 1, -(-bulk_count // room), device=values.device)
    return values[_kth_true(rows, counts, ends, wanted)], bulk_count


def _summary(extremes: torch.Tensor, sample: torch.Tensor, bulk_count: int):
    """MSE summary entries and weights: the extremes (weight 1) and the bulk sample (each standing for
    bulk_count / len(sample) values)."""
    weight = bulk_count / max(sample.numel(), 1)
    entries = torch.cat([extremes, sample])
    weights = torch.cat([torch.ones_like(extremes), torch.full_like(sample, weight)])
    return entries, weights


TRAINING_UPDATES = ("track", "search")


class _TrackedCalibrator(ObserverBase):
    """Shared by the calibrators: the average batch range, and tracking of the calibrated qparams after
    calibration (see the module docstring). Subclasses implement ``_search_qparams()`` and
    ``_observe(values, low, high)``: the calibration statistics of the finite float32 values and their extremes."""

    _TRACK_BUFFERS = ("batch_range", "batch_count", "reference")

    def _init_tracking(self, training_update, averaging_constant):
        if training_update not in TRAINING_UPDATES:
            raise ValueError(f"training_update={training_update!r} must be one of {', '.join(TRAINING_UPDATES)}")
        self.training_update = training_update
        self.averaging_constant = _check_averaging_constant(averaging_constant)
        self._add_tracking_buffers()

    def _add_tracking_buffers(self):
        # (mean batch min, mean batch max); number of batches averaged; (scale, zero point, reference min,
        # reference max) fixed when tracking begins, scale 0 while calibrating
        self.register_buffer("batch_range", torch.zeros(2))
        self.register_buffer("batch_count", torch.tensor(0, dtype=torch.int64))
        self.register_buffer("reference", torch.zeros(4))
        self._tracking = False

    @property
    def tracking(self) -> bool:
        """True once the calibrated qparams are being tracked (``training_update="track"`` only)."""
        return self._tracking

    @torch.no_grad()
    def begin_tracking(self, calibrated: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Fix the reference: the calibrated qparams (one last search) and the average batch range so far.
        Called by the fake quantizer on its first forward with both observer and fake quantization on, with the
        (scale, zero point) it holds as `calibrated`: those are used where nothing is left to search (a copy,
        pickle or state_dict of a calibrated observer does not carry the search's working memory)."""
        if self.training_update != "track" or self._tracking:
            return
        if calibrated is not None and not self._can_search():
            scale, zero_point = calibrated
        else:
            scale, zero_point = self._search_qparams()
        self.reference.copy_(torch.cat([scale.reshape(1).float(), zero_point.reshape(1).float(), self.batch_range]))
        self._tracking = True

    def _can_search(self) -> bool:
        """Whether `_search_qparams` has observations to search (calibrators whose working memory is not copied
        say when it is empty)."""
        return True

    @torch.no_grad()
    def _update_batch_range(self, low, high):
        """Running mean of per-batch (min, max) for 1 / averaging_constant batches, then an EMA; a
        non-finite batch leaves it as it was (no host synchronisation)."""
        current = torch.stack([low, high]).float()
        finite = torch.isfinite(current).all()
        weight = 1.0 / torch.clamp(self.batch_count + 1, max=round(1 / self.averaging_constant)).float()
        self.batch_range.copy_(torch.where(finite, self.batch_range + (current - self.batch_range) * weight,
                                           self.batch_range))
        self.batch_count.add_(finite.to(torch.int64))

    @torch.no_grad()
    def _update_batch_range_scalar(self, low: float, high: float):
        """`_update_batch_range` in float32 numpy scalars (CPU: two numbers, no dozen tensor ops); same result."""
        if not (math.isfinite(low) and math.isfinite(high)):
            return
        count = self.batch_count.item()
        weight = np.float32(1.0) / np.float32(min(count + 1, round(1 / self.averaging_constant)))
        old = self.batch_range.numpy()
        current = np.array([low, high], dtype=np.float32)
        self.batch_range.copy_(torch.from_numpy(old + (current - old) * weight))
        self.batch_count.fill_(count + 1)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tracking:
            if x.numel():
                low, high = min_max(x.detach().to(torch.float32))
                if low.device.type == "cpu":
                    self._update_batch_range_scalar(low.item(), high.item())
                else:
                    self._update_batch_range(low, high)
            return x
        values = x.detach().reshape(-1).to(torch.float32).contiguous()
        if not values.numel():
            return x
        # min and max propagate NaN, so two finite ends mean every element is finite: the usual batch is observed
        # in place, without the element-wise filter and its copy of the whole tensor
        low, high = min_max(values)
        lo, hi = low.item(), high.item()
        if not (math.isfinite(lo) and math.isfinite(hi)):
            values = values[torch.isfinite(values)]
            if not values.numel():
                return x
            low, high = min_max(values)
            lo, hi = low.item(), high.item()
        if low.device.type == "cpu":  # the two numbers are on the host already
            self._update_batch_range_scalar(lo, hi)
        else:
            self._update_batch_range(low, high)
        self._observe(values, low, high)
        return x

    @torch.no_grad()
    def _tracked_qparams(self):
        scale, zero_point, ref_low, ref_high = self.reference
        low, high = self.batch_range
        if self.symmetric:
            now, then = torch.maximum(-low, high), torch.maximum(-ref_low, ref_high)
        else:
            now, then = high - low, ref_high - ref_low
        ok = (then > 0) & (now > 0) & torch.isfinite(now / then)
        factor = torch.where(ok, now / torch.where(ok, then, torch.ones_like(then)), torch.ones_like(then))
        if self.pow2:  # the calibrated power of two, moved by the nearest power of two of the factor
            new_scale = exp2_int(exponent_of_pow2(scale) + log2_exponent(factor, "round"))
        else:
            new_scale = torch.clamp_min(scale * factor, self.eps)
        qmin, qmax = self.quant_min, self.quant_max
        if self.symmetric:
            new_zero_point = zero_point
        else:  # keep the grid's lower end where the calibrated one was, relative to the batch minimum
            grid_low = (qmin - zero_point) * scale * torch.where(ref_low < 0, low / ref_low, torch.ones_like(low))
            moved = torch.clamp(torch.round(qmin - grid_low / new_scale), qmin, qmax)
            one_signed = (zero_point == qmin) | (zero_point == qmax)
            new_zero_point = torch.where(one_signed | ~torch.isfinite(moved), zero_point, moved)
        return new_scale.reshape(1).clone(), new_zero_point.reshape(1).to(torch.int32)

    def _tracked_qparams_scalar(self):
        """`_tracked_qparams` with float32 numpy scalars (CPU); the same numbers."""
        f32 = np.float32
        scale, zero_point, ref_low, ref_high = (f32(v) for v in self.reference.numpy())
        low, high = (f32(v) for v in self.batch_range.numpy())
        if self.symmetric:
            now, then = max(-low, high), max(-ref_low, ref_high)
        else:
            now, then = high - low, ref_high - ref_low
        with np.errstate(all="ignore"):
            factor = now / then if then > 0 and now > 0 else f32(1)
        factor = factor if np.isfinite(factor) else f32(1)
        if self.pow2:
            mantissa, exponent = math.frexp(float(factor))
            step = exponent - (1 if mantissa < _SQRT_HALF else 0)
            k = math.frexp(float(scale))[1] - 1 + step
            new_scale = math.ldexp(1.0, min(max(k, MIN_EXPONENT), MAX_EXPONENT))
        else:
            new_scale = float(max(scale * factor, f32(self.eps)))
        qmin, qmax = self.quant_min, self.quant_max
        if self.symmetric or zero_point in (qmin, qmax):
            return new_scale, int(zero_point)
        with np.errstate(all="ignore"):
            grid_low = (f32(qmin) - zero_point) * scale * (low / ref_low if ref_low < 0 else f32(1))
            moved = np.round(f32(qmin) - grid_low / f32(new_scale))
        if not np.isfinite(moved):
            return new_scale, int(zero_point)
        return new_scale, int(min(max(moved, qmin), qmax))

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._tracked_qparams() if self._tracking else self._search_qparams()

    def calculate_qparams_scalar(self) -> tuple[float, int]:
        """(scale, zero_point) as Python numbers, equal to `calculate_qparams` (cheaper on the CPU)."""
        if self._tracking:
            return self._tracked_qparams_scalar()
        scale, zero_point = self._search_qparams()
        return scale.item(), int(zero_point.item())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        absent = [k for k in self._TRACK_BUFFERS if prefix + k not in state_dict]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for k in absent:  # state saved before tracking existed: calibrating, as it was then
            if prefix + k in missing_keys:
                missing_keys.remove(prefix + k)
        if absent:
            self.batch_range.zero_(), self.batch_count.zero_(), self.reference.zero_()
        self._tracking = self.training_update == "track" and bool(self.reference[0] > 0)

    def __setstate__(self, state):
        super().__setstate__(state)
        if "reference" not in self._buffers:  # pickled before tracking existed
            self.training_update, self.averaging_constant = "track", 0.01
            self._add_tracking_buffers()


class PercentileObserver(_TrackedCalibrator):
    """Range = running mean of per-batch percentiles (per tensor).

    Affine schemes take the (100 - p)th and pth percentiles; symmetric ones the pth percentile of |x|.
    """

    def __init__(self, percentile: float = 99.99, max_samples: int = 1 << 16, dtype: torch.dtype = torch.quint8,
                 qscheme: torch.qscheme = torch.per_tensor_affine, reduce_range: bool = False,
                 quant_min: int | None = None, quant_max: int | None = None, eps: float = DEFAULT_EPS,
                 pow2: bool = False, pow2_rounding: str = "ceil", training_update: str = "track",
                 averaging_constant: float = 0.01) -> None:
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        self._init_tracking(training_update, averaging_constant)
        if not 50 < percentile <= 100:
            raise ValueError(f"percentile={percentile} must be in (50, 100]")
        if max_samples < 16:
            raise ValueError(f"max_samples={max_samples} must be at least 16")
        self.percentile = float(percentile)
        self.max_samples = int(max_samples)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))
        self.register_buffer("num_batches", torch.tensor(0, dtype=torch.int64))

    def _observe(self, values, low, high):
        values = _thinned(values, self.max_samples)
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

    def _search_qparams(self):
        return self._qparams_from(self.min_val, self.max_val)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, percentile={self.percentile}, min_val={self.min_val}, max_val={self.max_val}"


class _MSESearch(_TrackedCalibrator):
    """The minimum-MSE search shared by `MSEObserver` and `HistogramMSEObserver` (``min_val``, ``max_val`` and
    ``max_shrink_log2`` set by the subclass): candidate scales from the full min/max scale down by
    2**-max_shrink_log2 (8 per octave, or every power of two in pow2 mode); for affine schemes each scale is tried
    with five grid placements from "ends at the maximum" to "starts at the minimum", and with the zero point of the
    full range."""

    # working memory of the search, rebuilt empty by each subclass's `_new_work_buffers`: left out of state_dict,
    # pickles and copies, which keeps a QAT checkpoint near the size of its float model
    _WORK_BUFFERS: tuple = ()

    def _init_search(self, training_update, averaging_constant, max_shrink_log2):
        self._init_tracking(training_update, averaging_constant)
        if not 0 <= max_shrink_log2 <= 24:
            raise ValueError(f"max_shrink_log2={max_shrink_log2} must be in [0, 24]")
        self.max_shrink_log2 = int(max_shrink_log2)
        self.register_buffer("min_val", torch.tensor(float("inf")))
        self.register_buffer("max_val", torch.tensor(float("-inf")))

    def _can_search(self) -> bool:
        return bool(self.max_val >= self.min_val) and any(bool(self._buffers[k].any()) for k in self._WORK_BUFFERS)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._new_work_buffers()  # what was observed before belongs to the replaced min/max, not to the loaded ones

    def __getstate__(self):
        state = self.__dict__.copy()
        buffers = dict(state["_buffers"])
        for k in self._WORK_BUFFERS:
            buffers[k] = buffers[k].new_zeros(0)
        state["_buffers"] = buffers
        return state

    def __setstate__(self, state):
        super().__setstate__(state)  # also adds the tracking state to pickles that predate it
        if any(self._buffers[k].numel() == 0 for k in self._WORK_BUFFERS):
            self._new_work_buffers()

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
    def _mse_search(self, values, weights):
        """The (scale, zero point) with the smallest weighted squared quantization error of `values` (a summary of
        what was observed, each value standing for `weights` of them) among the candidates; (1, 0) for none."""
        if not values.numel():
            device = self.min_val.device
            return torch.ones(1, device=device), torch.zeros(1, dtype=torch.int32, device=device)
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


class MSEObserver(_MSESearch):
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

    def __init__(self, num_samples: int = 1 << 14, num_extremes: int = 64, max_shrink_log2: int = 10,
                 dtype: torch.dtype = torch.quint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 eps: float = DEFAULT_EPS, pow2: bool = False, pow2_rounding: str = "ceil",
                 training_update: str = "track", averaging_constant: float = 0.01) -> None:
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        if num_samples < 64:
            raise ValueError(f"num_samples={num_samples} must be at least 64")
        if not 0 <= 4 * num_extremes < num_samples // 8:
            raise ValueError(f"num_extremes={num_extremes} must be in [0, num_samples / 32)")
        self._init_search(training_update, averaging_constant, max_shrink_log2)
        self.num_samples = int(num_samples)
        self.num_extremes = int(num_extremes)
        self._new_work_buffers()

    _WORK_BUFFERS = ("samples", "weights")

    def _new_work_buffers(self):
        self.register_buffer("samples", self.min_val.new_zeros(self.num_samples), persistent=False)
        self.register_buffer("weights", self.min_val.new_zeros(self.num_samples), persistent=False)
        self._cursor = 0

    def _summarise(self, values):
        """(entries, weights) standing for all of `values`: exact extremes + a weighted strided sample.

        `_summarise_plain` says what they are; on a large tensor `_summarise_blocked` finds the same entries,
        bit for bit, without sorting or compacting the whole tensor."""
        budget = self.num_samples // 8
        m = min(self.num_extremes, values.numel() // 4)
        if m and values.numel() >= max(_BLOCKED_MIN_NUMEL, 256 * m):
            summary = self._summarise_blocked(values, m, budget)
            if summary is not None:
                return summary
        return self._summarise_plain(values, m, budget)

    @staticmethod
    def _summarise_plain(values, m, budget):
        """The definition: the m largest and the m smallest values (topk), then every step-th of the values
        strictly between them (the bulk), weighted by how many bulk values each sample stands for."""
        if m == 0:
            bulk, extremes = values, values[:0]
        else:
            top = torch.topk(values, m).values
            bottom = -torch.topk(-values, m).values
            bulk = values[(values < top[-1]) & (values > bottom[-1])]
            extremes = torch.cat([top, bottom])
        room = budget - extremes.numel()
        sample = bulk[::-(-bulk.numel() // room)] if bulk.numel() > room else bulk
        return _summary(extremes, sample, bulk.numel())

    @staticmethod
    def _summarise_blocked(values, m, budget):
        """`_summarise_plain` from per-block extremes: the extremes come from the few blocks that can hold them,
        and the bulk sample is picked by position (the bulk's k-th element is found from the sorted positions of
        the excluded elements, or from a running count where ties make those many). None where zeros of both
        signs could be among the extremes (then only the plain topk says which of them it returns)."""
        numel = values.numel()
        size = _block_size(numel, m)
        whole = numel - numel % size
        blocks = values[:whole].reshape(-1, size)
        block_max, block_min = blocks.amax(dim=1), blocks.amin(dim=1)
        if whole < numel:
            tail = values[whole:]
            block_max = torch.cat([block_max, tail.amax().reshape(1)])
            block_min = torch.cat([block_min, tail.amin().reshape(1)])
        top, top_at = _largest_by_blocks(values, block_max, size, m, negate=False)
        negated_bottom, bottom_at = _largest_by_blocks(values, -block_min, size, m, negate=True)
        bottom = -negated_bottom
        high, low = top[-1], bottom[-1]  # the m-th largest and smallest: the bulk lies strictly between them
        zero_chosen = float(high) <= 0 <= float(top[0]) or float(bottom[0]) <= 0 <= float(low)
        if zero_chosen and _has_both_zeros(values):
            return None
        extremes = torch.cat([top, bottom])
        room = budget - extremes.numel()
        if not bool(low < high):  # no value lies strictly between the extremes
            return _summary(extremes, values[:0], 0)
        if top_at is None or bottom_at is None:  # many ties at an extreme: count the bulk row by row
            return _summary(extremes, *_tied_bulk(values, low, high, top_at, bottom_at, room))
        excluded = torch.sort(torch.cat([top_at, bottom_at])).values
        bulk_count = numel - excluded.numel()
        if bulk_count <= room:  # (only with a large num_samples) the whole bulk
            return _summary(extremes, values[(values < high) & (values > low)], bulk_count)
        # the bulk's k-th element sits at k + the number of excluded positions e_i with e_i - i <= k
        wanted = torch.arange(0, bulk_count, -(-bulk_count // room), device=values.device)
        before = excluded - torch.arange(excluded.numel(), device=values.device)
        return _summary(extremes, values[wanted + torch.searchsorted(before, wanted, right=True)], bulk_count)

    def _observe(self, values, low, high):
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

    @torch.no_grad()
    def _search_qparams(self):
        used = self.weights > 0
        return self._mse_search(self.samples[used], self.weights[used])

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_samples={self.num_samples}, min_val={self.min_val}, max_val={self.max_val}"


def _coprime_step(numel: int, wanted: int, period: int) -> int:
    """A stride >= ceil(numel / wanted) sharing no factor with `period` (a row or plane length), so that strided
    positions do not keep landing on the same few columns of an image."""
    step = max(1, -(-numel // wanted))
    while step > 1 and math.gcd(step, period) != 1:
        step += 1
    return step


def _outside(rows, low, high):
    """The values of each row of `rows` above its `high` or below its `low` (columns), and how many per row (int64).
    Only blocks whose own extremes pass a bound are searched: the rest hold none of them."""
    images, n = rows.shape
    size = min(n & -n, 128)  # the largest power of two dividing the row length, at most 128
    if size < 32:
        outside = (rows > high) | (rows < low)
        return rows[outside], outside.sum(1)
    blocks = rows.view(images, n // size, size)
    block_min, block_max = blocks.amin(dim=2), blocks.amax(dim=2)
    row, block = ((block_max > high) | (block_min < low)).nonzero(as_tuple=True)
    candidates = blocks[row, block]
    outside = (candidates > high[row]) | (candidates < low[row])
    counts = torch.zeros(images, dtype=torch.int64, device=rows.device)
    counts.index_add_(0, row, outside.sum(1))
    return candidates[outside], counts


class HistogramMSEObserver(_MSESearch):
    """Minimum-MSE range (the same search as `MSEObserver`) on a histogram of every calibration image, the same
    for any order and grouping of the images into batches.

    Each image (the first dimension of the observed tensor) contributes the same values wherever it comes: every
    step-th value of it, about ``samples_per_image`` of them (the step shares no factor with the image's plane
    size, and each stands for an equal share of the image), and every value of the image above or below all of
    those exactly, so that rare outliers are costed at their true value. They are counted in ``bins`` bins of width
    2**e on a grid anchored at zero, e the smallest exponent whose grid covers the exact min/max seen so far; the
    histogram widens by merging neighbouring bins, which is exact, so it ends equal to counting every value at the
    final width, whatever came first. With power-of-two candidate scales of two bins or more, the rounding and
    clipping boundaries fall on bin edges: every value of a bin quantizes to the same integer, and the bin centres
    give each candidate's error to within the bins' width. `MSEObserver` keeps each batch's extremes and a sample
    of each batch instead, so its choice can follow which images share a batch.
    """

    compute_qparams_lazily = True

    def __init__(self, bins: int = 1 << 14, samples_per_image: int = 1 << 12, max_shrink_log2: int = 10,
                 dtype: torch.dtype = torch.quint8, qscheme: torch.qscheme = torch.per_tensor_affine,
                 reduce_range: bool = False, quant_min: int | None = None, quant_max: int | None = None,
                 eps: float = DEFAULT_EPS, pow2: bool = False, pow2_rounding: str = "ceil",
                 training_update: str = "track", averaging_constant: float = 0.01) -> None:
        super().__init__(dtype, qscheme, reduce_range, quant_min, quant_max, eps, pow2, pow2_rounding)
        if not 64 <= bins <= 1 << 20:
            raise ValueError(f"bins={bins} must be in [64, 2**20]")
        if samples_per_image < 16:
            raise ValueError(f"samples_per_image={samples_per_image} must be at least 16")
        self._init_search(training_update, averaging_constant, max_shrink_log2)
        self.bins = int(bins)
        self.samples_per_image = int(samples_per_image)
        self._new_work_buffers()
        self._images, self._batch = (1, 1), None

    _WORK_BUFFERS = ("histogram",)

    def _new_work_buffers(self):
        self.register_buffer("histogram", torch.zeros(self.bins, dtype=torch.int64, device=self.min_val.device),
                             persistent=False)
        self._grid = None  # (e, origin): bin i counts [(origin + i) * 2**e, (origin + i + 1) * 2**e)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._tracking:
            return super().forward(x)
        # images along dim 0, each a plane of the trailing dims (a row for 2-d data)
        self._images = (x.shape[0] if x.dim() > 1 else 1,
                        math.prod(x.shape[2:]) if x.dim() > 2 else x.shape[-1] if x.dim() else 1)
        self._batch = x
        try:
            return super().forward(x)
        finally:
            self._batch = None

    def _exponent(self, low: float, high: float) -> int:
        """The smallest e whose zero-anchored grid of width 2**e covers [low, high] in `bins` bins, and no smaller
        than keeps every scaled value below 2**22 in magnitude (small integer bin indices): a function of the range
        alone, which only grows as the range does."""
        largest = max(abs(low), abs(high), 2.0 ** -100)
        e = max(math.floor(math.log2(max(high - low, 2.0 ** -100) / self.bins)), math.ceil(math.log2(largest)) - 22)
        while math.floor(math.ldexp(high, -e)) - math.floor(math.ldexp(low, -e)) >= self.bins:
            e += 1
        return e

    def _regrid(self, e: int, origin: int):
        """Move the counts onto the grid (e, origin), e no smaller than the current one: exact, bins only merge."""
        if self._grid is not None and self._grid != (e, origin):
            old_e, old_origin = self._grid
            absolute = old_origin + torch.arange(self.bins, dtype=torch.int64, device=self.histogram.device)
            # floor(absolute / 2**(e - old_e)) as an arithmetic shift: exact for any exponent step (a first batch of
            # zeros has a grid of 2**-114; at 63 every index becomes 0 or -1, the floor)
            moved = torch.bitwise_right_shift(absolute, min(e - old_e, 63)) - origin
            used = self.histogram > 0
            new = torch.zeros_like(self.histogram)
            new.index_add_(0, moved[used], self.histogram[used])
            self.histogram = new
        self._grid = (e, origin)

    def _observe(self, values, low, high):
        self.min_val.copy_(torch.minimum(self.min_val, low))
        self.max_val.copy_(torch.maximum(self.max_val, high))
        images, plane = self._images
        if values.numel() == self._batch.numel():
            rows = values.view(max(images, 1), -1)
            entries, weights = self._image_summary(rows, _coprime_step(rows.shape[1], self.samples_per_image, plane))
        else:  # non-finite values were dropped: each image's finite values on their own, as any batch would give them
            parts = []
            for image in self._batch.detach().reshape(max(images, 1), -1).to(torch.float32):
                row = image[torch.isfinite(image)][None]
                if row.numel():
                    parts.append(self._image_summary(row, _coprime_step(row.shape[1], self.samples_per_image, plane)))
            entries, weights = (torch.cat(t) for t in zip(*parts))
        lo, hi = float(self.min_val), float(self.max_val)
        e = self._exponent(lo, hi)
        if self._grid is not None:
            e = max(e, self._grid[0])
        origin = math.floor(math.ldexp(lo, -e))
        self._regrid(e, origin)
        # in float64, where scaling a float32 by 2**-e and taking the floor are exact (no underflow to -0.0)
        index = (entries.to(torch.float64) * math.ldexp(1.0, -e)).floor_().sub_(origin).to(torch.int64)
        self.histogram += torch.bincount(index, weights=weights, minlength=self.bins).to(torch.int64)

    @staticmethod
    def _image_summary(rows, step):
        """(values, integer weights in 1/256ths, float64) standing for every value of each row (image): its
        step-th values, and exactly every value outside their range (the image's tails, weight 1); each sampled
        value stands for the rest of its image. Integer weights keep the sums exact, so their order cannot show."""
        sample = rows[:, ::step]
        images, k = sample.shape
        if step == 1:
            return sample.reshape(-1), torch.full((sample.numel(),), 256.0, dtype=torch.float64, device=rows.device)
        low, high = torch.aminmax(sample, dim=1, keepdim=True)
        tail_values, in_tails = _outside(rows, low, high)
        per_sample = torch.round(256 * (rows.shape[1] - in_tails).to(torch.float64) / k)
        weights = torch.cat([per_sample[:, None].expand(images, k).reshape(-1),
                             torch.full((tail_values.numel(),), 256.0, dtype=torch.float64, device=rows.device)])
        return torch.cat([sample.reshape(-1), tail_values]), weights

    @torch.no_grad()
    def _search_qparams(self):
        used = (self.histogram > 0).nonzero().squeeze(1)
        if self._grid is None or not used.numel():
            return self._mse_search(self.min_val.new_zeros(0), self.min_val.new_zeros(0))
        e, origin = self._grid
        centres = ((used + origin).to(torch.float64) + 0.5) * math.ldexp(1.0, e)
        return self._mse_search(centres.to(torch.float32), self.histogram[used].to(torch.float32))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, bins={self.bins}, samples_per_image={self.samples_per_image}, "
                f"min_val={self.min_val}, max_val={self.max_val}")
