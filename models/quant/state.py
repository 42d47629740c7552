"""The state of a QAT model and the small steps that change it: its quantizers, observers and fake quantization on or
off, BN statistics frozen, calibration, the per-epoch schedule, and frozen qparams for evaluation and export."""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager

import torch
from tqdm import tqdm

from bst.torch.ao import quantization as bq
from bst.torch.ao.nn.intrinsic import qat as nniqat
from utils.general import LOGGER


def quantizers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bq.FakeQuantizeBase)]


def all_scales_pow2(model) -> bool:
    return all(bool(bq.is_pow2(m.scale.float()).all()) for _, m in quantizers(model) if hasattr(m, "scale"))


def set_observers(model, enabled: bool):
    model.apply(bq.enable_observer if enabled else bq.disable_observer)


def set_fake_quant(model, enabled: bool):
    model.apply(bq.enable_fake_quant if enabled else bq.disable_fake_quant)


def freeze_bn(model):
    model.apply(nniqat.freeze_bn_stats)


def observer_states(model):
    return [bool(m.observer_enabled[0]) for _, m in quantizers(model)]


def restore_observer_states(model, states):
    for (_, m), on in zip(quantizers(model), states):
        m.enable_observer(on)


def is_quantized(model) -> bool:
    """True for a QAT-prepared model (it carries fake quantizers, which fusion must not touch)."""
    return any(isinstance(m, bq.FakeQuantizeBase) for m in model.modules())


def example_input(model, size: int = 64) -> torch.Tensor:
    """A small input on the model's device: enough for one traced forward of a YOLOv5 model (stride <= 32)."""
    t = next(model.parameters(), None)
    t = next(model.buffers(), None) if t is None else t
    return torch.zeros(1, 3, size, size, device=t.device if t is not None else "cpu", dtype=torch.float32)


def freeze(model):
    """Freeze a QAT DetectionModel's qparams for evaluation or export (bq.freeze_qparams); returns it.
    val.py, detect.py, training's validation and export.py all evaluate a QAT model through this."""
    training = model.training
    bq.freeze_qparams(model, (example_input(model),))
    model.train(training)
    return model


@contextmanager
def observers_frozen(model):
    """``with observers_frozen(model):`` evaluate with frozen qparams; each observer's on/off state comes back
    afterwards, also when the evaluation raises."""
    states = observer_states(model)
    try:
        yield freeze(model)
    finally:
        restore_observer_states(model, states)


def apply_schedule(model, epoch: int, freeze_bn_epoch: int, disable_observer_epoch: int):
    """BN statistics and observers per the QAT flags at the start of `epoch` (-1: never)."""
    if freeze_bn_epoch >= 0 and epoch >= freeze_bn_epoch:
        freeze_bn(model)
    observe = not (disable_observer_epoch >= 0 and epoch >= disable_observer_epoch)
    set_observers(model, observe)
    return {"bn_frozen": freeze_bn_epoch >= 0 and epoch >= freeze_bn_epoch, "observers": observe}


_MIN_MAX = (bq.MinMaxObserver, bq.PerChannelMinMaxObserver)  # and their moving averages: the same tensor again
# leaves their statistics as they are


def _weight_quantizers_observe(model, enabled: bool):
    for m in model.modules():
        quantizer = getattr(m, "weight_fake_quant", None)
        if isinstance(quantizer, bq.FakeQuantizeBase) and isinstance(quantizer.activation_post_process, _MIN_MAX):
            quantizer.enable_observer(enabled)


@torch.no_grad()
def calibrate(model, loader, n_batches: int, device):
    """Observers on, fake quantization off, eval mode (BN statistics untouched): fill the observers
    with `n_batches` batches, then freeze them into scales and turn fake quantization on. A progress bar with the
    time left runs over the batches; the log line says how long observing and the scale search took."""
    model.eval()
    set_fake_quant(model, False)
    set_observers(model, True)
    seen, total, t0 = 0, min(n_batches, len(loader)), time.perf_counter()
    bar = tqdm(loader, total=total, desc="QAT: calibrating", bar_format="{l_bar}{bar:10}{r_bar}", file=sys.stdout,
               leave=False)
    for i, batch in enumerate(bar):
        if i >= n_batches:
            break
        imgs = batch[0].to(device, non_blocking=True).float() / 255
        model(imgs)
        seen += imgs.shape[0]
        if i == 0:  # the weights stay as they are while calibrating: their min/max observers have seen them all
            _weight_quantizers_observe(model, False)
    bar.close()
    t1 = time.perf_counter()
    set_fake_quant(model, True)
    freeze(model)  # observers off: computes lazily evaluated qparams (e.g. MSE) now
    model.train()
    t2 = time.perf_counter()
    LOGGER.info(f"QAT: calibrated on {seen} images ({total} batches) in {t2 - t0:.1f} s (observing "
                f"{t1 - t0:.1f} s, scale search {t2 - t1:.1f} s)")
    return seen
