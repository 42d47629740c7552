"""Export a YOLOv5 checkpoint to TorchScript and ONNX, and prove each file computes what PyTorch computes.

Usage:
    python export.py --weights yolov5s.pt --include torchscript onnx
    python export.py --weights runs/train/exp/weights/best.pt --imgsz 320 --include onnx --dynamic
    python export.py --weights best.pt --data shapes.yaml      (check on real val images instead of noise)

Format        --include     file written beside the weights
TorchScript   torchscript   yolov5s.torchscript  (extra file config.txt: json {shape, stride, names})
ONNX          onnx          yolov5s.onnx         (metadata_props: stride, names, quantized[, pow2])
OpenVINO      openvino      yolov5s_openvino_model/  (yolov5s.xml/.bin converted from the ONNX file, which is written
                                                  too; yolov5s.yaml: stride, names, quantized, pow2, shape, dynamic)
Integer       integer       best_integer_model/  (QAT, power-of-two scales: the integer network as data, with a
                                                  numpy-only runner; see `export_integer`)

A QAT checkpoint (train.py --qat: a fake-quant model) is detected and exported as int8 QDQ: the file is the ONNX form
of bst.convert's integer network (models.quant.convert_yolo; bst/torch/ao/nn/quantized/onnx_form.py):
QuantizeLinear/DequantizeLinear on every activation quantizer, int8 weight initializers with per-channel
DequantizeLinear (axis 0), int32 biases with DequantizeLinear at scale input_scale x weight_scale, BN folded, scales
copied exactly (powers of two stay powers of two); Detect's decoding stays float.

Every exported file is run on a seeded sample batch at the export shape and compared with the PyTorch model
(workflow/exporters/verify.py: `verify_onnx`, `verify_torchscript`; `verify_onnx_qdq`, `verify_torchscript_qdq` for
QAT models; the QDQ graph itself is checked by workflow/exporters/qdq_checks.py). A float export whose largest
difference exceeds 1e-4 of the largest output magnitude is an error; a QDQ export of a power-of-two model must
reproduce the raw Detect outputs of the fake-quant model exactly, one of linear scales within one step of their output
quantizer. Then use it with:
    python val.py --weights yolov5s.onnx --img 640          (onnxruntime; --dnn for OpenCV DNN)
    python detect.py --weights yolov5s.onnx
    python val.py --weights yolov5s_openvino_model --img 640   (OpenVINO)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
from torch.utils.mobile_optimizer import optimize_for_mobile

from bst.torch.ao.nn.quantized.onnx_form import own_initializers, qdq_counts
from bst.torch.ao.quantization import frozen_qparams
from bst.torch.ao.quantization.integer_graph import record
from bst.torch.ao.quantization.integer_runner import IntegerModel
from models.quant import convert_yolo, freeze, integer_head, is_quantized
from models.yolo import Detect
from utils.general import (
    LOGGER,
    UserError,
    check_file,
    check_img_size,
    colorstr,
    print_args,
    run_cli,
    yaml_save,
)
from utils.graph_forms import openvino_form
from utils.runtimes import OPENVINO_DIR
from utils.torch_utils import select_device
from workflow.backend import load_pytorch_model
from workflow.exporters.qdq_checks import check_qdq_file, describe_qdq
from workflow.exporters.verify import (
    FLOAT_RTOL,
    HALF_RTOL,
    first_output,
    quiet_tracing,
    sample_batch,
    verify_onnx,
    verify_onnx_qdq,
    verify_openvino,
    verify_torchscript,
    verify_torchscript_qdq,
)

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx", "openvino": OPENVINO_DIR,  # --include -> suffix
           "integer": "_integer_model"}
MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear take a per-channel `axis` from opset 13 on (QAT exports need it)
DEFAULT_OPSET = 17
INPUT_NAME, OUTPUT_NAME = "images", "output0"


def _max_opset() -> int:
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


def export_torchscript(model, im, file, metadata, optimize=False, dynamic=False,
                       prefix=colorstr("TorchScript:")) -> Path:
    """Trace the model at im's shape; config.txt (json shape, stride, names, dynamic) rides along as an extra file.

    The trace fixes h and w (the Detect grids are constants) unless the model was prepared with dynamic=True.

    optimize=True rewrites it for the mobile (lite) interpreter; torch.jit.load still reads the result.
    """
    LOGGER.info(f"\n{prefix} starting export with torch {torch.__version__}...")
    f = Path(file).with_suffix(FORMATS["torchscript"])
    with quiet_tracing():
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
    autograd function, which the exporter inlines into Mul/Round/Clip; LearnableFakeQuantize likewise). So `model`
    is then the converted model (bst.convert, models.quant.convert_yolo), whose modules write their ONNX form
    (bst.torch.ao.nn.quantized.onnx_form): QuantizeLinear -> DequantizeLinear per activation quantizer, int8 weight
    and int32 bias initializers -> DequantizeLinear (integers computed by PyTorch, not re-rounded by a runtime); each
    QDQ node then gets its own named constants (`own_initializers`).

    The file gets metadata_props stride, names and quantized ("1" for a fake-quant model), as DetectMultiBackend
    reads them; a quantized model also pow2 ("1" when every quantizer keeps power-of-two scales).
    """
    LOGGER.info(f"\n{prefix} starting export with onnx {onnx.__version__} opset {opset}...")
    f = Path(file).with_suffix(FORMATS["onnx"])
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}} \
        if dynamic else None
    try:
        with quiet_tracing():
            torch.onnx.export(model, (im,), str(f), verbose=verbose, opset_version=opset, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes, dynamo=False)
    except ValueError as e:  # what a converted module's ONNX form cannot hold (bst onnx_form)
        raise UserError(f"{file}: {e}") from None
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


