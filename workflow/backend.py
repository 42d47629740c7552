"""DetectMultiBackend: run a PyTorch checkpoint, a TorchScript file, an ONNX file or an OpenVINO folder the same way.

val.py and detect.py call `model(im)` and get `(pred, ...)` with pred (bs, N, 5 + nc) in pixels,
whatever the file type. ONNX runs through onnxruntime, or OpenCV DNN with `dnn=True` (meant for float ONNX); an
int8 QDQ file runs with onnxruntime's int8 kernels when, on the first batch, they compute exactly what the graph
defines (onnxruntime_kernel_form makes them exact), and as written otherwise, so val.py measures the numbers the
exported model defines.
Exported files carry what the loader needs (export.py writes it): TorchScript an extra file config.txt with json
{shape, stride, names[, dynamic]}, ONNX metadata_props stride, names, quantized (an int8 QDQ export of a QAT model)
and, for those, pow2. A file exported at a fixed shape only accepts that shape; a mismatch is a UserError saying
which --imgsz to use.
"""
from __future__ import annotations

import ast
import json
import warnings
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn as nn

from models.experimental import attempt_load
from models.quant import is_quantized
from utils.dataset_yaml import check_dataset
from utils.general import LOGGER, UserError, yaml_load
from utils.runtimes import OPENVINO_DIR, onnxruntime_session, openvino_compiled, openvino_run, openvino_xml

SUFFIXES = {".pt": "pt", ".torchscript": "jit", ".onnx": "onnx"}


def load_pytorch_model(weights, device=None, inplace=True, fuse=True, trust=False):
    """attempt_load: every way a file can be damaged or hostile is already one UserError naming it
    (utils/checkpoint_io.safe_load, models/checkpoint.check_model and check_qat_state)."""
    return attempt_load(weights, device=device, inplace=inplace, fuse=fuse, trust=trust)


def onnx_metadata(path) -> dict:
    """metadata_props of an ONNX file as a dict, plus '_input_shape' (ints, or None for a named/dynamic dim)."""
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf DecodeError and friends: not an ONNX file
        raise UserError(f"{path}: not a readable ONNX file ({type(e).__name__})") from None
    meta = {p.key: p.value for p in proto.metadata_props}
    inits = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in inits]
    if inputs:
        dims = inputs[0].type.tensor_type.shape.dim
        meta["_input_shape"] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return meta


MAX_STRIDE = 1024  # a YOLOv5 model's largest stride is 32 or 64; anything above this is no model's


def _bad_meta(w, where, key, value, right):
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return UserError(f"{w}: {where} '{key}' is {shown}; it must be {right} (as export.py writes it); export the model "
                     f"again")


def _meta_stride(w, where, value):
    """A stride from exported metadata (an int, or a string of one in ONNX metadata_props) as an int in
    1..MAX_STRIDE."""
    v = value.strip() if isinstance(value, str) else value
    if isinstance(v, str) and v.isdigit() and len(v) < 6:
        v = int(v)
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if not (isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_STRIDE):
        raise _bad_meta(w, where, "stride", value, f"a whole number from 1 to {MAX_STRIDE}")
    return v


def _meta_names(w, where, value):
    """Class names from exported metadata: a list of names or an {index: name} dict (JSON keys are strings);
    ONNX metadata_props hold the dict as Python text."""
    names = value
    if isinstance(value, str):
        try:
            names = ast.literal_eval(value) if len(value) < 1_000_000 else None
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            names = None
    if isinstance(names, (list, tuple)):
        names = dict(enumerate(names))
    ok = isinstance(names, dict) and all(
        (isinstance(k, int) and not isinstance(k, bool) or isinstance(k, str) and k.isdigit()) and isinstance(n, str)
        for k, n in names.items())
    if not ok:
        raise _bad_meta(w, where, "names", value, "a list of class names or an {index: name} mapping")
    return {int(k): n for k, n in names.items()}


def _meta_shape(w, where, value):
    ok = isinstance(value, (list, tuple)) and len(value) == 4 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    if not ok:
        raise _bad_meta(w, where, "shape", value, "the input shape [batch, 3, height, width] in positive integers")
    return list(value)


def _meta_flag(w, where, key, value):
    if isinstance(value, bool) or value in ("0", "1"):
        return value in (True, "1")
    raise _bad_meta(w, where, key, value, "true or false" if where != "metadata_props" else "'0' or '1'")


