"""Export a YOLOv5 checkpoint to TorchScript and ONNX, and prove each file computes what PyTorch computes.

Usage:
    python export.py --weights yolov5s.pt --include torchscript onnx
    python export.py --weights runs/train/exp/weights/best.pt --imgsz 320 --include onnx --dynamic
    python export.py --weights best.pt --data shapes.yaml      (check on real val images instead of noise)

Format        --include     file written beside the weights
TorchScript   torchscript   yolov5s.torchscript  (extra file config.txt: json {shape, stride, names})
ONNX          onnx          yolov5s.onnx         (metadata_props: stride, names, quantized[, pow2])
Integer       integer       best_integer_model/  (QAT, power-of-two scales: the integer network as data, with a
                                                  numpy-only runner; see `export_integer`)

A QAT checkpoint (train.py --qat: a fake-quant model) is detected and exported as int8 QDQ: QuantizeLinear/
DequantizeLinear on every activation quantizer, int8 weights with per-channel DequantizeLinear (axis 0), BN folded,
scales copied exactly (powers of two stay powers of two); Detect's decoding stays float. See `qdq_model`.

Every exported file is run on a seeded sample batch at the export shape and compared with the PyTorch model
(`verify_onnx`, `verify_torchscript`; `verify_onnx_qdq`, `verify_torchscript_qdq` for QAT models). A float export
whose largest difference exceeds 1e-4 of the largest output magnitude is an error; a QDQ export whose raw Detect
outputs are more than one step of their output quantizer from the fake-quant model is an error. Then use it with:
    python val.py --weights yolov5s.onnx --img 640          (onnxruntime; --dnn for OpenCV DNN)
    python detect.py --weights yolov5s.onnx
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import shutil
import sys
import time
import warnings
from copy import deepcopy
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
from torch.utils.mobile_optimizer import optimize_for_mobile

from bst.torch.ao.nn.intrinsic.qat import ConvBn2d
from bst.torch.ao.nn.qat import Conv2d as QATConv2d
from bst.torch.ao.nn.qat.conv import ACTIVATIONS, eval_bias
from bst.torch.ao.quantization import FakeQuantizeBase, fake_quant_enabled, is_pow2, qparams_of
from bst.torch.ao.quantization.integer_graph import record
from bst.torch.ao.quantization.integer_runner import IntegerModel
from models.backend import (
    load_pytorch_model,
    onnxruntime_session,
)
from models.quant import (
    convert_yolo,
    freeze,
    integer_head,
    is_quantized,
)
from models.yolo import Detect
from utils.dataloaders import LoadImages, _list_image_files
from utils.dataset_yaml import check_dataset
from utils.general import LOGGER, UserError, check_file, check_img_size, colorstr, print_args, run_cli
from utils.torch_utils import select_device

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx", "integer": "_integer_model"}  # --include -> suffix
MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear take a per-channel `axis` from opset 13 on (QAT exports need it)
DEFAULT_OPSET = 17
FLOAT_RTOL = 1e-4  # float32 export: max |diff| <= FLOAT_RTOL * max |PyTorch output|
HALF_RTOL = 1e-3  # float16 export: about one float16 rounding (eps 9.8e-4) of the largest output
INPUT_NAME, OUTPUT_NAME = "images", "output0"


def _max_opset() -> int:
    """Highest opset the TorchScript-based ONNX exporter of this torch writes."""
    try:
        return int(ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET)
    except (ImportError, AttributeError):
        return 20


@contextlib.contextmanager
def _quiet_tracing():
    """Hide the tracer's notes on Python-side shape checks (the shapes are fixed by design unless --dynamic) and
    torch.jit's deprecation notices; the exported file is verified numerically instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


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


