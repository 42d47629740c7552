"""What every exporter shares: the formats and their file suffixes, the ONNX opset range, the export job (the model,
sample batches and options one checkpoint's exports and checks read), and the model preparation they all start from
(eval mode and Detect's export settings; bst.convert's integer network for a QAT model)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET

from bst.torch.ao.quantization import frozen_qparams
from models.quant import convert_yolo, freeze
from models.yolo import Detect
from utils.general import UserError
from utils.runtimes import OPENVINO_DIR

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx", "openvino": OPENVINO_DIR,  # --include -> suffix
           "integer": "_integer_model"}
TITLES = {"torchscript": "TorchScript:", "onnx": "ONNX:", "openvino": "OpenVINO:", "integer": "Integer:"}  # log prefix
MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear take a per-channel `axis` from opset 13 on (QAT exports need it)
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "output0"


@dataclass
class ExportJob:
    """One checkpoint's exports: what each exporter (workflow/exporters/<format>.py) writes from and what the one
    verification step (workflow.exporters.verify.verify_export) checks every written file against."""
    model: nn.Module  # the loaded checkpoint, prepared for export: the reference every file is compared with
    export_model: nn.Module  # what is traced: `model`, or bst.convert's integer network of a fake-quant model
    weights: str  # the checkpoint; exported files are written beside it
    im: torch.Tensor  # the sample batch at the export shape
    checks: list  # the batches every file is verified on: im, and a second shape with dynamic
    metadata: dict  # stride, names, quantized (and pow2 for a QAT model)
    rtol: float  # tolerance of a float export (verify.FLOAT_RTOL, or HALF_RTOL with half)
    opset: int = DEFAULT_OPSET
    dynamic: bool = False
    half: bool = False
    simplify: bool = False
    optimize: bool = False
    verbose: bool = False
    onnx_file: Path | None = None  # the ONNX file the onnx exporter wrote, which the openvino exporter converts
    openvino_source: Path | None = None  # the temporary ONNX file OpenVINO converted, kept until it is verified
    integer_network: nn.Module | None = None  # the network the integer model was recorded from

    @property
    def quantized(self) -> bool:
        return bool(self.metadata.get("quantized"))

    def remove_temporary(self) -> None:
        """Delete what an exporter wrote only for the verification step (the OpenVINO source file)."""
        if self.openvino_source is not None:
            source, self.openvino_source = self.openvino_source, None
            source.unlink()


def max_opset() -> int:
    """Highest opset the TorchScript-based ONNX exporter of this torch writes."""
    try:
        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 20


def file_size_mb(path) -> float:
    path = Path(path)
    files = [f for f in path.rglob("*") if f.is_file()] if path.is_dir() else [path]
    return sum(f.stat().st_size for f in files) / 1e6


def model_metadata(model) -> dict:
    """What a loader needs besides the graph: the largest stride and the class names {index: name}."""
    names = model.module.names if hasattr(model, "module") else model.names
    names = dict(enumerate(names)) if isinstance(names, (list, tuple)) else {int(k): v for k, v in names.items()}
    return {"stride": int(max(int(model.stride.max()), 32)), "names": names}


def prepare_for_export(model: nn.Module, inplace=False, dynamic=False) -> nn.Module:
    """Eval mode, no gradients, and Detect set up as upstream export does it.

    Detect.export makes the model return only the decoded tensor (one graph output); Detect.dynamic rebuilds the
    anchor grids from the input shape inside the graph, so a --dynamic file works at any size.
    """
    model.eval()
    for p in model.parameters():
        p.requires_grad = False
    for m in model.modules():
        if isinstance(m, Detect):
            m.inplace = inplace
            m.dynamic = dynamic
            m.export = True
    return model


def converted_model(model, path) -> nn.Module:
    """bst.convert's integer network of QAT `model` (models.quant.convert_yolo; activations without an integer form,
    e.g. SiLU, stay float between their quantizers): what the ONNX and TorchScript exports of a QAT model trace.
    `model` is frozen (observers off). Quantizers whose scales are not usable are refused in one line."""
    freeze(model)
    for name, m in model.named_modules():
        try:
            frozen_qparams(m)  # None for anything but an enabled fake quantizer; raises on an unusable scale
        except ValueError as e:
            raise UserError(f"{path}: {name}: {e} (train.py --qat starts with a calibration pass)") from None
    try:
        converted = convert_yolo(model, integer=False)
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return converted


def second_shape(shape, stride):
    """Another input shape to prove a --dynamic file: one more image, one stride taller, two strides wider."""
    bs, c, h, w = shape
    return bs + 1, c, h + stride, w + 2 * stride
