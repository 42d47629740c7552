"""bst.torch.ao.quantization: observers, fake quantizers (with power-of-two scales), qconfigs,
fusion, prepare_qat / convert and an integer-only reference. Public names mirror torch.ao.quantization.

Importing this package never imports torch.ao.quantization.
"""
from bst.torch.ao.nn.quantized.reference import integer_mode

from .calibrators import TRAINING_UPDATES, HistogramMSEObserver, MSEObserver, PercentileObserver
from .factory import Factory
from .fake_quantize import (
    FakeQuantize,
    FakeQuantizeBase,
    FixedQParamsFakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    LearnableFakeQuantize,
    disable_fake_quant,
    disable_observer,
    enable_fake_quant,
    enable_observer,
    fake_quant_enabled,
    frozen_qparams,
    output_quantizer,
    qparams_of,
)
from .fuse import SUPPORTED_PATTERNS, fuse_conv_bn_weights, fuse_modules, fuse_modules_qat
from .integer_reference import QTensor
from .mappings import get_default_convert_module_mappings, get_default_qat_module_mappings
from .observer import (
    FixedQParamsObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MovingAveragePerChannelMinMaxObserver,
    ObserverBase,
    PerChannelMinMaxObserver,
)
from .pow2 import is_pow2
from .qconfig import QConfig, get_default_calibration_qconfig, get_default_qat_qconfig
from .quantize import (
    convert,
    freeze_qparams,
    output_quantizer_hook,
    prepare_qat,
    propagate_qconfig_,
    trace_input_quantizers,
)
from .state import (
    QuantizerModule,
    copy_quantizer_state_,
    is_quantizer_state,
    load_module_attributes,
    module_attributes,
    quantizer_parameters,
    quantizer_state_keys,
)
from .stubs import DeQuantStub, QuantStub

__all__ = [
    "MSEObserver", "HistogramMSEObserver", "PercentileObserver", "TRAINING_UPDATES", "Factory",
    "FakeQuantize", "FakeQuantizeBase", "FixedQParamsFakeQuantize", "FusedMovingAvgObsFakeQuantize",
    "LearnableFakeQuantize", "disable_fake_quant", "disable_observer", "enable_fake_quant", "enable_observer",
    "fake_quant_enabled", "frozen_qparams", "output_quantizer", "qparams_of",
    "SUPPORTED_PATTERNS", "fuse_conv_bn_weights", "fuse_modules", "fuse_modules_qat",
    "QTensor", "integer_mode",
    "get_default_convert_module_mappings", "get_default_qat_module_mappings",
    "FixedQParamsObserver", "MinMaxObserver", "MovingAverageMinMaxObserver", "MovingAveragePerChannelMinMaxObserver",
    "ObserverBase", "PerChannelMinMaxObserver",
    "is_pow2",
    "QConfig", "get_default_calibration_qconfig", "get_default_qat_qconfig",
    "convert", "freeze_qparams", "output_quantizer_hook", "prepare_qat", "propagate_qconfig_", "trace_input_quantizers",
    "QuantizerModule", "copy_quantizer_state_", "is_quantizer_state", "quantizer_parameters", "quantizer_state_keys",
    "DeQuantStub", "QuantStub", "module_attributes", "load_module_attributes",
]