def sample_batch(shape, data=None, seed=0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The batch the exports are checked on: (bs, 3, h, w) in [0, 1].

    With a dataset yaml, the first bs images of its val split letterboxed to (h, w); else seeded uniform noise.
    """
    bs, _, h, w = shape
    if data is None:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(tuple(shape), generator=g).to(device=device, dtype=dtype)
    d = check_dataset(data)
    files = _list_image_files(d["val"], prefix=f"{data}: val: ")
    images = [im for _, im, *_ in LoadImages(files[:bs], img_size=(h, w), auto=False)]
    while len(images) < bs:  # fewer val images than the batch: repeat them
        images.append(images[len(images) % max(len(images), 1)])
    im = torch.from_numpy(np.stack(images)).to(device=device, dtype=dtype) / 255
    return im


def compare_outputs(ref, out, rtol=FLOAT_RTOL, atol=0.0) -> dict:
    """How far `out` is from `ref` (same shape). Passes when max |out - ref| <= atol + rtol * max |ref|.

    Returns max_abs_diff, ref_max_abs, relative (max_abs_diff / ref_max_abs), share_differ (fraction of elements that
    differ at all), share_over (fraction above the tolerance), tolerance (the absolute bound), rtol, atol, ok.
    The QDQ export passes atol = one step of the output quantizer and rtol = 0.
    """
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"out: shape {out.shape} differs from the reference shape {ref.shape}")
    diff = np.abs(out - ref)
    finite = bool(np.isfinite(out).all())
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    max_diff = float(diff.max()) if diff.size else 0.0
    tol = atol + rtol * ref_max
    return {"max_abs_diff": max_diff, "ref_max_abs": ref_max, "relative": max_diff / ref_max if ref_max else max_diff,
            "share_differ": float((diff > 0).mean()) if diff.size else 0.0,
            "share_over": float((diff > tol).mean()) if diff.size else 0.0,
            "tolerance": tol, "rtol": rtol, "atol": atol, "ok": finite and max_diff <= tol}


def _first(y):
    return y[0] if isinstance(y, (list, tuple)) else y


def _report(result: dict, what: str, path, check: bool, prefix: str) -> dict:
    line = (f"{prefix} {what} vs PyTorch on {result['shape']}: max |diff| {result['max_abs_diff']:.3g} = "
            f"{result['relative']:.2e} of max |output| {result['ref_max_abs']:.4g} (tolerance {result['rtol']:g} "
            f"relative + {result['atol']:g}), {100 * result['share_differ']:.1f}% of outputs differ")
    LOGGER.info(line)
    if check and not result["ok"]:
        raise UserError(f"{path}: the exported model disagrees with PyTorch (max |diff| {result['max_abs_diff']:.3g}, "
                        f"{result['relative']:.2e} of the largest output, allowed {result['rtol']:g} relative + "
                        f"{result['atol']:g}); the file is left for inspection, do not deploy it")
    return result


@torch.no_grad()
def verify_onnx(model, onnx_path, im, rtol=FLOAT_RTOL, atol=0.0, check=True, prefix=colorstr("ONNX:")) -> dict:
    """Run `onnx_path` in onnxruntime (CPU) on `im` and compare with `model(im)` (see compare_outputs).

    The input is cast to the file's input type (float16 exports). With check=True a failure raises UserError.
    Returns compare_outputs' dict plus `shape` and `output` (the onnxruntime result).
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
        raise UserError(f"{onnx_path}: onnxruntime {ort.__version__} cannot load the exported file "
                        f"({str(e).strip().splitlines()[0][:200]})") from None
    inp = session.get_inputs()[0]
    np_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    out = session.run(None, {inp.name: im.detach().cpu().numpy().astype(np_dtype)})[0]
    ref = _first(model(im)).float().cpu().numpy()
    result = compare_outputs(ref, out.astype(np.float32), rtol=rtol, atol=atol)
    result.update(shape=tuple(im.shape), output=out)
    return _report(result, "onnxruntime", onnx_path, check, prefix)


@torch.no_grad()
def verify_torchscript(model, ts_path, im, rtol=FLOAT_RTOL, atol=0.0, check=True,
                       prefix=colorstr("TorchScript:")) -> dict:
    """Load `ts_path` with torch.jit.load and compare its output on `im` with `model(im)`, as verify_onnx."""
    with _quiet_tracing():
        ts = torch.jit.load(str(ts_path), map_location=im.device).eval()
    out = _first(ts(im)).float().cpu().numpy()
    ref = _first(model(im)).float().cpu().numpy()
    result = compare_outputs(ref, out, rtol=rtol, atol=atol)
    result.update(shape=tuple(im.shape), output=out)
    return _report(result, "torch.jit", ts_path, check, prefix)


def export_torchscript(model, im, file, metadata, optimize=False, dynamic=False,
                       prefix=colorstr("TorchScript:")) -> Path:
    """Trace the model at im's shape; config.txt (json shape, stride, names, dynamic) rides along as an extra file.

    The trace fixes h and w (the Detect grids are constants) unless the model was prepared with dynamic=True.

    optimize=True rewrites it for the mobile (lite) interpreter; torch.jit.load still reads the result.
    """
    LOGGER.info(f"\n{prefix} starting export with torch {torch.__version__}...")
    f = Path(file).with_suffix(FORMATS["torchscript"])
    with _quiet_tracing():
        ts = torch.jit.trace(model, im, strict=False, check_trace=False)  # verify_torchscript checks the file
    config = {"shape": list(im.shape), "stride": metadata["stride"], "names": metadata["names"], "dynamic": dynamic}
    extra = {"config.txt": json.dumps(config)}
    if optimize:
        optimize_for_mobile(ts)._save_for_lite_interpreter(str(f), _extra_files=extra)
    else:
        ts.save(str(f), _extra_files=extra)
    return f


def _simplifier():
    """The maintained ONNX simplifier that is installed (onnxslim preferred, else onnxsim), or None."""
    try:
        import onnxslim

        return "onnxslim", lambda m: onnxslim.slim(m)
    except ImportError:
        pass
    try:
        import onnxsim

        def simplify(m):
            m, ok = onnxsim.simplify(m)
            if not ok:
                raise RuntimeError("onnxsim could not validate the simplified model")
            return m

        return "onnxsim", simplify
    except ImportError:
        return None


def export_onnx(model, im, file, metadata, opset=DEFAULT_OPSET, dynamic=False, simplify=False, verbose=False,
                prefix=colorstr("ONNX:")) -> Path:
    """Export with the TorchScript-based exporter, `torch.onnx.export(..., dynamo=False)`.

    Why not the newer dynamo exporter (torch.export + onnxscript)? It was known for not handling fake-quant ops.
    Checked with torch 2.14 / onnxscript 0.7.2 on a one-conv fake-quant module: on the plain
    `fake_quantize_per_{tensor,channel}_affine` ops both exporters now write the same QuantizeLinear/
    DequantizeLinear (per-channel axis 0) and onnxruntime matches PyTorch; on the training-form ops
    (`_fake_quantize_learnable_per_tensor_affine`, `fused_moving_avg_obs_fake_quant`) both fail, and both refuse
    (quant_min, quant_max) outside {(0, 127), (0, 255), (-128, 127)}, e.g. a narrow-range (-127, 127) weight
    quantizer. So the choice rests on the rest: this exporter writes the opset asked for (dynamo raises it to >= 18
    and converts down afterwards) and needs no onnxscript package, which is not a dependency here.

    QAT models: traced as they are, bst's fake quantizers would not become QDQ at all (on CPU they run a custom
    autograd function, which the exporter inlines into Mul/Round/Clip; LearnableFakeQuantize likewise). So a QAT
    model is exported in its export form (`qdq_model`), whose modules carry an ONNX `symbolic` writing exactly
    QuantizeLinear -> DequantizeLinear per activation quantizer and an int8 weight initializer -> DequantizeLinear
    (the weight's integers computed by PyTorch, not re-rounded by a runtime); the initializers the exporter shares
    between equal values are then given back to each node (`own_initializers`).

    The file gets metadata_props stride, names and quantized ("1" for a fake-quant model), as DetectMultiBackend
    reads them; a quantized model also pow2 ("1" when every quantizer keeps power-of-two scales).
    """
    import onnx

    LOGGER.info(f"\n{prefix} starting export with onnx {onnx.__version__} opset {opset}...")
    f = Path(file).with_suffix(FORMATS["onnx"])
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}} \
        if dynamic else None
    with _quiet_tracing():
        torch.onnx.export(model, (im,), str(f), verbose=verbose, opset_version=opset, do_constant_folding=True,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes, dynamo=False)
    proto = onnx.load(str(f))
    if metadata.get("quantized"):
        own_initializers(proto)
    onnx.checker.check_model(proto)
    if simplify:
        name, simplify_fn = _simplifier()
        LOGGER.info(f"{prefix} simplifying with {name}...")
        proto = simplify_fn(proto)
        onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    meta = {"stride": str(metadata["stride"]), "names": str(metadata["names"]),
            "quantized": "1" if metadata.get("quantized") else "0"}
    if metadata.get("quantized"):
        meta["pow2"] = "1" if metadata.get("pow2") else "0"
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(f))
    return f


# ---------------------------------------------------------------------------------------------------------------------
# QAT checkpoints -> ONNX QuantizeLinear/DequantizeLinear (QDQ)
# ---------------------------------------------------------------------------------------------------------------------
# The fake-quant model computes in float what an int8 accelerator computes in integers. Its export form (`qdq_model`)
# computes the same numbers with modules that the TorchScript-based ONNX exporter writes as QDQ nodes:
#   * every activation quantizer (input QuantStub, conv outputs, skip-adds, concats, activation outputs, the Detect
#     convs' outputs) -> QuantizeLinear -> DequantizeLinear, per tensor, scalar float32 scale, uint8/int8 zero point;
#     a Detect conv with one output scale per channel (default recipe) has them in its weight scales and bias instead
#     and its QDQ pair has scale 1, followed by a Mul with the per-channel scales (`QDQConv2d._fold_output_scales`);
#   * every quantized conv weight -> the integers its fake quantizer rounds it to, stored as an int8 initializer ->
#     DequantizeLinear (per channel on axis 0 with zero point 0, or per tensor, as the model quantized it);
#   * Conv+BN with simulated folding: in eval mode the QAT module computes conv(x, fq(w * g)) / g followed by BN with
#     its running statistics, g = gamma / sqrt(running_var + eps); that is conv(x, fq(w * g)) + the folded bias
#     beta + (b - running_mean) * g, which the file holds: the weight QDQ sits on the folded weight w * g;
#   * biases are float32 initializers holding what the frozen fake-quant model adds: a conv fed by a per-tensor
#     quantizer adds its bias on the int32 grid input_scale * weight_scale (bst freeze_qparams); Detect's sigmoid and
#     box decoding stay float.
# Scales are copied as float32 tensors, so a power of two stays an exact power of two in the file.
# Outside ONNX export the same modules run torch's fake-quant ops (TorchScript traces them as plain ATen ops).
# With power-of-two scales every product and sum of a conv is exact in float32 (int8 x int8 products on the grid
# input_scale * weight_scale, the bias on the same grid), so onnxruntime reproduces PyTorch bit for bit whatever its
# summation order, and the verification below requires exactly that. Linear (non-pow2) scales can differ by float
# rounding (QuantizeLinear divides by the scale while torch multiplies by its float32 reciprocal; products are not
# exact), and a value on a rounding boundary of the next quantizer then lands one step apart: they get the one-step
# bound.

