"""The QAT steps of a training run (flag checks, preparation, the calibration pass with its PTQ report, the per-epoch
BN / observer schedule) and val.py --ptq's post-training quantization. The model surgery itself is models/quant.py;
the library is bst/."""
from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import torch

from models.checkpoint import build_checkpoint, save_checkpoint
from models.common import model_activation
from models.quant import (
    apply_schedule,
    calibrate,
    example_input,
    is_quantized,
    load_recipe,
    prepare_yolo_qat,
    share_concat_scales,
)
from utils.dataloaders import create_dataloader
from utils.general import LOGGER, UserError, colorstr

QAT_ONLY_FLAGS = ("bn_folding", "pow2_scale", "qat_recipe")
PREFIX = colorstr("QAT: ")


def check_qat_flags(opt):
    """Bad combinations end in one line; SiLU is allowed with a warning."""
    for f in ("freeze_bn_epoch", "disable_observer_epoch"):
        if getattr(opt, f, -1) < -1:
            raise UserError(f"--{f.replace('_', '-')} {getattr(opt, f)}: must be an epoch index >= 0, or -1 for never")
    if not getattr(opt, "qat", False):
        used = [f"--{f.replace('_', '-')}" for f in QAT_ONLY_FLAGS if getattr(opt, f, None)]
        used += [f"--{f.replace('_', '-')} {getattr(opt, f)}" for f in ("freeze_bn_epoch", "disable_observer_epoch")
                 if getattr(opt, f, -1) >= 0]
        if used:
            raise UserError(f"{', '.join(used)} only apply to quantization-aware training; add --qat")
        return
    if opt.calib_batches < 1:
        raise UserError(f"--calib-batches {opt.calib_batches}: calibrate on at least one batch")
    if getattr(opt, "qat_recipe", ""):
        load_recipe(opt.qat_recipe)  # the schema check, before any data or model is loaded
    if opt.act == "silu":
        LOGGER.warning(f"{PREFIX}WARNING: --act silu: shift-only int8 hardware has no SiLU; it is quantized here as "
                       f"a lookup table on its int8 output. Retrain with --act relu (or relu6) for such hardware")


class QATRun:
    """The QAT state of one training run (flags, recipe, schedule) and its steps."""

    def __init__(self, opt):
        self.enabled = bool(getattr(opt, "qat", False))
        self.bn_folding = bool(getattr(opt, "bn_folding", False))
        self.pow2 = bool(getattr(opt, "pow2_scale", False))
        self.pow2_rounding = getattr(opt, "pow2_rounding", "ceil")
        self.rounding = getattr(opt, "rounding", "half_even")
        self.recipe = getattr(opt, "qat_recipe", "") or None
        self.freeze_bn_epoch = int(getattr(opt, "freeze_bn_epoch", -1))
        self.disable_observer_epoch = int(getattr(opt, "disable_observer_epoch", -1))
        self.calib_batches = int(getattr(opt, "calib_batches", 32))
        self.state = None
        self.resumed = False

    def prepare(self, model):
        """Quantize a float model; a model that is already a QAT model (resume, or QAT fine-tuning) is kept."""
        if is_quantized(model):
            self.resumed = True
            LOGGER.info(f"{PREFIX}continuing from an already quantized model (its scales and observers as saved)")
            self._adopt(getattr(model, "qat", None) or {})
            return model
        if model_activation(model) == "silu" and self.enabled:
            LOGGER.warning(f"{PREFIX}WARNING: the model uses SiLU; its outputs are quantized as a lookup table")
        return prepare_yolo_qat(model, bn_folding=self.bn_folding, pow2=self.pow2, recipe=self.recipe,
                                pow2_rounding=self.pow2_rounding, rounding=self.rounding)

    def _adopt(self, saved: dict):
        """An already quantized model keeps how it was quantized: record its own settings, and say which of the
        given flags cannot change it."""
        own = {"bn_folding": bool(saved.get("bn_folding", self.bn_folding)), "pow2": bool(saved.get("pow2", self.pow2)),
               "pow2_rounding": saved.get("pow2_rounding", self.pow2_rounding),
               "rounding": saved.get("rounding", "half_even")}  # models saved before --rounding round half to even
        recipe = saved.get("recipe")
        recipe_name = recipe.get("file", "default") if isinstance(recipe, dict) else recipe
        given = {"bn_folding": self.bn_folding, "pow2": self.pow2, "pow2_rounding": self.pow2_rounding,
                 "rounding": self.rounding}
        flags = {"bn_folding": "--bn-folding", "pow2": "--pow2-scale", "pow2_rounding": "--pow2-rounding",
                 "rounding": "--rounding"}
        ignored = [f"{flags[k]} {given[k]}" for k in own if given[k] != own[k]]
        if self.recipe and Path(str(self.recipe)).name != str(recipe_name):
            ignored.append(f"--qat-recipe {self.recipe}")
        if ignored:
            LOGGER.warning(f"{PREFIX}WARNING: the model is already quantized (bn_folding={own['bn_folding']}, "
                           f"pow2={own['pow2']}, pow2_rounding={own['pow2_rounding']}, rounding={own['rounding']}, "
                           f"recipe {recipe_name}); "
                           f"{', '.join(ignored)} cannot change that and are ignored")
        self.bn_folding, self.pow2, self.pow2_rounding = own["bn_folding"], own["pow2"], own["pow2_rounding"]
        self.rounding = own["rounding"]
        self.recipe = recipe_name

    def calibrate(self, model, loader, device):
        if self.resumed:
            return 0
        seen = calibrate(model, loader, self.calib_batches, device)
        if self.shares_concat_scales(model):
            self._share(model)
        return seen

    @staticmethod
    def shares_concat_scales(model):
        return bool(((getattr(model, "qat", None) or {}).get("recipe") or {}).get("concat", {})
                    .get("share_input_scales"))

    @staticmethod
    def _share(model):
        """Re-share the concat scales (after observers froze them); needs no data, so a resumed run does it too."""
        training = model.training
        share_concat_scales(model, example_input(model))
        model.train(training)

    def start_epoch(self, model, epoch):
        state = apply_schedule(model, epoch, self.freeze_bn_epoch, self.disable_observer_epoch)
        if not state["observers"] and self.shares_concat_scales(model):
            self._share(model)  # observers just froze the scales (again): re-share them
        if state != self.state:
            LOGGER.info(f"{PREFIX}epoch {epoch}: BN statistics {'frozen' if state['bn_frozen'] else 'updating'}, "
                        f"observers {'on' if state['observers'] else 'off (scales frozen)'}")
        self.state = state
        return state

    def meta(self, model):
        """The checkpoint's "qat" entry for this run (see `qat_meta`)."""
        return qat_meta(model, freeze_bn_epoch=self.freeze_bn_epoch, disable_observer_epoch=self.disable_observer_epoch,
                        calib_batches=self.calib_batches)


