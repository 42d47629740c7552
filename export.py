"""Export a YOLOv5 checkpoint to TorchScript and ONNX, and prove each file computes what PyTorch computes.

Usage:
    python export.py --weights yolov5s.pt --include torchscript onnx
    python export.py --weights runs/train/exp/weights/best.pt --imgsz 320 --include onnx --dynamic
    python export.py --weights best.pt --data shapes.yaml      (check on real val images instead of noise)

Format        --include     file written beside the weights
TorchScript   torchscript   yolov5s.torchscript  (extra file config.txt: json {shape, stride, names})
ONNX          onnx          yolov5s.onnx         (metadata_props: stride, names, quantized)

Every exported file is run on a seeded sample batch at the export shape and compared with the PyTorch model
(`verify_onnx`, `verify_torchscript`). A float export whose largest difference exceeds 1e-4 of the largest output
magnitude is an error. Then use it with:
    python val.py --weights yolov5s.onnx --img 640          (onnxruntime; --dnn for OpenCV DNN)
    python detect.py --weights yolov5s.onnx
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.backend import load_pytorch_model  # noqa: E402
from models.experimental import is_quantized  # noqa: E402
from models.yolo import Detect  # noqa: E402
from utils.general import LOGGER, UserError, check_file, check_img_size, colorstr, print_args, run_cli  # noqa: E402
from utils.torch_utils import select_device  # noqa: E402

FORMATS = {"torchscript": ".torchscript", "onnx": ".onnx"}  # --include name -> file suffix
MIN_OPSET = 13  # QuantizeLinear/DequantizeLinear take a per-channel `axis` from opset 13 on (QAT exports need it)
DEFAULT_OPSET = 17
FLOAT_RTOL = 1e-4  # float32 export: max |diff| <= FLOAT_RTOL * max |PyTorch output|
HALF_RTOL = 1e-3  # float16 export: about one float16 rounding (eps 9.8e-4) of the largest output
INPUT_NAME, OUTPUT_NAME = "images", "output0"


def _max_opset() -> int:
    """Highest opset the TorchScript-based ONNX exporter of this torch writes."""
    try:
        from torch.onnx._constants import ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
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
    return Path(path).stat().st_size / 1e6


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
    from utils.dataloaders import LoadImages, _list_image_files
    from utils.dataset_yaml import check_dataset

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
        from torch.utils.mobile_optimizer import optimize_for_mobile

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

    The file gets metadata_props stride, names and quantized ("1" for a fake-quant model), as DetectMultiBackend
    reads them.
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
    onnx.checker.check_model(proto)
    if simplify:
        name, simplify_fn = _simplifier()
        LOGGER.info(f"{prefix} simplifying with {name}...")
        proto = simplify_fn(proto)
        onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    meta = {"stride": str(metadata["stride"]), "names": str(metadata["names"]),
            "quantized": "1" if metadata.get("quantized") else "0"}
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(f))
    return f


def _second_shape(shape, stride):
    """Another input shape to prove a --dynamic file: one more image, one stride taller, two strides wider."""
    bs, c, h, w = shape
    return bs + 1, c, h + stride, w + 2 * stride


def run(data=None, weights=ROOT / "yolov5s.pt", imgsz=(640, 640), batch_size=1, device="cpu",
        include=("torchscript", "onnx"), half=False, inplace=False, optimize=False, dynamic=False, simplify=False,
        opset=DEFAULT_OPSET, verbose=False) -> list:
    """Export one checkpoint to each format in `include`, verify each file, return the written paths."""
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
    metadata = {**model_metadata(model), "quantized": is_quantized(model)}
    if half and metadata["quantized"]:
        raise UserError(f"{w}: --half would cast the quantizers' scales of this QAT model to float16; drop --half")
    gs = metadata["stride"]
    imgsz = check_img_size(imgsz * 2 if len(imgsz) == 1 else imgsz, s=gs)
    prepare_for_export(model, inplace=inplace, dynamic=dynamic)
    dtype = torch.float16 if half else torch.float32
    im = sample_batch((batch_size, 3, *imgsz), data=data, device=device, dtype=dtype)
    if half:
        model.half()
    with torch.no_grad():
        for _ in range(2):  # dry runs build the Detect grids at this shape
            y = _first(model(im))
    LOGGER.info(f"\n{colorstr('PyTorch:')} starting from {w} with input shape {tuple(im.shape)} output shape "
                f"{tuple(y.shape)} ({file_size_mb(w):.1f} MB)")

    rtol = HALF_RTOL if half else FLOAT_RTOL
    checks = [im]
    if dynamic:
        checks.append(sample_batch(_second_shape(im.shape, gs), data=data, seed=1, device=device, dtype=dtype))
    written = []
    for fmt in include:
        t = time.time()
        if fmt == "torchscript":
            f = export_torchscript(model, im, w, metadata, optimize=optimize, dynamic=dynamic)
            for x in checks:
                verify_torchscript(model, f, x, rtol=rtol)
            prefix = colorstr("TorchScript:")
        else:
            f = export_onnx(model, im, w, metadata, opset=opset, dynamic=dynamic, simplify=simplify,
                            verbose=verbose)
            for x in checks:
                verify_onnx(model, f, x, rtol=rtol)
            prefix = colorstr("ONNX:")
        LOGGER.info(f"{prefix} export success {time.time() - t:.1f}s, saved as {f} ({file_size_mb(f):.1f} MB)")
        written.append(str(f))

    if written:
        h, w_ = imgsz
        size = f"{h}" if h == w_ else f"{h} {w_}"
        LOGGER.info(f"\nExport complete ({time.time() - t0:.1f}s)"
                    f"\nResults saved to {colorstr('bold', Path(w).resolve().parent)}"
                    f"\nDetect:          python detect.py --weights {written[-1]} --imgsz {size}"
                    f"\nValidate:        python val.py --weights {written[-1]} --imgsz {h}"
                    + ("" if h == w_ or dynamic else "   (val needs a square export, or --dynamic)"))
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
    opt = parser.parse_args(argv)
    print_args(vars(opt), "export")
    return opt


def main(opt):
    if opt.data:
        opt.data = check_file(opt.data)
    weights = opt.weights if isinstance(opt.weights, list) else [opt.weights]
    written = []
    for w in weights:
        written += run(**{**vars(opt), "weights": w})
    return written


if __name__ == "__main__":
    run_cli(main, parse_opt())