INT_RANGES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}  # QuantizeLinear saturates to its type's range
STEP_SLACK = 1e-4  # dequantized values are rounded to float32: two values k steps apart differ by k steps +- ~3e-5


class _QuantDequant(torch.autograd.Function):
    """Fake quantization (torch's core kernels), written by the ONNX exporter as QuantizeLinear -> DequantizeLinear.

    A range narrower than its integer type (e.g. [0, 127]) becomes a Clip to the grid's end points before
    QuantizeLinear, which then rounds to the same integers."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, clip):
        return _fake_quant(x, scale, zero_point, quant_min, quant_max, axis)

    @staticmethod
    def symbolic(g, x, scale, zero_point, quant_min, quant_max, axis, clip):
        kw = {} if axis is None else {"axis_i": axis}
        if clip is not None:
            lo = g.op("Constant", value_t=torch.tensor(clip[0], dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip[1], dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class _RoundThenScale(torch.autograd.Function):
    """Round to integers (scale 1, zero point 0, clamped to the integer type), then multiply by a per-channel scale:
    written as QuantizeLinear -> DequantizeLinear (both scale 1) -> Mul. See `PerChannelOutput`."""

    @staticmethod
    def forward(ctx, x, quant_min, quant_max, scale, one, zero):
        return _round_clamp(x, quant_min, quant_max) * scale

    @staticmethod
    def symbolic(g, x, quant_min, quant_max, scale, one, zero):
        q = g.op("QuantizeLinear", x, one, zero)
        return g.op("Mul", g.op("DequantizeLinear", q, one, zero), scale)


def _round_clamp(x, quant_min, quant_max):
    return torch.clamp(torch.round(x), quant_min, quant_max)


def _fake_quant(x, scale, zero_point, quant_min, quant_max, axis):
    zp = zero_point.to(torch.int32)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zp, quant_min, quant_max)
    return torch.fake_quantize_per_channel_affine(x, scale, zp, axis, quant_min, quant_max)


class _Dequantize(torch.autograd.Function):
    """(q - zero_point) * scale of an integer tensor q, written as DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):
        return _dequantize(q, scale, zero_point, axis)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        kw = {} if axis is None else {"axis_i": axis}
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


def _dequantize(q, scale, zero_point, axis):
    shape = [1] * q.dim()
    if axis is not None:
        shape[axis] = -1
    return (q.float() - zero_point.float().reshape(shape)) * scale.reshape(shape)


def _fake_quant_enabled(fq) -> bool:
    return fake_quant_enabled(fq)


def frozen_qparams(fq, name="quantizer"):
    """(scale float32, zero_point int32) that fake quantizer `fq` applies in eval mode with its observer off, or None
    when its fake quantization is off. Per-tensor qparams come back 0-d (a per-tensor QDQ scale is a scalar)."""
    if not _fake_quant_enabled(fq):
        return None
    scale, zero_point = qparams_of(fq)[:2]
    if not (torch.isfinite(scale).all() and (scale > 0).all()):
        raise UserError(f"{name}: scale {scale.flatten()[:4].tolist()} is not a positive finite number; calibrate the "
                        f"QAT model before exporting it (train.py --qat starts with a calibration pass)")
    if not fq.is_per_channel:
        if scale.numel() != 1:
            raise UserError(f"{name}: a per-tensor quantizer holds {scale.numel()} scales; the checkpoint is damaged")
        scale, zero_point = scale.reshape(()), zero_point.reshape(())
    return scale, zero_point


def _int_type(quant_min, quant_max, name):
    for dtype, (lo, hi) in INT_RANGES.items():
        if lo <= quant_min and quant_max <= hi:
            return dtype
    raise UserError(f"{name}: quantization range [{quant_min}, {quant_max}] fits neither int8 [-128, 127] nor uint8 "
                    f"[0, 255], the types of ONNX QuantizeLinear/DequantizeLinear; quantize to 8 bits to export QDQ")


class QuantDequant(nn.Module):
    """Export form of an activation fake quantizer: frozen qparams; QuantizeLinear -> DequantizeLinear in ONNX."""

    def __init__(self, scale, zero_point, quant_min, quant_max, axis=None, name="quantizer"):
        super().__init__()
        dtype = _int_type(quant_min, quant_max, name)
        self.register_buffer("scale", scale.float())
        self.register_buffer("zero_point", zero_point.to(dtype))
        self.quant_min, self.quant_max, self.axis = int(quant_min), int(quant_max), axis
        self.clip = None
        if (quant_min, quant_max) != INT_RANGES[dtype]:
            if axis is not None:
                raise UserError(f"{name}: a per-channel activation quantizer with the narrow range [{quant_min}, "
                                f"{quant_max}] has no QDQ form here; use the full 8-bit range")
            zp, s = float(zero_point), float(scale)
            self.clip = ((quant_min - zp) * s, (quant_max - zp) * s)

    @classmethod
    def from_fake_quant(cls, fq, name="quantizer"):
        """The export form of fake quantizer `fq`, or nn.Identity when its fake quantization is off."""
        qparams = frozen_qparams(fq, name)
        if qparams is None:
            return nn.Identity()
        return cls(*qparams, fq.quant_min, fq.quant_max, axis=fq.ch_axis if fq.is_per_channel else None, name=name)

    def forward(self, x):
        axis = None if self.axis is None else self.axis % x.dim()
        if torch.onnx.is_in_onnx_export():
            return _QuantDequant.apply(x, self.scale, self.zero_point, self.quant_min, self.quant_max, axis, self.clip)
        return _fake_quant(x, self.scale, self.zero_point, self.quant_min, self.quant_max, axis)

    def extra_repr(self):
        return (f"scale={self.scale.flatten()[:4].tolist()}, zero_point={self.zero_point.flatten()[:4].tolist()}, "
                f"range=[{self.quant_min}, {self.quant_max}], axis={self.axis}")


class PerChannelOutput(nn.Module):
    """Export form of a symmetric per-channel output quantizer (axis 1, zero point 0) whose 1/scale the conv before
    it has taken into its weight scales and bias (see `QDQConv2d`): round and clamp to the integer type with scale
    1, then multiply by the per-channel scale. In ONNX: QuantizeLinear -> DequantizeLinear (per tensor, scale 1) ->
    Mul, the int8 output and the float scales the host applies to it; every activation QDQ pair stays per tensor,
    which QDQ consumers such as TensorRT require of activations."""

    def __init__(self, scale, quant_min, quant_max):
        super().__init__()
        self.register_buffer("scale", scale.float().reshape(1, -1, 1, 1))
        self.register_buffer("one", torch.tensor(1.0))  # the QDQ pair's scale and zero point (initializers in ONNX)
        self.register_buffer("zero", torch.tensor(0, dtype=_int_type(quant_min, quant_max, "output quantizer")))
        self.quant_min, self.quant_max = quant_min, quant_max

    def forward(self, x):
        if torch.onnx.is_in_onnx_export():
            return _RoundThenScale.apply(x, self.quant_min, self.quant_max, self.scale, self.one, self.zero)
        return _round_clamp(x, self.quant_min, self.quant_max) * self.scale

    def extra_repr(self):
        return f"scale={self.scale.flatten()[:4].tolist()}..., range=[{self.quant_min}, {self.quant_max}], axis=1"