def openvino_metadata(w, xml) -> dict:
    """The <stem>.yaml beside an OpenVINO .xml, checked: stride, names (None if absent), quantized, pow2, dynamic and
    input_shape (None for a dynamic model or one without a shape). Anything malformed is one UserError naming the
    key, what it holds and what it must hold."""
    meta_file = Path(xml).with_suffix(".yaml")
    meta = yaml_load(meta_file) if meta_file.is_file() else {}
    where = meta_file.name
    if not isinstance(meta, dict):
        raise _bad_meta(w, where, "content", meta, "a mapping of stride, names, quantized, pow2, shape, dynamic")
    quantized = _meta_flag(w, where, "quantized", meta.get("quantized", False))
    dynamic = _meta_flag(w, where, "dynamic", meta.get("dynamic", False))
    shape = _meta_shape(w, where, meta["shape"]) if meta.get("shape") is not None else None
    return {"stride": _meta_stride(w, where, meta.get("stride", 32)),
            "names": _meta_names(w, where, meta["names"]) if meta.get("names") is not None else None,
            "quantized": quantized, "pow2": quantized and _meta_flag(w, where, "pow2", meta.get("pow2", False)),
            "dynamic": dynamic, "input_shape": None if dynamic else shape}


def _cv2_reason(e) -> str:
    """The informative part of a cv2.error: its 'error: (...) ... in function ...' line."""
    msg = next((ln for ln in str(e).splitlines() if "error:" in ln), str(e)).strip()
    return msg.split("error:", 1)[-1].strip()[:160]


def _shape_str(shape):
    return "x".join(str(s) if s is not None else "?" for s in shape)