def openvino_source(model, im, file, metadata, opset=DEFAULT_OPSET, dynamic=False) -> Path:
    """The ONNX file export_openvino converts: `model` exported as export_onnx does, with Detect's decode as one
    elementwise chain (Detect.decode_fused: the same numbers; OpenVINO runs it as one fused kernel where it ran
    decode's channel split and concatenation with its slow reference kernels), as <stem>_openvino_source.onnx."""
    detects = [m for m in model.modules() if isinstance(m, Detect)]
    for m in detects:
        m.fused_decode = True
    try:
        level = LOGGER.level
        LOGGER.setLevel("WARNING")  # export_onnx's own lines: the ONNX file is announced once
        return export_onnx(model, im, Path(file).with_name(f"{Path(file).stem}_openvino_source.pt"), metadata,
                           opset=opset, dynamic=dynamic)
    finally:
        LOGGER.setLevel(level)
        for m in detects:
            m.fused_decode = False


def export_openvino(onnx_file, metadata, shape, dynamic=False, half=False, source=None,
                    prefix=colorstr("OpenVINO:")) -> Path:
    """OpenVINO IR converted from the ONNX file export_onnx wrote (openvino.convert_model), in upstream's layout:
    <stem>_openvino_model/<stem>.xml and .bin, plus <stem>.yaml with stride and names and, for DetectMultiBackend,
    quantized, pow2, shape and dynamic. --half stores the weights as float16 (compress_to_fp16). A QDQ file's
    QuantizeLinear/DequantizeLinear pairs become FakeQuantize nodes with the same scales, which OpenVINO's CPU plugin
    runs as int8 convolutions. The graph converted is utils.graph_forms.openvino_form of `source` (default: the
    file; export.run gives `openvino_source`): the same numbers, arranged so that OpenVINO computes a QAT model's
    integers exactly (a Clip keeps the rounding of a convolution output that an Add reads, which OpenVINO's fused
    convolution + sum drops otherwise) and transposes the head outputs as integers."""
    import openvino as ov

    LOGGER.info(f"\n{prefix} starting export with openvino {ov.get_version().split('-')[0]}...")
    onnx_file = Path(onnx_file)
    source = onnx_file if source is None else Path(source)
    folder = onnx_file.with_name(onnx_file.stem + FORMATS["openvino"])
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        form = tmp / f"{onnx_file.stem}_openvino_form.onnx"  # the same numbers, arranged for OpenVINO (graph_forms)
        proto, counts = openvino_form(onnx.load(str(source)))
        onnx.save(proto, str(form))
        ov.save_model(ov.convert_model(str(form)), str(tmp / f"{onnx_file.stem}.xml"), compress_to_fp16=half)
        form.unlink()
    except Exception as e:  # OpenVINO's own exception types
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{onnx_file}: OpenVINO could not convert it ({str(e).strip().splitlines()[0][:200]})") \
            from None
    meta = {"stride": int(metadata["stride"]), "names": dict(metadata["names"]),
            "quantized": bool(metadata.get("quantized")), "pow2": bool(metadata.get("pow2")),
            "shape": list(shape), "dynamic": bool(dynamic)}
    yaml_save(tmp / f"{onnx_file.stem}.yaml", meta)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _openvino_verified(model, export_model, onnx_file, checks, metadata, opset, dynamic, half, rtol, prefix) -> Path:
    """export_openvino of `export_model` (through openvino_source) checked on every batch of `checks`."""
    source = openvino_source(export_model, checks[0], onnx_file, metadata, opset=opset, dynamic=dynamic)
    try:
        f = export_openvino(onnx_file, metadata, checks[0].shape, dynamic=dynamic, half=half, source=source,
                            prefix=prefix)
        for x in checks:
            verify_openvino(model, f, source, x, metadata.get("quantized"), rtol=rtol, prefix=prefix)
    finally:
        source.unlink()
    return f


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