class QDQConv2d(nn.Module):
    """Export form of a QAT conv (bst qat Conv2d / ConvReLU2d ..., intrinsic qat ConvBn2d / ConvBnReLU2d ...).

    The weight is held as the integers its fake quantizer rounds it to (an int8 initializer -> DequantizeLinear in
    ONNX); with simulated BN folding that is the folded weight, and the bias is the folded bias (see above). Then
    the QAT module's activation (ReLU / ReLU6) and its output quantizer."""

    def __init__(self, qat, name="conv"):
        super().__init__()

        if qat.padding_mode != "zeros":
            raise UserError(f"{name}: padding_mode {qat.padding_mode!r} has no export form here; use zeros padding")
        self.stride, self.padding, self.dilation, self.groups = qat.stride, qat.padding, qat.dilation, qat.groups
        self.activation_name = qat._activation
        self.activation = ACTIVATIONS[qat._activation]
        weight, bias = qat.folded_weight_bias()  # the very tensor weight_fake_quant sees in forward (BN folded)
        fq = qat.weight_fake_quant
        qparams = frozen_qparams(fq, f"{name}.weight_fake_quant")
        self.weight, self.axis = None, None
        if qparams is None:  # weight quantization switched off: a float weight
            self.weight = nn.Parameter(weight.detach().float().clone(), requires_grad=False)
        else:
            scale, zero_point = qparams
            self.axis = fq.ch_axis % weight.dim() if fq.is_per_channel else None
            shape = [1] * weight.dim()
            if self.axis is not None:
                shape[self.axis] = -1
            dtype = _int_type(fq.quant_min, fq.quant_max, f"{name}.weight_fake_quant")
            fake = fq(weight)  # exactly the fake-quantized weight of the QAT forward: (q - zp) * scale
            q = torch.round(fake / scale.reshape(shape)) + zero_point.reshape(shape)
            bias = eval_bias(qat, bias)  # the eval-mode bias: on the int32 grid once freeze() set the input scale
            self.register_buffer("weight_int", q.to(dtype))
            self.register_buffer("weight_scale", scale)
            self.register_buffer("weight_zero_point", zero_point.to(dtype))
        self.bias = None if bias is None else nn.Parameter(bias.detach().float().clone(), requires_grad=False)
        out = qat._modules.get("activation_post_process")
        self.activation_post_process = QuantDequant.from_fake_quant(out, f"{name}.activation_post_process") \
            if out is not None else nn.Identity()
        apq = self.activation_post_process
        if isinstance(apq, QuantDequant) and apq.axis is not None and self.activation is None and self.weight is None:
            self._fold_output_scales(apq)

    def _fold_output_scales(self, apq):
        """One output scale s_c per channel (axis 1, zero point 0): round(y_c / s_c) is computed as round(y'_c) with
        y' = conv(x, w / s_c) + b / s_c, i.e. weight scales and bias divided by s_c and an output quantizer with
        scale 1 followed by a per-channel multiplication. This is the arithmetic of shift hardware (one
        requantizing shift per output channel) and the form onnxruntime's int8 conv kernel takes (it needs one
        output scale). With power-of-two scales every division is exact, so the numbers are those of the fake-quant
        model."""
        if apq.axis % 4 != 1 or bool(apq.zero_point.any()):
            raise UserError("a per-channel output quantizer needs the channel axis 1 and zero points 0 to be exported")
        s_out = apq.scale.reshape(-1)
        n = self.weight_int.shape[0]
        self.weight_scale = (self.weight_scale.reshape(-1).expand(n) / s_out).contiguous()
        self.weight_zero_point = self.weight_zero_point.reshape(-1).expand(n).contiguous()
        self.axis = 0
        self.bias = nn.Parameter((self.bias.data if self.bias is not None else torch.zeros(n)) / s_out,
                                 requires_grad=False)
        self.activation_post_process = PerChannelOutput(s_out, apq.quant_min, apq.quant_max)

    def dequantized_weight(self):
        if self.weight is not None:
            return self.weight
        if torch.onnx.is_in_onnx_export():
            return _Dequantize.apply(self.weight_int, self.weight_scale, self.weight_zero_point, self.axis)
        return _dequantize(self.weight_int, self.weight_scale, self.weight_zero_point, self.axis)

    def forward(self, x):
        y = F.conv2d(x, self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation, self.groups)
        if self.activation is not None:
            y = self.activation(y)
        return self.activation_post_process(y)

    def extra_repr(self):
        w = "float" if self.weight is not None else f"{self.weight_int.dtype} axis={self.axis}"
        return f"weight={w}, activation={self.activation_name}, stride={self.stride}, padding={self.padding}"


def qdq_model(model: nn.Module) -> nn.Module:
    """A copy of fake-quant `model` with every QAT conv and fake quantizer in export form (QDQConv2d, QuantDequant).

    `model` itself is switched to eval mode with its observers off (scales frozen; lazily computed ones evaluated).
    Raises UserError for what QDQ cannot hold (ranges wider than 8 bits, uncalibrated scales)."""
    freeze(model).eval()
    m = deepcopy(model)

    def swap(name, new):
        parent, _, child = name.rpartition(".")
        setattr(m.get_submodule(parent) if parent else m, child, new)

    with torch.no_grad():
        for name, mod in list(m.named_modules()):
            if isinstance(mod, (QATConv2d, ConvBn2d)):
                swap(name, QDQConv2d(mod, name))
        for name, mod in list(m.named_modules()):
            if isinstance(mod, FakeQuantizeBase):
                swap(name, QuantDequant.from_fake_quant(mod, name))
    return m.eval()


def model_rounding(model) -> str:
    """How the enabled fake quantizers of `model` round ties: "half_even", "half_up" or "mixed"."""
    rules = {getattr(m, "rounding", "half_even") for m in model.modules() if _fake_quant_enabled(m)}
    return rules.pop() if len(rules) == 1 else "mixed" if rules else "half_even"


def model_pow2(model) -> bool:
    """True when every enabled fake quantizer of `model` keeps power-of-two scales."""
    qs = [m for m in model.modules() if _fake_quant_enabled(m)]
    return bool(qs) and all(bool(getattr(m, "pow2", False)) for m in qs)


@torch.no_grad()
def expected_qdq_counts(export_model, im) -> dict:
    """The QDQ nodes the export of `export_model` must hold, counted on a forward pass: one QuantizeLinear and one
    DequantizeLinear per activation quantizer applied, one DequantizeLinear per integer weight."""
    counts = {"activations": 0, "weights": 0}

    def act(*_):
        counts["activations"] += 1

    def weight(mod, *_):
        counts["weights"] += int(mod.weight is None)

    hooks = [m.register_forward_hook(act) for m in export_model.modules()
             if isinstance(m, (QuantDequant, PerChannelOutput))]
    hooks += [m.register_forward_hook(weight) for m in export_model.modules() if isinstance(m, QDQConv2d)]
    try:
        export_model(im)
    finally:
        for h in hooks:
            h.remove()
    return {"quantize": counts["activations"], "dequantize": counts["activations"] + counts["weights"],
            "weights": counts["weights"]}


def own_initializers(proto) -> int:
    """Give every node its own initializers. The exporter shares equal-valued initializers (every zero point of a
    type, equal scales, equal biases) through Identity nodes; this copies the initializer under the Identity's output
    name and drops the node, so each QuantizeLinear/DequantizeLinear reads constants named after its own quantizer,
    as onnxruntime's QDQ fusion and hardware toolchains expect. Returns the number of Identity nodes removed."""
    inits = {i.name: i for i in proto.graph.initializer}
    graph_outputs = {o.name for o in proto.graph.output}
    keep, removed = [], 0
    for n in proto.graph.node:
        if n.op_type == "Identity" and n.input[0] in inits and n.output[0] not in graph_outputs:
            copy = proto.graph.initializer.add()
            copy.CopyFrom(inits[n.input[0]])
            copy.name = n.output[0]
            removed += 1
        else:
            keep.append(n)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    return removed


