"""What a YOLOv5 checkpoint holds, and loading / saving one.

A checkpoint is upstream's dict (epoch, best_fitness, model, ema, updates, optimizer, opt, git, date, ...). A float
model is pickled whole, as upstream does. A QAT model is stored as what defines it, so that renaming or moving a
quantization class never makes a saved run unloadable:

  ckpt["model"] / ckpt["ema"]   its float architecture (models.quant.float_model: plain Conv blocks and Detect with
                                the QAT model's float weights), pickled as upstream pickles a model, so tools that
                                know nothing of QAT can still read and run the float part;
  ckpt["qat_state"][key]        {"format": QAT_FORMAT, "qat": the QAT settings (bn_folding, pow2, pow2_rounding,
                                rounding, recipe), "state_dict": the prepared model's state_dict (weights, BN
                                statistics, every quantizer's scale, zero point and observer state),
                                "attributes": bst's module_attributes, "training": its mode}.

`load_checkpoint` rebuilds such a model: prepare_yolo_qat of the float part with the saved settings, then the
state_dict; callers get the QAT model in ckpt["model"] as before. Checkpoints that pickle the QAT modules themselves
(written before the format existed) load as they are. Loading uses an allowlist of the classes a checkpoint may
unpickle (`safe_globals`); the file-level work (safe unpickling, atomic writes, release downloads) is
utils/checkpoint.py.
"""
from __future__ import annotations

import importlib
import os
from copy import deepcopy
from datetime import datetime

import numpy as np
import torch.nn as nn

from bst.torch.ao import quantization as bq
from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, DWConv, Focus
from models.quant import checkpoint_classes, float_model, is_quantized, prepare_yolo_qat
from models.yolo import Detect, DetectionModel, Ensemble
from utils.checkpoint import atomic_save, safe_load
from utils.general import LOGGER, UserError

QAT_FORMAT = 2  # 1: the QAT modules pickled whole (read as they are); 2: float part + settings + state_dict
QAT_KEYS = ("model", "ema")

_NN_CLASSES = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Linear, nn.Dropout, nn.Identity,
    nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Sigmoid, nn.Sequential, nn.ModuleList,
    nn.ModuleDict, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Upsample, nn.Flatten,
)


def safe_globals() -> list:
    """Every class and constructor a YOLOv5 checkpoint may unpickle."""
    project = [DetectionModel, Detect, Conv, DWConv, Bottleneck, C3, SPP, SPPF, Focus, Concat, Ensemble]
    # plain-data constructors only: never a callable that reads attributes (getattr let a pickle walk from an allowed
    # class to eval/exec), imports, evaluates or calls what it is given (tests/test_checkpoint_security.py)
    extra = [set, tuple, slice]
    # upstream training checkpoints may store numpy scalars/arrays (best_fitness, results)
    # numpy 2 keeps them in numpy._core; numpy 1.26 also has a numpy._core shim, loaded or not, so ask by version
    multiarray = importlib.import_module("numpy._core.multiarray" if int(np.__version__.split(".")[0]) >= 2
                                         else "numpy.core.multiarray")
    extra += [np.ndarray, np.dtype, multiarray._reconstruct, multiarray.scalar]
    extra += [type(np.dtype(t)) for t in ("float64", "float32", "int64")]
    return project + list(_NN_CLASSES) + extra + checkpoint_classes()


def build_checkpoint(model, *, ema=None, updates=None, epoch=-1, best_fitness=None, optimizer=None, last_opt_step=None,
                     opt=None, git=None, qat=None) -> dict:
    """A checkpoint dict: upstream's keys (epoch -1 and no optimizer for a finished model) and this project's:
    last_opt_step (where gradient accumulation stands, for --resume; only while training) and qat (the QAT flags
    the model was made with, None for a float model)."""
    ckpt = {"epoch": epoch, "best_fitness": best_fitness, "model": model, "ema": ema, "updates": updates,
            "optimizer": optimizer}
    if last_opt_step is not None:
        ckpt["last_opt_step"] = last_opt_step
    return {**ckpt, "opt": opt, "git": git, "date": datetime.now().isoformat(), "qat": qat}


