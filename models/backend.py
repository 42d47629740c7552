"""DetectMultiBackend: run a PyTorch checkpoint, a TorchScript file or an ONNX file the same way.

val.py and detect.py call `model(im)` and get `(pred, ...)` with pred (bs, N, 5 + nc) in pixels,
whatever the file type. ONNX runs through onnxruntime, or OpenCV DNN with `dnn=True` (float ONNX only).
"""
from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from utils.general import LOGGER, UserError

SUFFIXES = {".pt": "pt", ".torchscript": "jit", ".onnx": "onnx"}


def default_names(nc: int):
    return {i: f"class{i}" for i in range(nc)}


class DetectMultiBackend(nn.Module):
    def __init__(self, weights="yolov5s.pt", device=torch.device("cpu"), dnn=False, data=None, fp16=False,
                 fuse=True, trust=False):
        super().__init__()
        w = str(weights[0] if isinstance(weights, (list, tuple)) and len(weights) == 1 else weights)
        suffix = Path(w).suffix.lower() if not isinstance(weights, (list, tuple)) or len(weights) == 1 else ".pt"
        if suffix not in SUFFIXES:
            raise UserError(f"{w}: unsupported weights format {suffix!r}; use a .pt checkpoint, .torchscript or .onnx")
        self.backend = SUFFIXES[suffix]
        self.device = device
        self.fp16 = fp16 and self.backend == "pt" and device.type != "cpu"
        self.stride, self.names, self.dynamic, self.quantized = 32, None, False, False
        if self.backend == "pt":
            from models.experimental import attempt_load, is_quantized

            model = attempt_load(weights if isinstance(weights, (list, tuple)) else w, device=device,
                                 inplace=True, fuse=fuse, trust=trust)
            self.stride = max(int(model.stride.max()), 32)
            self.names = model.module.names if hasattr(model, "module") else model.names
            self.quantized = is_quantized(model)
            if self.fp16 and not self.quantized:  # fake-quant models stay float32 (scales must not be cast)
                model.half()
            else:
                self.fp16 = False
            self.model = model
            self.pt = True
        else:
            self.pt = False
            if not Path(w).is_file():
                raise UserError(f"{w}: file not found")
            if self.backend == "jit":
                extra = {"config.txt": ""}
                self.model = torch.jit.load(w, _extra_files=extra, map_location=device).eval()
                meta = json.loads(extra["config.txt"]) if extra["config.txt"] else {}
                self.stride, self.names = int(meta.get("stride", 32)), meta.get("names")
            elif dnn:
                import cv2

                LOGGER.info(f"Loading {w} for ONNX OpenCV DNN inference...")
                self.net = cv2.dnn.readNetFromONNX(w)
                self.session = None
            else:
                import onnxruntime as ort

                LOGGER.info(f"Loading {w} for ONNX Runtime inference...")
                try:
                    self.session = ort.InferenceSession(w, providers=self._ort_providers(device))
                except Exception as e:
                    raise UserError(f"{w}: onnxruntime could not load it ({str(e).splitlines()[0][:150]})") from None
                meta = self.session.get_modelmeta().custom_metadata_map
                if "stride" in meta:
                    self.stride = int(meta["stride"])
                if "names" in meta:
                    self.names = ast.literal_eval(meta["names"])
                self.quantized = meta.get("quantized", "0") == "1"
                shape = self.session.get_inputs()[0].shape
                self.dynamic = any(not isinstance(s, int) for s in shape)
                self.input_name = self.session.get_inputs()[0].name
                self.output_names = [o.name for o in self.session.get_outputs()]
        if data and self.names is None:
            from utils.dataset_yaml import check_dataset

            self.names = check_dataset(data, autodownload=False)["names"]
        if isinstance(self.names, (list, tuple)):
            self.names = dict(enumerate(self.names))
        if isinstance(self.names, dict):
            self.names = {int(k): v for k, v in self.names.items()}

    @staticmethod
    def _ort_providers(device):
        import onnxruntime as ort

        avail = ort.get_available_providers()
        if device.type == "cuda" and "CUDAExecutionProvider" in avail:
            return ["CUDAExecutionProvider", "CPUExecutionProvider"]
        return ["CPUExecutionProvider"]

    def forward(self, im, augment=False, visualize=False):
        if self.fp16 and im.dtype != torch.float16:
            im = im.half()
        if self.backend == "pt":
            y = self.model(im, augment=augment, visualize=visualize) if (augment or visualize) else self.model(im)
        elif self.backend == "jit":
            y = self.model(im)
        elif getattr(self, "session", None) is None:  # OpenCV DNN
            arr = im.cpu().numpy().astype(np.float32)
            self.net.setInput(arr)
            y = torch.from_numpy(self.net.forward()).to(self.device)
        else:
            arr = im.cpu().numpy().astype(np.float32)
            y = self.session.run(self.output_names, {self.input_name: arr})[0]
            y = torch.from_numpy(y).to(self.device)
        if isinstance(y, (list, tuple)):
            return y[0] if len(y) == 1 else y
        return y

    def warmup(self, imgsz=(1, 3, 640, 640)):
        if self.backend == "pt" and self.device.type != "cpu":
            im = torch.empty(*imgsz, dtype=torch.half if self.fp16 else torch.float, device=self.device)
            self.forward(im)
