"""The QAT steps of a training run (flag checks, preparation, the calibration pass with its PTQ report, the per-epoch
BN / observer schedule) and val.py --ptq's post-training quantization. The model surgery itself is models/quant.py;
the library is bst/."""
from __future__ import annotations

from copy import deepcopy

import torch

from models.checkpoint import build_checkpoint, save_checkpoint
from models.common import model_activation
from models.quant import (
    QATConfig,
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

PREFIX = colorstr("QAT: ")
SCHEDULE_FLAGS = ("freeze_bn_epoch", "disable_observer_epoch")


def check_qat_flags(opt):
    """Bad combinations end in one line; SiLU is allowed with a warning."""
    for f in SCHEDULE_FLAGS:
        if getattr(opt, f, -1) < -1:
            raise UserError(f"--{f.replace('_', '-')} {getattr(opt, f)}: must be an epoch index >= 0, or -1 for never")
    config = QATConfig.from_options(opt)
    if not getattr(opt, "qat", False):
        used = config.flags_given()
        used += [f"--{f.replace('_', '-')} {getattr(opt, f)}" for f in SCHEDULE_FLAGS if getattr(opt, f, -1) >= 0]
        if used:
            raise UserError(f"{', '.join(used)} only apply to quantization-aware training; add --qat")
        return
    if opt.calib_batches < 1:
        raise UserError(f"--calib-batches {opt.calib_batches}: calibrate on at least one batch")
    if config.recipe:
        load_recipe(config.recipe)  # the schema check, before any data or model is loaded
    if opt.act == "silu":
        LOGGER.warning(f"{PREFIX}WARNING: --act silu: shift-only int8 hardware has no SiLU; it is quantized here as "
                       f"a lookup table on its int8 output. Retrain with --act relu (or relu6) for such hardware")


class QATRun:
    """The QAT of one training run: how the model is quantized (a QATConfig from the flags, or the model's own when
    it is quantized already), the BN / observer schedule and the calibration pass, and its steps."""

    def __init__(self, opt):
        self.enabled = bool(getattr(opt, "qat", False))
        self.config = QATConfig.from_options(opt)
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
            self._adopt(model.qat_config)
            return model
        if model_activation(model) == "silu" and self.enabled:
            LOGGER.warning(f"{PREFIX}WARNING: the model uses SiLU; its outputs are quantized as a lookup table")
        return prepare_yolo_qat(model, self.config)

    def _adopt(self, own: QATConfig):
        """An already quantized model keeps how it was quantized: record its own config, and say which of the given
        flags cannot change it."""
        given = self.config
        settings = ("bn_folding", "pow2", "pow2_rounding", "rounding")
        ignored = [f"{QATConfig.flag(k)} {getattr(given, k)}" for k in settings if getattr(given, k) != getattr(own, k)]
        if given.recipe and given.recipe_name != own.recipe_name:
            ignored.append(f"--qat-recipe {given.recipe}")
        if ignored:
            LOGGER.warning(f"{PREFIX}WARNING: the model is already quantized (bn_folding={own.bn_folding}, "
                           f"pow2={own.pow2}, pow2_rounding={own.pow2_rounding}, rounding={own.rounding}, "
                           f"recipe {own.recipe_name}); {', '.join(ignored)} cannot change that and are ignored")
        self.config = own

    def calibrate(self, model, loader, device):
        if self.resumed:
            return 0
        seen = calibrate(model, loader, self.calib_batches, device)
        if model.qat_config.shares_concat_scales:
            self._share(model)
        return seen

    @staticmethod
    def _share(model):
        """Re-share the concat scales (after observers froze them); needs no data, so a resumed run does it too."""
        training = model.training
        share_concat_scales(model, example_input(model))
        model.train(training)

    def start_epoch(self, model, epoch):
        state = apply_schedule(model, epoch, self.freeze_bn_epoch, self.disable_observer_epoch)
        if not state["observers"] and model.qat_config.shares_concat_scales:
            self._share(model)  # observers just froze the scales (again): re-share them
        if state != self.state:
            LOGGER.info(f"{PREFIX}epoch {epoch}: BN statistics {'frozen' if state['bn_frozen'] else 'updating'}, "
                        f"observers {'on' if state['observers'] else 'off (scales frozen)'}")
        self.state = state
        return state

    def schedule(self) -> dict:
        """How this run uses QAT, for the checkpoint's "qat" record beside the model's config."""
        return {"freeze_bn_epoch": self.freeze_bn_epoch, "disable_observer_epoch": self.disable_observer_epoch,
                "calib_batches": self.calib_batches}


def checkpoint_copy(model):
    """What train.py stores: FP16 as upstream for float models; QAT models stay float32 (see strip_optimizer)."""
    m = deepcopy(model)
    return m if is_quantized(m) else m.half()


@torch.no_grad()
def report_ptq(results):
    mp, mr, map50, map_ = results[:4]
    LOGGER.info(f"{PREFIX}PTQ (calibrated, before QAT training): P {mp:.4g}  R {mr:.4g}  mAP50 {map50:.4g}  "
                f"mAP50-95 {map_:.4g}")


def ptq_model(model, data, imgsz, batch_size, stride, device, config: QATConfig, calib_batches=32, workers=8, save=""):
    """Post-training quantization of a float DetectionModel as `config` says: prepare, calibrate on the train split,
    optionally save as a checkpoint (loadable by val.py / detect.py / export.py like a QAT one)."""
    model = prepare_yolo_qat(model.float().train(), config).to(device)
    loader = create_dataloader(data["train"], imgsz, batch_size, stride, augment=False, rect=False, workers=workers,
                               shuffle=True, prefix=colorstr("calib: "))[0]
    calibrate(model, loader, calib_batches, device)
    model.eval()
    if save:
        save_checkpoint(build_checkpoint(model, qat={"calib_batches": calib_batches, "ptq": True}), save)
        LOGGER.info(f"{PREFIX}PTQ model saved to {save}")
    return model