@torch.no_grad()
def export_integer(model, im, file, checks) -> Path:
    """The integer model of a power-of-two QAT model, as hardware teams take it: bst.convert of the model, its
    integer reference recorded op by op on `im` and saved as `<stem>_integer_model/` (model.json: ops, tensors'
    exponents and zero points, input quantization; tensors.npz: int8 weights, int32 biases, per-channel shifts;
    example.npz; run_integer.py, a runner needing only numpy; format in bst/torch/ao/quantization/integer_runner.py).

    Verified on every batch of `checks` and on a second input size: the raw head outputs of the PyTorch model,
    of bst's integer reference and of the numpy runner must be identical (0 differing integers)."""
    if not (is_quantized(model) and model.qat_config.pow2):
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
    if "openvino" in include:
        if importlib.util.find_spec("openvino") is None:
            raise UserError("--include openvino: needs the openvino package; pip install openvino")
        if "onnx" not in include:  # OpenVINO converts the ONNX file, which is written too (as upstream)
            include.insert(include.index("openvino"), "onnx")
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
    rounding = model.qat_config.rounding if quantized else "half_even"
    if rounding != "half_even" and any(f in include for f in ("onnx", "torchscript")):
        raise UserError(f"{w}: the model rounds ties {rounding.replace('_', ' ')} (train.py --rounding); ONNX "
                        f"QuantizeLinear and torch's quantization ops round half to even, so neither ONNX nor "
                        f"TorchScript can hold it exactly; export it with --include integer")
    gs = metadata["stride"]
    imgsz = check_img_size(imgsz * 2 if len(imgsz) == 1 else imgsz, s=gs)
    prepare_for_export(model, inplace=inplace, dynamic=dynamic)
    export_model = model  # what is traced: the model itself, or bst.convert's integer network of a fake-quant model
    if quantized:
        metadata["pow2"] = model.qat_config.pow2
        if any(f in include for f in ("onnx", "torchscript")):
            export_model = prepare_for_export(converted_model(model, w), inplace=inplace, dynamic=dynamic)
    dtype = torch.float16 if half else torch.float32
    im = sample_batch((batch_size, 3, *imgsz), data=data, device=device, dtype=dtype)
    if half:
        model.half()
    with torch.no_grad():
        for _ in range(2):  # dry runs build the Detect grids at this shape
            y = first_output(model(im))
            first_output(export_model(im))
    LOGGER.info(f"\n{colorstr('PyTorch:')} starting from {w} with input shape {tuple(im.shape)} output shape "
                f"{tuple(y.shape)} ({file_size_mb(w):.1f} MB)"
                + (f", QAT model (pow2={int(metadata['pow2'])}): exported as int8 QDQ" if quantized else ""))

    rtol = HALF_RTOL if half else FLOAT_RTOL
    checks = [im]
    if dynamic:
        checks.append(sample_batch(_second_shape(im.shape, gs), data=data, seed=1, device=device, dtype=dtype))
    written, onnx_file = [], None  # include lists onnx before openvino, which converts it
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
        elif fmt == "openvino":
            prefix = colorstr("OpenVINO:")
            f = _openvino_verified(model, export_model, onnx_file, checks, metadata, opset, dynamic, half, rtol, prefix)
        else:
            f = onnx_file = export_onnx(export_model, im, w, metadata, opset=opset, dynamic=dynamic,
                                        simplify=simplify, verbose=verbose)
            prefix = colorstr("ONNX:")
            if quantized:
                expected = qdq_counts(export_model, (im,))
                s = check_qdq_file(onnx.load(str(f)), expected, metadata["pow2"], f, simplified=simplify)
                LOGGER.info(f"{prefix} {describe_qdq(s, metadata['pow2'])}")
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
