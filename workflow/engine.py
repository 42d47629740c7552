"""One training epoch: the batch loop of train.py (warmup, multi-scale, forward and loss, gradient accumulation with
clipping, the optimizer step and the EMA update), shared by float and QAT training."""
from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from tqdm import tqdm

from utils.general import LOGGER, RANK, WORLD_SIZE, UserError
from utils.plots import plot_images
from utils.torch_utils import ModelEMA

NBS = 64  # nominal batch size: gradients are accumulated up to it


@dataclass
class StepState:
    """What the batch loop carries from one batch (and epoch) to the next: the iteration of the last optimizer step
    (a resumed run restores it) and the gradient accumulation count (warmup raises it to NBS / batch size)."""

    batch_size: int
    last_opt_step: int = -1
    accumulate: int = field(init=False)

    def __post_init__(self):
        self.accumulate = max(round(NBS / self.batch_size), 1)


def warmup(optimizer, state: StepState, ni: int, nw: int, hyp: dict, lr_at_epoch: float):
    """Warmup over the first nw iterations: the bias lr falls from warmup_bias_lr, the others rise from 0, the
    momentum rises from warmup_momentum, and the accumulation count grows to NBS / batch size."""
    xi = [0, nw]
    state.accumulate = max(1, np.interp(ni, xi, [1, NBS / state.batch_size]).round())
    for j, x in enumerate(optimizer.param_groups):
        x["lr"] = np.interp(ni, xi, [hyp["warmup_bias_lr"] if j == 0 else 0.0, x["initial_lr"] * lr_at_epoch])
        if "momentum" in x:
            x["momentum"] = np.interp(ni, xi, [hyp["warmup_momentum"], hyp["momentum"]])


def random_scale(imgs: torch.Tensor, imgsz: int, gs: int) -> torch.Tensor:
    """--multi-scale: the batch resized to a random size in [0.5, 1.5] x imgsz, a multiple of the grid stride."""
    sz = random.randrange(int(imgsz * 0.5), int(imgsz * 1.5) + gs) // gs * gs
    sf = sz / max(imgs.shape[2:])
    if sf == 1:
        return imgs
    ns = [math.ceil(x * sf / gs) * gs for x in imgs.shape[2:]]
    return nn.functional.interpolate(imgs, size=ns, mode="bilinear", align_corners=False)


def train_one_epoch(model: nn.Module, loader, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
                    compute_loss: Callable, ema: ModelEMA | None, state: StepState, epoch: int, epochs: int, *,
                    device: torch.device, hyp: dict, lf: Callable[[float], float], nw: int, imgsz: int, gs: int,
                    amp: bool, multi_scale: bool = False, quad: bool = False, plot_dir: Path | None = None,
                    advice: str = "") -> torch.Tensor:
    """Train `model` on one pass over `loader`; returns the mean (box, obj, cls) losses. `state` is updated in place.
    A non-finite loss or gradient stops training with a UserError ending in `advice` (what to do next)."""
    nb = len(loader)
    mloss = torch.zeros(3, device=device)
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    pbar = enumerate(loader)
    LOGGER.info(("\n" + "%11s" * 7) % ("Epoch", "GPU_mem", "box_loss", "obj_loss", "cls_loss", "Instances", "Size"))
    if RANK in (-1, 0):
        pbar = tqdm(pbar, total=nb, bar_format="{l_bar}{bar:10}{r_bar}", file=sys.stdout)
    optimizer.zero_grad()
    for i, (imgs, targets, paths, _) in pbar:
        ni = i + nb * epoch
        imgs = imgs.to(device, non_blocking=True).float() / 255
        if ni <= nw:
            warmup(optimizer, state, ni, nw, hyp, lf(epoch))
        if multi_scale:
            imgs = random_scale(imgs, imgsz, gs)

        with torch.autocast(device_type=device.type, enabled=amp):
            pred = model(imgs)
            loss, loss_items = compute_loss(pred, targets.to(device))
            if RANK != -1:
                loss *= WORLD_SIZE
            if quad:
                loss *= 4.0
        if not torch.isfinite(loss).all():
            raise UserError(f"non-finite loss ({loss_items.tolist()}) at epoch {epoch} batch {i}; stopped. "
                            f"{advice}, or check the data")

        scaler.scale(loss).backward()
        if ni - state.last_opt_step >= state.accumulate:
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=10.0)
            if not amp and not torch.isfinite(norm):  # (under AMP the scaler skips such steps itself)
                raise UserError(f"non-finite gradient at epoch {epoch} batch {i}; stopped before the update. "
                                f"{advice}, or check the data")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            if ema:
                ema.update(model)
            state.last_opt_step = ni

        if RANK in (-1, 0):
            mloss = (mloss * i + loss_items) / (i + 1)
            mem = f"{torch.cuda.memory_reserved() / 1e9 if torch.cuda.is_available() else 0:.3g}G"
            pbar.set_description(("%11s" * 2 + "%11.4g" * 5) % (f"{epoch}/{epochs - 1}", mem, *mloss,
                                                                targets.shape[0], imgs.shape[-1]))
            if plot_dir is not None and ni < 3:
                plot_images(imgs, targets, paths, plot_dir / f"train_batch{ni}.jpg")
    return mloss