def qdq_structure(proto) -> dict:
    """The QDQ content of an ONNX graph, read from the file.

    Returns {"quantize": n QuantizeLinear, "dequantize": n DequantizeLinear, "activation_dq": n DequantizeLinear of a
    computed tensor, "weight_dq": [{"name", "axis" (None per tensor), "dtype", "zero_points_all_zero", "channels"}]
    for each DequantizeLinear of an integer initializer, "scales": {scale name: float32 array}}."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    aliases = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}

    def value(name):
        while name in aliases:
            name = aliases[name]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(next(a for a in consts[name].attribute if a.name == "value").t)
        return None

    out = {"quantize": 0, "dequantize": 0, "activation_dq": 0, "weight_dq": [], "scales": {}}
    for n in proto.graph.node:
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        out["quantize" if n.op_type == "QuantizeLinear" else "dequantize"] += 1
        scale = value(n.input[1])
        if scale is None:
            raise ValueError(f"proto: the scale {n.input[1]!r} of {n.name} is computed, not a constant")
        out["scales"][n.input[1]] = np.asarray(scale, dtype=np.float32)
        if n.op_type == "QuantizeLinear":
            continue
        q = value(n.input[0])
        if q is None or q.dtype not in (np.int8, np.uint8):
            out["activation_dq"] += 1
            continue
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)  # ONNX default axis 1 (per-axis only)
        zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(1, q.dtype)
        out["weight_dq"].append({"name": n.input[0], "axis": axis if np.ndim(scale) else None, "dtype": str(q.dtype),
                                 "zero_points_all_zero": bool((np.asarray(zp) == 0).all()), "channels": q.shape[0]})
    return out


def check_qdq_file(proto, expected: dict, pow2: bool, path, simplified=False) -> dict:
    """The written graph holds the model's quantizers: counts of QuantizeLinear/DequantizeLinear as `expected`
    (expected_qdq_counts), and in pow2 mode every scale an exact power of two. UserError otherwise."""
    s = qdq_structure(proto)
    got = {"quantize": s["quantize"], "dequantize": s["dequantize"], "weights": len(s["weight_dq"])}
    if got != expected:
        hint = "; --simplify folded quantization nodes, drop it" if simplified else ""
        raise UserError(f"{path}: the QDQ graph holds {got['quantize']} QuantizeLinear, {got['dequantize']} "
                        f"DequantizeLinear ({got['weights']} on integer weights) where the model applies "
                        f"{expected['quantize']}, {expected['dequantize']} ({expected['weights']}){hint}")
    if pow2:
        bad = [k for k, v in s["scales"].items() if not bool(is_pow2(torch.from_numpy(np.atleast_1d(v))).all())]
        if bad:
            raise UserError(f"{path}: scale {bad[0]} = {s['scales'][bad[0]].ravel()[:4].tolist()} is not an exact "
                            f"power of two although the model is pow2 ({len(bad)} such scales)")
    return s


# --- verification of QDQ files ------------------------------------------------------------------------------------
# The gate is the raw Detect head outputs (the 1x1 convs' outputs before the sigmoid). A model whose every scale is a
# power of two must be reproduced exactly (0 differing raw outputs, see above). Otherwise each element of
# onnxruntime's result must be within one step of the output quantizer of that Detect conv (onnxruntime's int8
# kernels quantize the float bias to int32 and requantize in their own order, and folded BN rounds differently, so a
# value on a rounding boundary lands one step apart; a wrong scale, weight or missing node is off by many steps). A
# Detect conv without an output quantizer (recipe mode float / weight_only) gets the bound one step of its input
# quantizer implies: step_in * sum |w| per output channel.
# The decoded output (xywh in pixels, objectness and class scores) is checked against the bound that one raw step
# implies through the decoding: sigmoid' <= 1/4, so scores move by <= step/4; xy = (2 sigmoid - 0.5 + grid) * stride
# by <= stride * step / 2 pixels; wh = (2 sigmoid)^2 * anchor by <= 8 * max(sigmoid^2 (1 - sigmoid)) * anchor * step
# = 32/27 * anchor * step pixels; plus float32 rounding (FLOAT_RTOL of the largest value of that kind).

@torch.no_grad()
def qdq_reference(model, im) -> dict:
    """The fake-quant model's outputs on `im` and the one-step tolerances described above.

    Returns {"decoded": array (bs, N, no), "raw": [array (bs, na, ny, nx, no) per level], "raw_tol": [array
    broadcastable to raw], "decoded_tol": array like decoded, "steps": [Detect output step, (smallest, largest)
    step of a per-channel output quantizer, or None per level]}."""
    detect = model.model[-1]
    produced, head_in = {}, {}

    def record(mod, _, out):
        produced[id(out)] = (out, mod)

    def head_input(i):
        def pre(_, args):
            head_in[i] = args[0]
        return pre

    exact = model_pow2(model)
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    hooks += [conv.register_forward_pre_hook(head_input(i)) for i, conv in enumerate(detect.m)]
    export_flag = detect.export
    detect.export = False
    try:
        decoded, raw = model(im)
    finally:
        detect.export = export_flag
        for h in hooks:
            h.remove()
    raw = [r.float().cpu().numpy() for r in raw]
    decoded = decoded.float().cpu().numpy()
    na, no = detect.na, detect.no
    raw_tol, steps, dec_tol = [], [], []
    for i, conv in enumerate(detect.m):
        out_q = conv._modules.get("activation_post_process")
        if _fake_quant_enabled(out_q):
            scale = frozen_qparams(out_q)[0].float().cpu().numpy()
            tol = np.broadcast_to(scale.reshape(-1), (na * no,)).reshape(na, no) * (1 + STEP_SLACK)
            step = float(scale) if scale.ndim == 0 else (float(scale.min()), float(scale.max()))
        else:
            step = None
            src = produced.get(id(head_in[i]))
            fq = getattr(conv, "weight_fake_quant", None)
            w = fq(conv.weight) if _fake_quant_enabled(fq) else conv.weight
            if src is not None and _fake_quant_enabled(src[1]) and not src[1].is_per_channel:
                l1 = w.detach().abs().sum(dim=(1, 2, 3)).float().cpu().numpy()
                tol = (float(frozen_qparams(src[1])[0]) * l1).reshape(na, no) + FLOAT_RTOL * np.abs(raw[i]).max()
            else:  # nothing quantized right before the head: the float promise
                tol = np.full((na, no), FLOAT_RTOL * np.abs(raw[i]).max())
        steps.append(step)
        raw_tol.append(tol.reshape(1, na, 1, 1, no))
        lipschitz = np.full((na, no), 0.25)
        lipschitz[:, :2] = float(detect.stride[i]) / 2
        lipschitz[:, 2:4] = 32 / 27 * (detect.anchors[i] * detect.stride[i]).float().cpu().numpy()
        ny, nx = raw[i].shape[2:4]
        dec_tol.append(np.broadcast_to((lipschitz * tol)[:, None, :], (na, ny * nx, no)).reshape(1, na * ny * nx, no))
    dec_tol = np.concatenate(dec_tol, 1)
    slack = np.empty(no)
    slack[:4] = FLOAT_RTOL * np.abs(decoded[..., :4]).max()
    slack[4:] = FLOAT_RTOL
    return {"decoded": decoded, "raw": raw, "raw_tol": raw_tol, "decoded_tol": dec_tol + slack, "steps": steps,
            "exact": exact}


def _within(ref, out, tol, exact=False) -> dict:
    """How far `out` is from `ref` relative to `tol`; ok: within tol (exact: identical)."""
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    ok = (diff == 0).all() if exact else (diff <= tol).all()
    return {"max_abs_diff": float(diff.max()), "share_differ": float((diff > 0).mean()),
            "share_over": float((diff > tol).mean()), "worst_ratio": float((diff / tol).max()),
            "ok": bool(np.isfinite(out).all() and ok)}


def _detect_raw_outputs(proto) -> list:
    """Names of the tensors Detect feeds to its sigmoids: the inputs of Sigmoid nodes fed by a Transpose (the
    (bs, na, ny, nx, no) permute; through a Cast), in graph order. SiLU's sigmoids are fed by convs."""
    producer = {o: n for n in proto.graph.node for o in n.output}

    def source_op(name):
        node = producer.get(name)
        while node is not None and node.op_type in ("Cast", "Identity"):  # p.float() is a Cast to float
            node = producer.get(node.input[0])
        return None if node is None else node.op_type

    return [n.input[0] for n in proto.graph.node if n.op_type == "Sigmoid" and source_op(n.input[0]) == "Transpose"]


