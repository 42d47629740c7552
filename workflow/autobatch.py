"""AutoBatch (train.py --batch-size -1), as upstream: the largest batch whose training step fits in a fraction of the
CUDA device's memory, from the memory that a few small batches actually use."""
from __future__ import annotations

import numpy as np
import torch

from utils.general import LOGGER, UserError, colorstr

PROBE_SIZES = (1, 2, 4, 8, 16)
FRACTION = 0.6  # of the device's total memory, as upstream
PREFIX = colorstr("AutoBatch: ")


def batch_for_memory(sizes, used_gb, total_gb, reserved_gb, fraction=FRACTION) -> int:
    """Fit used memory = a * batch + b over the probed batches and return the batch that fills `fraction` of the
    device (less what is already reserved); at least 1, and not above 1024."""
    sizes, used = np.asarray(sizes, float), np.asarray(used_gb, float)
    ok = np.isfinite(used)
    if ok.sum() < 2:
        raise UserError("--batch-size -1: fewer than two probe batches fit on the device; give a batch size")
    a, b = np.polyfit(sizes[ok], used[ok], 1)
    if a <= 0:
        raise UserError("--batch-size -1: memory use did not grow with the batch; give a batch size")
    budget = total_gb * fraction - reserved_gb
    return int(np.clip((budget - b) / a, 1, 1024))


def autobatch(model, imgsz: int, device: torch.device, amp: bool = True) -> int:
    """The batch size for train.py --batch-size -1 on `device` (CUDA only; one line elsewhere)."""
    if device.type != "cuda":
        raise UserError("--batch-size -1 (AutoBatch) measures CUDA memory and needs a CUDA --device; on the CPU give "
                        "a batch size")
    props = torch.cuda.get_device_properties(device)
    total = props.total_memory / 2 ** 30
    reserved = torch.cuda.memory_reserved(device) / 2 ** 30
    was_training = model.training
    model.train()
    used = []
    for n in PROBE_SIZES:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        try:
            x = torch.rand(n, 3, imgsz, imgsz, device=device)
            with torch.autocast("cuda", enabled=amp):
                y = model(x)
                loss = sum(t.float().sum() for t in (y if isinstance(y, (list, tuple)) else [y]))
            loss.backward()
            used.append((torch.cuda.max_memory_allocated(device) - start) / 2 ** 30)
        except torch.cuda.OutOfMemoryError:
            used.append(float("nan"))
        finally:
            model.zero_grad(set_to_none=True)
    model.train(was_training)
    torch.cuda.empty_cache()
    batch = batch_for_memory(PROBE_SIZES, used, total, reserved)
    LOGGER.info(f"{PREFIX}{props.name} {total:.1f} GB: batch {batch} for {FRACTION:.0%} of the memory "
                f"(probed {', '.join(f'{n}: {u:.2f} GB' for n, u in zip(PROBE_SIZES, used))})")
    return batch