def qat_meta(model, **run) -> dict:
    """The "qat" entry of a checkpoint: how `model` is quantized (bn_folding, pow2, pow2_rounding, rounding and the
    recipe's name, as prepare_yolo_qat recorded them in model.qat) and how the run used it (`run`: the BN and
    observer schedule and the calibration batches of train.py, or ptq=True)."""
    q = model.qat
    recipe = q.get("recipe")
    return {"bn_folding": q["bn_folding"], "pow2": q["pow2"], "pow2_rounding": q.get("pow2_rounding", "ceil"),
            "rounding": q.get("rounding", "half_even"),
            "recipe": recipe.get("file", "default") if isinstance(recipe, dict) else recipe, **run}


def checkpoint_copy(model):
    """What train.py stores: FP16 as upstream for float models; QAT models stay float32 (see strip_optimizer)."""
    m = deepcopy(model)
    return m if is_quantized(m) else m.half()


@torch.no_grad()
def report_ptq(results):
    mp, mr, map50, map_ = results[:4]
    LOGGER.info(f"{PREFIX}PTQ (calibrated, before QAT training): P {mp:.4g}  R {mr:.4g}  mAP50 {map50:.4g}  "
                f"mAP50-95 {map_:.4g}")


def ptq_model(model, data, imgsz, batch_size, stride, device, pow2=False, bn_folding=False, recipe="",
              calib_batches=32, workers=8, save=""):
    """Post-training quantization of a float DetectionModel: prepare, calibrate on the train split, optionally
    save as a checkpoint (loadable by val.py / detect.py / export.py like a QAT one)."""
    model = prepare_yolo_qat(model.float().train(), bn_folding=bn_folding, pow2=pow2, recipe=recipe or None).to(device)
    loader = create_dataloader(data["train"], imgsz, batch_size, stride, augment=False, rect=False, workers=workers,
                               shuffle=True, prefix=colorstr("calib: "))[0]
    calibrate(model, loader, calib_batches, device)
    model.eval()
    if save:
        save_checkpoint(build_checkpoint(model, qat=qat_meta(model, calib_batches=calib_batches, ptq=True)), save)
        LOGGER.info(f"{PREFIX}PTQ model saved to {save}")
    return model