class DetectMultiBackend(nn.Module):
    def __init__(self, weights="yolov5s.pt", device=torch.device("cpu"), dnn=False, data=None, fp16=False,
                 fuse=True, trust=False):
        super().__init__()
        w = str(weights[0] if isinstance(weights, (list, tuple)) and len(weights) == 1 else weights)
        suffix = Path(w).suffix.lower() if not isinstance(weights, (list, tuple)) or len(weights) == 1 else ".pt"
        if suffix == ".xml" or w.rstrip("/").endswith(OPENVINO_DIR):
            self.backend = "openvino"
        elif suffix in SUFFIXES:
            self.backend = SUFFIXES[suffix]
        else:
            raise UserError(f"{w}: unsupported weights format {suffix!r}; use a .pt checkpoint, .torchscript, .onnx "
                            f"or an OpenVINO *{OPENVINO_DIR} folder")
        self.device = device
        self.weights = w
        self.fp16 = fp16 and self.backend == "pt" and device.type != "cpu"
        self.stride, self.names, self.dynamic, self.quantized = 32, None, False, False
        self.pow2 = False  # a quantized model whose every scale is a power of two
        self.input_shape = None  # the shape a fixed-shape exported file was made for (None: any)
        if self.backend == "pt":
            model = load_pytorch_model(weights if isinstance(weights, (list, tuple)) else w, device=device,
                                       inplace=True, fuse=fuse, trust=trust)
            self.stride = max(int(model.stride.max()), 32)
            self.names = model.module.names if hasattr(model, "module") else model.names
            self.quantized = is_quantized(model)
            config = getattr(model, "qat_config", None)  # an Ensemble has none
            self.pow2 = bool(self.quantized and config is not None and config.pow2)
            if self.fp16 and not self.quantized:  # fake-quant models stay float32 (scales must not be cast)
                model.half()
            else:
                self.fp16 = False
            self.model = model
            self.pt = True
        else:
            self.pt = False
            if not Path(w).exists():
                raise UserError(f"{w}: file not found")
            if self.backend == "jit":
                self._load_torchscript(w, device)
            elif self.backend == "openvino":
                self._load_openvino(w)
            else:
                self._load_onnx(w, device, dnn)
        if data and self.names is None:
            self.names = check_dataset(data, autodownload=False)["names"]
        if isinstance(self.names, (list, tuple)):
            self.names = dict(enumerate(self.names))
        if isinstance(self.names, dict):
            self.names = {int(k): v for k, v in self.names.items()}

    def _load_torchscript(self, w, device):
        LOGGER.info(f"Loading {w} for TorchScript inference...")
        extra = {"config.txt": ""}
        try:
            with warnings.catch_warnings():  # torch.jit's deprecation notice; TorchScript is what this file is
                warnings.filterwarnings("ignore", category=FutureWarning)
                self.model = torch.jit.load(w, _extra_files=extra, map_location=device).eval()
        except RuntimeError as e:
            raise UserError(f"{w}: not a readable TorchScript file ({str(e).strip().splitlines()[0][:150]})") from None
        self.jit_dtype = next(self.model.parameters(), torch.empty(0)).dtype  # float16 for a --half export
        try:
            meta = json.loads(extra["config.txt"]) if extra["config.txt"] else {}
        except ValueError as e:
            raise UserError(f"{w}: its config.txt is not JSON ({e}); export the model again") from None
        if not isinstance(meta, dict):
            raise _bad_meta(w, "config.txt", "config", meta, "a mapping of shape, stride, names, dynamic")
        self.stride = _meta_stride(w, "config.txt", meta.get("stride", 32))
        self.names = _meta_names(w, "config.txt", meta["names"]) if meta.get("names") is not None else None
        self.dynamic = _meta_flag(w, "config.txt", "dynamic", meta.get("dynamic", False))
        if meta.get("shape") is not None and not self.dynamic:
            self.input_shape = [None, *_meta_shape(w, "config.txt", meta["shape"])[1:]]  # traced grids fix h, w

    def _load_onnx(self, w, device, dnn):
        meta = onnx_metadata(w)
        if "stride" in meta:
            self.stride = _meta_stride(w, "metadata_props", meta["stride"])
        if "names" in meta:
            self.names = _meta_names(w, "metadata_props", meta["names"])
        self.quantized = _meta_flag(w, "metadata_props", "quantized", meta.get("quantized", "0"))
        self.pow2 = self.quantized and _meta_flag(w, "metadata_props", "pow2", meta.get("pow2", "0"))
        shape = meta.get("_input_shape")
        self.dynamic = shape is None or any(s is None or s == 0 for s in shape)
        self.input_shape = None if self.dynamic else shape
        self.session = self.as_written = None
        if dnn:
            LOGGER.info(f"Loading {w} for ONNX OpenCV DNN inference...")
            if self.quantized:
                LOGGER.warning(f"WARNING: {w} is a quantized (QDQ) model; OpenCV DNN runs it with its own int8 "
                               f"kernels, onnxruntime (drop --dnn) is the reference")
            log = cv2.utils.logging
            level = log.getLogLevel()
            log.setLogLevel(log.LOG_LEVEL_SILENT)  # its importer logs each unsupported node; we say it in one line
            try:
                self.net = cv2.dnn.readNetFromONNX(w)
            except cv2.error as e:
                raise UserError(f"{w}: OpenCV DNN {cv2.__version__} cannot read this graph ({_cv2_reason(e)}); "
                                f"drop --dnn to run it with onnxruntime") from None
            finally:
                log.setLogLevel(level)
            if self.net.empty():  # OpenCV 5 returns an empty net (and logs the unsupported ops) instead of raising
                raise UserError(f"{w}: OpenCV DNN {cv2.__version__} cannot read this graph (it holds operations "
                                f"OpenCV does not support); drop --dnn to run it with onnxruntime")
        else:
            kind = f" (int8 QDQ{', power-of-two scales' if self.pow2 else ''})" if self.quantized else ""
            LOGGER.info(f"Loading {w}{kind} for ONNX Runtime inference...")
            providers = self._ort_providers(device)
            try:
                self.session = onnxruntime_session(w, providers)
                if self.quantized:  # the float-kernel session the int8 kernels are checked against on the first batch
                    self.as_written = onnxruntime_session(w, providers, as_written=True)
            except Exception as e:
                raise UserError(f"{w}: onnxruntime could not load it ({str(e).splitlines()[0][:150]})") from None
            self.input_name = self.session.get_inputs()[0].name
            self.input_dtype = np.float16 if self.session.get_inputs()[0].type == "tensor(float16)" else np.float32
            self.output_names = [o.name for o in self.session.get_outputs()]

    def _load_openvino(self, w):
        """An export.py --include openvino folder: <stem>.xml/.bin and <stem>.yaml (stride, names, quantized, pow2,
        shape, dynamic), as upstream's folder plus the quantization keys. The yaml is checked before OpenVINO runs."""
        xml = openvino_xml(w)
        if xml is None or not xml.is_file():
            raise UserError(f"{w}: no single OpenVINO .xml inside; point --weights at an export.py --include openvino "
                            f"folder") from None
        meta = openvino_metadata(w, xml)
        self.stride, self.names, self.quantized = meta["stride"], meta["names"], meta["quantized"]
        self.pow2, self.dynamic, self.input_shape = meta["pow2"], meta["dynamic"], meta["input_shape"]
        try:
            import openvino  # noqa: F401  (the import is the check)
        except ImportError:
            raise UserError(f"{w}: OpenVINO models need the openvino package; pip install openvino") from None
        kind = " (int8: QDQ run by OpenVINO's int8 kernels)" if self.quantized else ""
        LOGGER.info(f"Loading {xml}{kind} for OpenVINO inference...")
        try:
            self.ov_model = openvino_compiled(xml)
            self.ov_requests = {}  # input shape -> InferRequest (a dynamic IR is compiled for each shape)
        except RuntimeError as e:
            raise UserError(f"{w}: OpenVINO could not load it ({str(e).strip().splitlines()[0][:150]})") from None

    def _ov_request(self, shape):
        """The InferRequest for input `shape`, with the compiled model it belongs to kept beside it (a request must
        not outlive its compiled model)."""
        if shape not in self.ov_requests:
            dynamic = self.ov_model.input(0).get_partial_shape().is_dynamic
            model = openvino_compiled(openvino_xml(self.weights), shape=shape) if dynamic else self.ov_model
            self.ov_requests[shape] = (model, model.create_infer_request())
        return self.ov_requests[shape][1]

    @staticmethod
    def _ort_providers(device):
        import onnxruntime as ort

        avail = ort.get_available_providers()
        if device.type == "cuda" and "CUDAExecutionProvider" in avail:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def _check_shape(self, im):
        """A fixed-shape exported file computes garbage or fails on another shape: say which shape it needs."""
        want = self.input_shape
        if want is None:
            return
        got = list(im.shape)
        if len(got) != len(want) or any(s is not None and s != g for s, g in zip(want, got)):
            h, w = want[2], want[3]
            size = f"{h}" if h == w else f"{h} {w}"
            batch = "" if want[0] is None or want[0] == got[0] else f" and batch size {want[0]}"
            square = "" if h == w else " (val.py runs square images: it needs a square or --dynamic export)"
            raise UserError(f"{self.weights}: exported for input {_shape_str(want)}, got {_shape_str(got)}; "
                            f"run with --imgsz {size}{batch}{square}, or re-export at this shape or with --dynamic")

    def forward(self, im, augment=False, visualize=False):
        if self.fp16 and im.dtype != torch.float16:
            im = im.half()
        if self.backend == "pt":
            y = self.model(im, augment=augment, visualize=visualize) if (augment or visualize) else self.model(im)
        elif self.backend == "jit":
            self._check_shape(im)
            y = self.model(im.to(self.jit_dtype))
        elif self.backend == "openvino":
            self._check_shape(im)
            y = torch.from_numpy(openvino_run(self._ov_request(tuple(im.shape)), im.cpu().numpy())).to(self.device)
        elif self.session is None:  # OpenCV DNN

            self._check_shape(im)
            self.net.setInput(im.cpu().numpy().astype(np.float32))
            try:
                y = torch.from_numpy(self.net.forward()).to(self.device)
            except cv2.error as e:
                raise UserError(f"{self.weights}: OpenCV DNN could not run this graph ({_cv2_reason(e)}); "
                                f"drop --dnn to run it with onnxruntime") from None
        else:
            self._check_shape(im)
            arr = im.cpu().numpy().astype(self.input_dtype)
            y = self.session.run(self.output_names, {self.input_name: arr})[0]
            if self.as_written is not None:
                y = self._choose_kernels(arr, y)
            y = torch.from_numpy(y).to(self.device)
        if isinstance(y, (list, tuple)):
            return y[0] if len(y) == 1 else y
        return y

    def _choose_kernels(self, arr, y):
        """First batch of a QDQ file: keep onnxruntime's int8 kernels when their output equals the graph run as
        written (float kernels on the dequantized values, what the ONNX spec defines), else run as written from now
        on. Returns the as-written output of this batch."""
        ref = self.as_written.run(self.output_names, {self.input_name: arr})[0]
        differ = float((ref != y).mean())
        if differ == 0:
            LOGGER.info(f"{self.weights}: onnxruntime's int8 kernels give exactly the graph's numbers on the first "
                        f"batch {tuple(arr.shape)}: running with them")
        else:
            worst = np.abs(ref - y).max()
            LOGGER.warning(f"WARNING: {self.weights}: onnxruntime's int8 kernels differ from the graph as written on "
                           f"{100 * differ:.2f}% of the first batch's outputs (max |diff| {worst:.3g}): running it as "
                           f"written (float kernels, slower)")
            self.session = self.as_written
        self.as_written = None
        return ref

    def warmup(self, imgsz=(1, 3, 640, 640)):
        if self.backend == "pt" and self.device.type != "cpu":
            im = torch.empty(*imgsz, dtype=torch.half if self.fp16 else torch.float, device=self.device)
            self.forward(im)
