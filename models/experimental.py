"""Loading checkpoints for inference: attempt_load and Ensemble."""
from __future__ import annotations

import torch
import torch.nn as nn

from models.checkpoint import check_runs, load_checkpoint
from models.common import model_activation
from models.quant import freeze, is_quantized
from models.yolo import Detect, DetectionModel, Ensemble
from utils.checkpoint_io import attempt_download
from utils.general import UserError


def attempt_load(weights, device=None, inplace=True, fuse=True, trust=False):
    """Load one checkpoint (or an Ensemble of several) for inference: EMA if present, float, eval mode.

    Conv+BN is fused unless `fuse=False` or the model is quantized (QAT modules keep their own path). A QAT model's
    quantization parameters are frozen (models.quant.freeze), so it computes what its exports compute.
    """
    models = Ensemble()
    for w in weights if isinstance(weights, (list, tuple)) else [weights]:
        path = attempt_download(w)
        ckpt = load_checkpoint(path, map_location="cpu", trust=trust)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("ema") or ckpt.get("model"), nn.Module):
            raise UserError(f"{path}: not a YOLOv5 checkpoint (no 'model' module inside)")
        model = (ckpt.get("ema") or ckpt["model"]).to(device or "cpu").float()
        if not hasattr(model, "stride"):
            model.stride = torch.tensor([32.0])
        if hasattr(model, "names") and isinstance(model.names, (list, tuple)):
            model.names = dict(enumerate(model.names))
        model.checkpoint_path = str(path)
        quantized = is_quantized(model)
        try:
            if quantized:
                freeze(model)
            elif fuse and hasattr(model, "fuse"):
                model.fuse()
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:  # a damaged layer the probe did not reach
            why = (str(e).splitlines() or [""])[0][:120]
            raise UserError(f"{path}: its model cannot be prepared for inference ({type(e).__name__}: {why}); give "
                            f"a checkpoint written by train.py or a YOLOv5 release") from None
        if not quantized and fuse:
            check_runs(model, f"{path}: 'model'", "fusing its Conv and BatchNorm layers")
        models.append(model.eval())

    for m in models.modules():
        if isinstance(m, Detect):
            m.inplace = inplace
            if not isinstance(m.anchor_grid, list):  # very old checkpoints stored a tensor
                delattr(m, "anchor_grid")
                m.anchor_grid = [torch.zeros(1)] * m.nl
            m.grid = [torch.empty(0)] * m.nl
        elif isinstance(m, nn.Upsample) and not hasattr(m, "recompute_scale_factor"):
            m.recompute_scale_factor = None  # torch >= 1.11 attribute missing in older pickles

    if len(models) == 1:
        return models[-1]
    print(f"Ensemble created with {weights}\n")
    for k in "names", "nc", "yaml":
        setattr(models, k, getattr(models[0], k))
    models.stride = models[torch.argmax(torch.tensor([m.stride.max() for m in models])).int()].stride
    if not all(models[0].nc == m.nc for m in models):
        raise UserError(f"ensemble: models have different class counts {[m.nc for m in models]}")
    return models


__all__ = ["attempt_load", "Ensemble", "model_activation", "DetectionModel"]
