"""The YOLO side of QAT: the quantization library (bst.torch.ao) knows nothing about YOLO; this package tells it.

  config      QATConfig: the five QAT settings, their defaults, flags and checkpoint record
  recipe      the recipe schema (data/quant/*.yaml) and the QConfig each entry makes
  prepare     a float DetectionModel made a QAT model: fused Conv blocks, quantized skip-adds and concats, the input
              quantizer, Detect's convs (prepare_yolo_qat), and concats sharing one scale
  state       quantizers, observers, fake quantization, BN freezing, calibration, the epoch schedule, frozen qparams
  float_part  the float architecture of a QAT model, as a checkpoint stores it (float_model)
  convert     the integer network (convert_yolo) and bst's integer reference run on it (integer_head)

Every public name is importable from models.quant itself.
"""
from models.quant.config import QATConfig
from models.quant.convert import convert_yolo, integer_head
from models.quant.float_part import float_model
from models.quant.prepare import QuantizedActivation, prepare_yolo_qat, share_concat_scales
from models.quant.recipe import (
    CALIBRATORS,
    DEFAULT_RECIPE,
    MODES,
    OBSERVERS,
    PER_CHANNEL,
    eval_fraction,
    load_recipe,
    make_qconfig,
)
from models.quant.state import (
    all_scales_pow2,
    apply_schedule,
    calibrate,
    example_input,
    freeze,
    freeze_bn,
    is_quantized,
    observer_states,
    observers_frozen,
    quantizers,
    restore_observer_states,
    set_fake_quant,
    set_observers,
)

__all__ = ["CALIBRATORS", "DEFAULT_RECIPE", "MODES", "OBSERVERS", "PER_CHANNEL", "QATConfig", "QuantizedActivation",
           "all_scales_pow2", "apply_schedule", "calibrate", "convert_yolo", "eval_fraction", "example_input",
           "float_model", "freeze", "freeze_bn", "integer_head", "is_quantized", "load_recipe", "make_qconfig",
           "observer_states", "observers_frozen", "prepare_yolo_qat", "quantizers",
           "restore_observer_states", "set_fake_quant", "set_observers", "share_concat_scales"]