def _describe_steps(steps):
    def one(s):
        if s is None:
            return "float"
        if isinstance(s, tuple):  # one step per channel: (smallest, largest)
            return f"{one(s[0])}..{one(s[1])} per channel"
        k = np.log2(s)
        return f"2^{int(k)}" if k == int(k) else f"{s:.3g}"
    return ", ".join(one(s) for s in steps)


def _run_qdq_file(onnx_path, probe, names, x, as_written):
    """onnxruntime's decoded output of the file itself and the raw head outputs of `probe` (the same graph with those
    tensors as extra outputs; a second session, so the first is exactly what users run)."""
    session = onnxruntime_session(onnx_path, as_written=as_written)
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    probe_session = onnxruntime_session(probe, as_written=as_written)
    raw = probe_session.run(names, {probe_session.get_inputs()[0].name: x}) if names else []
    return out, raw


@torch.no_grad()
def verify_onnx_qdq(model, onnx_path, im, check=True, prefix=colorstr("ONNX:")) -> dict:
    """Run a QDQ file in onnxruntime (CPU) on `im` and compare it with the PyTorch fake-quant `model` (see the comment
    above): raw head outputs within one output step, decoded output within the bound one step implies.

    Two runs: the graph as written (onnxruntime without the rewrites that change QDQ numbers, as DetectMultiBackend
    runs it: models.backend.ORT_QDQ_REWRITES) is the check, a failure raises UserError with check=True; onnxruntime
    with its defaults (int8 kernels) is reported, with a warning when it is off by more than one step.

    Returns {"raw": [_within per level], "decoded": _within, "ok", "output" (decoded), "raw_output" (per level),
    "raw_share_differ", "int8_kernels": the same keys for the default run, "steps", "shape"}."""
    import onnx
    import onnxruntime as ort

    ref = qdq_reference(model, im)
    x = im.detach().float().cpu().numpy()
    proto = onnx.load(str(onnx_path))
    names = _detect_raw_outputs(proto)
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = proto.SerializeToString()
    n_raw = sum(r.size for r in ref["raw"])
    runs = {}
    for as_written in (True, False):
        try:
            out, raw_out = _run_qdq_file(str(onnx_path), probe, names, x, as_written)
        except Exception as e:  # onnxruntime's own exception types
            raise UserError(f"{onnx_path}: onnxruntime {ort.__version__} cannot run the exported file "
                            f"({str(e).strip().splitlines()[0][:200]})") from None
        by_shape = {r.shape: r for r in raw_out}
        if len(raw_out) != len(ref["raw"]) or any(r.shape not in by_shape for r in ref["raw"]):
            raise UserError(f"{onnx_path}: cannot find Detect's {len(ref['raw'])} raw outputs (Sigmoid inputs) in the "
                            f"graph (found shapes {[r.shape for r in raw_out]})")
        # exact where a power-of-two model quantizes the head's output (a float Detect conv is float arithmetic);
        # onnxruntime's int8 kernels are reported, never required to be exact
        exact = [ref["exact"] and as_written and step is not None for step in ref["steps"]]
        raw = [_within(r, by_shape[r.shape], t, e) for r, t, e in zip(ref["raw"], ref["raw_tol"], exact)]
        decoded = _within(ref["decoded"], out.astype(np.float32), ref["decoded_tol"])
        runs[as_written] = {
            "raw": raw, "decoded": decoded, "output": out, "raw_output": [by_shape[r.shape] for r in ref["raw"]],
            "raw_share_differ": sum(w["share_differ"] * r.size for w, r in zip(raw, ref["raw"])) / n_raw,
            "raw_worst": max(w["worst_ratio"] for w in raw), "ok": all(w["ok"] for w in raw) and decoded["ok"]}
    result = {**runs[True], "int8_kernels": runs[False], "steps": ref["steps"], "shape": tuple(im.shape)}
    for r, how in ((runs[True], "as written"), (runs[False], "with its int8 rewrites")):
        exact = ref["exact"] and r is runs[True] and None not in ref["steps"]
        need = "exact (power-of-two scales)" if exact else "within one output step"
        LOGGER.info(f"{prefix} onnxruntime ({how}) vs PyTorch fake-quant on {tuple(im.shape)}: raw head outputs "
                    f"{100 * r['raw_share_differ']:.2f}% of {n_raw} differ [required: {need}], worst "
                    f"{r['raw_worst']:.2f} of one output step (steps {_describe_steps(ref['steps'])}); decoded output "
                    f"max |diff| {r['decoded']['max_abs_diff']:.3g}, worst {r['decoded']['worst_ratio']:.2f} of the "
                    f"bound one step implies")
    if not runs[False]["ok"] and runs[True]["ok"]:
        LOGGER.warning(f"WARNING: {onnx_path}: onnxruntime's int8 kernels are off by more than one step "
                       f"({max(runs[False]['raw_worst'], runs[False]['decoded']['worst_ratio']):.3g}x the bound) while "
                       f"the graph as written agrees; they round differently from QuantizeLinear "
                       f"(models/backend.py ORT_QDQ_REWRITES)")
    if check and not result["ok"]:
        worst = max(result["raw_worst"], result["decoded"]["worst_ratio"])
        what = "raw head outputs" if not all(w["ok"] for w in result["raw"]) else "decoded outputs"
        if ref["exact"] and what == "raw head outputs":
            bound = (f"{100 * result['raw_share_differ']:.2f}% of them differ (up to {worst:.3g} output steps) where "
                     f"a power-of-two model must be reproduced exactly")
        else:
            bound = f"differ by up to {worst:.3g}x the one-quantization-step tolerance"
        raise UserError(f"{onnx_path}: the QDQ export disagrees with the PyTorch fake-quant model: {what} {bound}; the "
                        f"file is left for inspection, do not deploy it")
    return result


@torch.no_grad()
def verify_torchscript_qdq(model, ts_path, im, check=True, prefix=colorstr("TorchScript:")) -> dict:
    """The traced export form of a QAT model vs the PyTorch fake-quant model: the decoded output within the bound one
    output step implies (the trace has one output, so the raw head outputs are not compared)."""
    ref = qdq_reference(model, im)
    with _quiet_tracing():
        ts = torch.jit.load(str(ts_path), map_location=im.device).eval()
    out = _first(ts(im)).float().cpu().numpy()
    r = _within(ref["decoded"], out, ref["decoded_tol"])
    r.update(shape=tuple(im.shape), output=out)
    LOGGER.info(f"{prefix} torch.jit vs PyTorch fake-quant on {tuple(im.shape)}: {100 * r['share_differ']:.1f}% of "
                f"outputs differ, max |diff| {r['max_abs_diff']:.3g}, worst {r['worst_ratio']:.2f} of the bound one "
                f"output step implies")
    if check and not r["ok"]:
        raise UserError(f"{ts_path}: the TorchScript export disagrees with the PyTorch fake-quant model (up to "
                        f"{r['worst_ratio']:.3g}x the one-quantization-step bound); do not deploy it")
    return r