def load_checkpoint(path, map_location="cpu", trust=False):
    """A YOLOv5 checkpoint dict, unpickled with the allowlist above (everything when trusted), its QAT models
    rebuilt (see the module docstring)."""
    ckpt = safe_load(path, safe_globals(), map_location=map_location, trust=trust)
    if isinstance(ckpt, dict) and ckpt.get("qat_state") is not None:
        states = ckpt.pop("qat_state")
        if not isinstance(states, dict) or not set(states) <= set(QAT_KEYS):
            raise UserError(f"{path}: corrupt QAT checkpoint (qat_state must map model/ema to their QAT state)")
        for key, state in states.items():
            ckpt[key] = rebuild_qat_model(ckpt.get(key), state, path)
    return ckpt


def save_checkpoint(obj, path):
    """Write a checkpoint dict atomically (a kill during the write never leaves a truncated file); QAT models go in
    as float part + QAT state (the module docstring). `obj` itself is not changed."""
    obj = dict(obj)
    states = {}
    for key in QAT_KEYS:
        model = obj.get(key)
        if isinstance(model, nn.Module) and is_quantized(model):
            states[key] = qat_state(model)
            obj[key] = float_model(model)
    if states:
        obj["qat_state"] = states
    return atomic_save(obj, path)


def qat_state(model) -> dict:
    """What defines a QAT DetectionModel beside its float architecture."""
    return {"format": QAT_FORMAT, "qat": deepcopy(model.qat), "state_dict": model.state_dict(),
            "attributes": bq.module_attributes(model), "training": model.training}


def rebuild_qat_model(float_part, state, path="checkpoint"):
    """The QAT model `qat_state` described: prepared from `float_part` with the saved settings, then loaded."""
    if not isinstance(float_part, nn.Module) or not isinstance(state, dict):
        raise UserError(f"{path}: corrupt QAT checkpoint (no float model beside its QAT state)")
    if state.get("format") != QAT_FORMAT:
        raise UserError(f"{path}: QAT checkpoint format {state.get('format')!r}; this version of yolov5-qat reads "
                        f"format {QAT_FORMAT} (and QAT models pickled whole); update it to read this file")
    meta = state["qat"]
    device = next(float_part.parameters()).device
    # models quantized before a setting existed used what is now its default
    model = prepare_yolo_qat(float_part.float().train(), bn_folding=meta["bn_folding"], pow2=meta["pow2"],
                             recipe=meta.get("recipe"), pow2_rounding=meta.get("pow2_rounding", "ceil"),
                             rounding=meta.get("rounding", "half_even"), verbose=False).to(device)
    try:
        model.load_state_dict(state["state_dict"])
        bq.load_module_attributes(model, state["attributes"])
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise UserError(f"{path}: the QAT state does not fit the model rebuilt from its settings ({first})") from None
    model.qat = {**model.qat, **meta}
    return model.train(state["training"])


def strip_optimizer(f="best.pt", s=""):
    """Drop optimizer/EMA state from a finished checkpoint and store the (EMA) model in FP16, atomically.

    QAT models stay float32: rounding their weights to FP16 could move fake-quantized weights to other
    int8 steps, and val.py of best.pt must reproduce the mAP training printed.
    """
    x = load_checkpoint(f)
    if x.get("ema"):
        x["model"] = x["ema"]
    for k in "optimizer", "best_fitness", "ema", "updates":
        x[k] = None
    x.pop("last_opt_step", None)  # resume state, meaningless without the optimizer
    x["epoch"] = -1
    if not is_quantized(x["model"]):
        x["model"].half()
    for p in x["model"].parameters():
        p.requires_grad = False
    save_checkpoint(x, s or f)
    mb = os.path.getsize(s or f) / 1e6
    LOGGER.info(f"Optimizer stripped from {f},{f' saved as {s},' if s else ''} {mb:.1f}MB")
