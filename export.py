"""Export a YOLOv5 checkpoint to TorchScript, ONNX, OpenVINO or an integer model, and prove each file computes what
PyTorch computes. This is the command line: it checks the options, loads the model, and runs for each --include
format its exporter (workflow/exporters/<format>.py) and then the one verification step every format shares
(workflow/exporters/verify.py: `verify_export`).

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
                                                  numpy-only runner; see workflow/exporters/integer.py)

A QAT checkpoint (train.py --qat: a fake-quant model) is detected and exported as int8 QDQ: the file is the ONNX form
of bst.convert's integer network (models.quant.convert_yolo; bst/torch/ao/nn/quantized/onnx_form.py):
QuantizeLinear/DequantizeLinear on every activation quantizer, int8 weight initializers with per-channel
DequantizeLinear (axis 0), int32 biases with DequantizeLinear at scale input_scale x weight_scale, BN folded, scales
copied exactly (powers of two stay powers of two); Detect's decoding stays float.

Every exported file is run on a seeded sample batch at the export shape and compared with the PyTorch model
(workflow/exporters/verify.py: `verify_onnx`, `verify_torchscript`; `verify_onnx_qdq`, `verify_torchscript_qdq` for
QAT models; `verify_openvino`; `verify_integer`; the QDQ graph itself is checked by workflow/exporters/qdq_checks.py).
A float export whose largest difference exceeds 1e-4 of the largest output magnitude is an error; a QDQ export of a
power-of-two model must reproduce the raw Detect outputs of the fake-quant model exactly, one of linear scales within
one step of their output quantizer; an integer model must reproduce them exactly. Then use it with:
    python val.py --weights yolov5s.onnx --img 640          (onnxruntime; --dnn for OpenCV DNN)
    python detect.py --weights yolov5s.onnx
    python val.py --weights yolov5s_openvino_model --img 640   (OpenVINO)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.quant import is_quantized
from utils.general import LOGGER, UserError, check_file, check_img_size, colorstr, print_args, run_cli
from utils.torch_utils import select_device
from workflow.backend import load_pytorch_model
from workflow.exporters.common import (
    DEFAULT_OPSET,
    FORMATS,
    MIN_OPSET,
    TITLES,
    ExportJob,
    converted_model,
    file_size_mb,
    max_opset,
    model_metadata,
    prepare_for_export,
    second_shape,
)
from workflow.exporters.integer import integer_folder
from workflow.exporters.onnx import onnx_file, simplifier
from workflow.exporters.openvino import openvino_folder
from workflow.exporters.torchscript import torchscript_file
from workflow.exporters.verify import FLOAT_RTOL, HALF_RTOL, first_output, sample_batch, verify_export

# --include -> the exporter that writes it; run() exports in --include's order, onnx before openvino (which converts it)
EXPORTERS = {"torchscript": torchscript_file, "onnx": onnx_file, "openvino": openvino_folder, "integer": integer_folder}


def check_options(weights, imgsz, batch_size, device, include, half, optimize, dynamic, simplify, opset, upstream):
    """Every check that needs no model, each refusing in one line (UserError). Returns (formats: --include with onnx
    added before openvino, the checkpoint path, the torch device, imgsz as a list)."""
    unknown = sorted(set(upstream) - set(UNSUPPORTED_OPTIONS))
    if unknown:
        raise UserError(f"export.run(): unknown option(s) {', '.join(unknown)}")
    refuse_unsupported(upstream)
    include = [x.lower() for x in ([include] if isinstance(include, str) else include)]
    bad = [x for x in include if x not in EXPORTERS]
    if bad:
        raise UserError(f"--include {' '.join(bad)}: unsupported format; choose from {', '.join(EXPORTERS)}")
    if not include:
        raise UserError(f"--include: name at least one format ({', '.join(EXPORTERS)})")
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
        if opset > max_opset():
            raise UserError(f"--opset {opset}: torch {torch.__version__} writes at most opset {max_opset()}; "
                            f"use --opset {DEFAULT_OPSET}")
        if simplify and simplifier() is None:
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
    return include, w, device, imgsz


def load_job(w, device, include, imgsz, data=None, batch_size=1, half=False, inplace=False, dynamic=False,
             **options) -> ExportJob:
    """The checkpoint loaded and prepared for export (a QAT model also converted, when ONNX or TorchScript traces
    it), its sample batches (a second shape with dynamic), after the checks that need the model. `options`: opset,
    simplify, optimize, verbose, handed to the exporters through the job."""
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
    checks = [im]
    if dynamic:
        checks.append(sample_batch(second_shape(im.shape, gs), data=data, seed=1, device=device, dtype=dtype))
    return ExportJob(model, export_model, w, im, checks, metadata, rtol=HALF_RTOL if half else FLOAT_RTOL,
                     dynamic=dynamic, half=half, **options)


def log_results(written, w, imgsz, dynamic, t0):
    """Where the files went and how to run them."""
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


def run(data=None, weights=ROOT / "yolov5s.pt", imgsz=(640, 640), batch_size=1, device="cpu",
        include=("torchscript", "onnx"), half=False, inplace=False, optimize=False, dynamic=False, simplify=False,
        opset=DEFAULT_OPSET, verbose=False, **upstream) -> list:
    """Export one checkpoint to each format in `include`, verify each file, return the written paths. Upstream's
    options for other formats (keras, int8, workspace, nms, ...) are accepted by name and refused in one line unless
    left at their defaults."""
    t0 = time.time()
    include, w, device, imgsz = check_options(weights, imgsz, batch_size, device, include, half, optimize, dynamic,
                                              simplify, opset, upstream)
    job = load_job(w, device, include, imgsz, data=data, batch_size=batch_size, half=half, inplace=inplace,
                   dynamic=dynamic, opset=opset, simplify=simplify, optimize=optimize, verbose=verbose)
    written = []
    for fmt in include:
        t = time.time()
        try:
            f = EXPORTERS[fmt](job)
            verify_export(fmt, job, f)
        finally:
            job.remove_temporary()
        LOGGER.info(f"{colorstr(TITLES[fmt])} export success {time.time() - t:.1f}s, saved as {f} "
                    f"({file_size_mb(f):.1f} MB)")
        written.append(str(f))
    log_results(written, w, tuple(job.im.shape[2:]), dynamic, t0)
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