@torch.no_grad()
def export_integer(model, im, file, checks) -> Path:
    """The integer model of a power-of-two QAT model, as hardware teams take it: bst.convert of the model, its
    integer reference recorded op by op on `im` and saved as `<stem>_integer_model/` (model.json: ops, tensors'
    exponents and zero points, input quantization; tensors.npz: int8 weights, int32 biases, per-channel shifts;
    example.npz; run_integer.py, a runner needing only numpy; format in bst/torch/ao/quantization/integer_runner.py).

    Verified on every batch of `checks` and on a second input size: the raw head outputs of the PyTorch model,
    of bst's integer reference and of the numpy runner must be identical (0 differing integers)."""
    if not (is_quantized(model) and model_pow2(model)):
        raise UserError(f"{file}: --include integer needs a QAT checkpoint with power-of-two scales (train.py --qat "
                        f"--pow2-scale); requantization by a shift needs them")
    converted = convert_yolo(model, im[:1])
    graph, outs = record(lambda: integer_head(converted, im))
    f = Path(file).with_name(Path(file).stem + FORMATS["integer"])
    if f.exists():
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    graph.save(f, im, outs)
    runner = IntegerModel(f)
    detect = model.model[-1]
    stride = int(detect.stride.max())
    second = _second_shape(im.shape, stride)
    checks = list(checks) + ([] if any(tuple(x.shape) == second for x in checks) else
                             [sample_batch(second, seed=2, device=im.device)])
    differ = total = 0
    for x in checks:
        export_flag, detect.export = detect.export, False
        try:
            raw = model(x)[1]
        finally:
            detect.export = export_flag
        ints = integer_head(converted, x)
        ran = runner.run(x.float().cpu().numpy())
        for r, q, name in zip(raw, ints, graph.outputs):
            bs, _, ny, nx = q.int_repr.shape
            ref = q.dequantize().view(bs, detect.na, detect.no, ny, nx).permute(0, 1, 3, 4, 2)
            differ += int((ref.cpu() != r.float().cpu()).sum()) + int((torch.from_numpy(ran[name]) != q.int_repr.cpu())
                                                                     .sum())
            total += r.numel()
    shapes = ", ".join(f"{tuple(x.shape)}" for x in checks)
    ops = {}
    for n in graph.nodes:
        ops[n["op"]] = ops.get(n["op"], 0) + 1
    shifts = np.concatenate([graph.arrays[n["shift"]] for n in graph.nodes if n["op"] == "conv2d"])
    prefix = colorstr("Integer:")
    LOGGER.info(f"{prefix} {len(graph.nodes)} ops ({', '.join(f'{v} {k}' for k, v in ops.items())}), conv shifts "
                f"{int(shifts.min())}..{int(shifts.max())}; raw head outputs: {differ} of {total} differ between the "
                f"PyTorch model, bst's integer reference and the numpy runner [required: 0] at {shapes}")
    if differ:
        raise UserError(f"{f}: the integer model differs from the PyTorch model on {differ} of {total} raw outputs")
    return f


def _second_shape(shape, stride):
    """Another input shape to prove a --dynamic file: one more image, one stride taller, two strides wider."""
    bs, c, h, w = shape
    return bs + 1, c, h + stride, w + 2 * stride


def run(data=None, weights=ROOT / "yolov5s.pt", imgsz=(640, 640), batch_size=1, device="cpu",
        include=("torchscript", "onnx"), half=False, inplace=False, optimize=False, dynamic=False, simplify=False,
        opset=DEFAULT_OPSET, verbose=False, **upstream) -> list:
    """Export one checkpoint to each format in `include`, verify each file, return the written paths. Upstream's
    options for other formats (keras, int8, workspace, nms, ...) are accepted by name and refused in one line unless
    left at their defaults."""
    unknown = sorted(set(upstream) - set(UNSUPPORTED_OPTIONS))
    if unknown:
        raise UserError(f"export.run(): unknown option(s) {', '.join(unknown)}")
    refuse_unsupported(upstream)
    t0 = time.time()
    include = [x.lower() for x in ([include] if isinstance(include, str) else include)]
    bad = [x for x in include if x not in FORMATS]
    if bad:
        raise UserError(f"--include {' '.join(bad)}: unsupported format; choose from {', '.join(FORMATS)}")
    if not include:
        raise UserError(f"--include: name at least one format ({', '.join(FORMATS)})")
    if "onnx" in include:
        if opset < MIN_OPSET:
            raise UserError(f"--opset {opset}: too low, per-channel QuantizeLinear/DequantizeLinear (the axis "
                            f"attribute) needs opset >= {MIN_OPSET}; use --opset {MIN_OPSET} or later "
                            f"(default {DEFAULT_OPSET})")
        if opset > _max_opset():
            raise UserError(f"--opset {opset}: torch {torch.__version__} writes at most opset {_max_opset()}; "
                            f"use --opset {DEFAULT_OPSET}")
        if simplify and _simplifier() is None:
            raise UserError("--simplify: needs onnxslim or onnxsim, neither is installed; pip install onnxslim "
                            "or drop --simplify")
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be >= 1")
    w = str(weights[0] if isinstance(weights, (list, tuple)) else weights)
    if Path(w).suffix.lower() != ".pt":
        raise UserError(f"{w}: export takes a PyTorch checkpoint (.pt), got {Path(w).suffix or 'no suffix'}")
    device = select_device(device)
    if half and dynamic and "onnx" in include:
        raise UserError("--half with --dynamic: the dynamic ONNX graph builds its anchor grids with a float16 Range, "
                        "which onnxruntime rejects; drop one of them")
    if optimize and "torchscript" not in include:
        LOGGER.warning("WARNING: --optimize applies to TorchScript only, which --include does not name")
    if optimize and "torchscript" in include:
        if device.type != "cpu":
            raise UserError("--optimize: mobile-optimized TorchScript is built on the CPU, use --device cpu")
        if not importlib.import_module("torch.backends.xnnpack").enabled:  # a submodule `import torch` skips
            raise UserError(f"--optimize: this torch build ({torch.__version__}) has no XNNPACK, which "
                            f"optimize_for_mobile needs; drop --optimize or use a torch build with XNNPACK")

    imgsz = list(imgsz) if isinstance(imgsz, (list, tuple)) else [imgsz]
    if len(imgsz) not in (1, 2) or min(imgsz) < 1:
        raise UserError(f"--imgsz {' '.join(map(str, imgsz))}: give one size or two (height width), each >= 1")
    if not os.access(Path(w).resolve().parent, os.W_OK) and Path(w).is_file():
        raise UserError(f"{w}: the exported files go beside the weights, but {Path(w).resolve().parent} is not "
                        f"writable; copy the checkpoint to a folder you can write to")

    model = load_pytorch_model(w, device=device, inplace=True, fuse=True)
    quantized = is_quantized(model)
    metadata = {**model_metadata(model), "quantized": quantized}
    if half and quantized:
        raise UserError(f"{w}: --half would cast the quantizers' scales of this QAT model to float16; drop --half")
    rounding = model_rounding(model)
    if rounding != "half_even" and any(f in include for f in ("onnx", "torchscript")):
        raise UserError(f"{w}: the model rounds ties {rounding.replace('_', ' ')} (train.py --rounding); ONNX "
                        f"QuantizeLinear and torch's quantization ops round half to even, so neither ONNX nor "
                        f"TorchScript can hold it exactly; export it with --include integer")
    gs = metadata["stride"]
    imgsz = check_img_size(imgsz * 2 if len(imgsz) == 1 else imgsz, s=gs)
    prepare_for_export(model, inplace=inplace, dynamic=dynamic)
    export_model = model  # what is traced: the model itself, or the export form of a fake-quant model
    if quantized:
        metadata["pow2"] = model_pow2(model)
        export_model = prepare_for_export(qdq_model(model), inplace=inplace, dynamic=dynamic)
    dtype = torch.float16 if half else torch.float32
    im = sample_batch((batch_size, 3, *imgsz), data=data, device=device, dtype=dtype)
    if half:
        model.half()
    with torch.no_grad():
        for _ in range(2):  # dry runs build the Detect grids at this shape
            y = _first(model(im))
            _first(export_model(im))
    LOGGER.info(f"\n{colorstr('PyTorch:')} starting from {w} with input shape {tuple(im.shape)} output shape "
                f"{tuple(y.shape)} ({file_size_mb(w):.1f} MB)"
                + (f", QAT model (pow2={int(metadata['pow2'])}): exported as int8 QDQ" if quantized else ""))

    rtol = HALF_RTOL if half else FLOAT_RTOL
    checks = [im]
    if dynamic:
        checks.append(sample_batch(_second_shape(im.shape, gs), data=data, seed=1, device=device, dtype=dtype))
    written = []
    for fmt in include:
        t = time.time()
        if fmt == "torchscript":
            f = export_torchscript(export_model, im, w, metadata, optimize=optimize, dynamic=dynamic)
            for x in checks:
                if quantized:
                    verify_torchscript_qdq(model, f, x)
                else:
                    verify_torchscript(model, f, x, rtol=rtol)
            prefix = colorstr("TorchScript:")
        elif fmt == "integer":
            f = export_integer(model, im, w, checks)
            prefix = colorstr("Integer:")
        else:
            f = export_onnx(export_model, im, w, metadata, opset=opset, dynamic=dynamic, simplify=simplify,
                            verbose=verbose)
            prefix = colorstr("ONNX:")
            if quantized:
                import onnx

                expected = expected_qdq_counts(export_model, im)
                s = check_qdq_file(onnx.load(str(f)), expected, metadata["pow2"], f, simplified=simplify)
                axes = sorted({str(d["axis"]) for d in s["weight_dq"]})
                n_scales = sum(v.size for v in s["scales"].values())
                LOGGER.info(f"{prefix} QDQ graph: {s['quantize']} QuantizeLinear, {s['dequantize']} DequantizeLinear "
                            f"({len(s['weight_dq'])} on int8 weights, axis {'/'.join(axes)}), {n_scales} scales"
                            + (", all exact powers of two" if metadata["pow2"] else ""))
            for x in checks:
                if quantized:
                    verify_onnx_qdq(model, f, x)
                else:
                    verify_onnx(model, f, x, rtol=rtol)
        LOGGER.info(f"{prefix} export success {time.time() - t:.1f}s, saved as {f} ({file_size_mb(f):.1f} MB)")
        written.append(str(f))

    runnable = [f for f in written if not f.endswith(FORMATS["integer"])]  # what detect.py / val.py load
    if written:
        h, w_ = imgsz
        size = f"{h}" if h == w_ else f"{h} {w_}"
        LOGGER.info(f"\nExport complete ({time.time() - t0:.1f}s)"
                    f"\nResults saved to {colorstr('bold', Path(w).resolve().parent)}")
    if runnable:
        LOGGER.info(f"Detect:          python detect.py --weights {runnable[-1]} --imgsz {size}"
                    f"\nValidate:        python val.py --weights {runnable[-1]} --imgsz {h}"
                    + ("" if h == w_ or dynamic else "   (val needs a square export, or --dynamic)"))
    for f in written:
        if f.endswith(FORMATS["integer"]):
            LOGGER.info(f"Integer model:   python {Path(f) / 'run_integer.py'} {f} --check   (numpy only)")
    return written


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description="Export a YOLOv5 checkpoint to TorchScript and ONNX")
    parser.add_argument("--data", type=str, default=None,
                        help="dataset.yaml whose val images the exports are checked on (default: seeded noise)")
    parser.add_argument("--weights", nargs="+", type=str, default=ROOT / "yolov5s.pt", help="model.pt path(s)")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640, 640],
                        help="image (h, w)")
    parser.add_argument("--batch-size", type=int, default=1, help="batch size")
    parser.add_argument("--device", default="cpu", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 half-precision export")
    parser.add_argument("--inplace", action="store_true", help="set YOLOv5 Detect() inplace=True")
    parser.add_argument("--optimize", action="store_true", help="TorchScript: optimize for mobile")
    parser.add_argument("--dynamic", action="store_true", help="ONNX: dynamic batch and image size")
    parser.add_argument("--simplify", action="store_true", help="ONNX: simplify with onnxslim or onnxsim")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET,
                        help=f"ONNX: opset version (>= {MIN_OPSET}, per-channel QDQ)")
    parser.add_argument("--verbose", action="store_true", help="ONNX: print the exported graph")
    parser.add_argument("--include", nargs="+", default=["torchscript", "onnx"],
                        help=f"formats to export: {', '.join(FORMATS)}")
    other = parser.add_argument_group("upstream's TensorFlow / TensorRT options (this export writes TorchScript and "
                                      "ONNX only; giving one stops with one line)")
    other.add_argument("--keras", action="store_true", help="TF: use Keras")
    other.add_argument("--int8", action="store_true", help="CoreML/TF INT8 quantization")
    other.add_argument("--workspace", type=int, default=4, help="TensorRT: workspace size (GB)")
    other.add_argument("--nms", action="store_true", help="TF: add NMS to model")
    other.add_argument("--agnostic-nms", action="store_true", help="TF: add agnostic NMS to model")
    other.add_argument("--topk-per-class", type=int, default=100, help="TF.js NMS: topk per class to keep")
    other.add_argument("--topk-all", type=int, default=100, help="TF.js NMS: topk for all classes to keep")
    other.add_argument("--iou-thres", type=float, default=0.45, help="TF.js NMS: IoU threshold")
    other.add_argument("--conf-thres", type=float, default=0.25, help="TF.js NMS: confidence threshold")
    opt = parser.parse_args(argv)
    print_args(vars(opt), "export")
    return opt


# upstream's defaults
UNSUPPORTED_OPTIONS = {"keras": False, "int8": False, "workspace": 4, "nms": False, "agnostic_nms": False,
                       "topk_per_class": 100, "topk_all": 100, "iou_thres": 0.45, "conf_thres": 0.25}


def refuse_unsupported(options: dict):
    """Upstream's options for formats this export does not write: one line when any differs from its default."""
    given = [f"--{k.replace('_', '-')}" for k, default in UNSUPPORTED_OPTIONS.items()
             if options.get(k, default) != default]
    if given:
        hint = ("; for an int8 model train with --qat (or calibrate with val.py --ptq) and export that checkpoint to "
                "ONNX" if "--int8" in given else "")
        raise UserError(f"{', '.join(given)}: options of upstream's CoreML/TensorFlow/TensorRT exports; this export "
                        f"writes {', '.join(FORMATS)} only (--include){hint}")


def main(opt):
    refuse_unsupported(vars(opt))
    if opt.data:
        opt.data = check_file(opt.data)
    weights = opt.weights if isinstance(opt.weights, list) else [opt.weights]
    written = []
    for w in weights:
        written += run(**{**vars(opt), "weights": w})
    return written


if __name__ == "__main__":
    run_cli(main, parse_opt())
