"""Inference for torch.hub users: AutoShape (images in, Detections out) and Detections (boxes, tables, drawings).

    model = torch.hub.load('path/to/yolov5-qat', 'custom', path='best.pt', source='local')  # an AutoShape
    results = model(['img.jpg', Image.open('b.png'), cv2.imread('c.jpg')[..., ::-1]], size=320)
    results.print()                # image 1/3: 480x640 2 circles, 1 star ... Speed: ...
    results.pandas().xyxy[0]       # xmin ymin xmax ymax confidence class name
    results.save()                 # runs/detect/exp*/<image>.jpg with boxes drawn
    crops = results.crop()         # runs/detect/exp*/crops/<class>/<image>.jpg, and the crops as arrays

The model behind an AutoShape is DetectMultiBackend, so a float or QAT .pt checkpoint, a .torchscript, an .onnx
file or an OpenVINO folder all work the same way. Pre- and post-processing are detect.py's (letterbox,
non_max_suppression, scale_boxes): one image gives the boxes `detect.py --save-txt` writes for it at the same size and
thresholds (detect.py rounds them to whole pixels, AutoShape does not).

It wraps workflow.backend.DetectMultiBackend and uses utils.augmentations and utils.plots; only hubconf.py imports
it.
"""
from __future__ import annotations

import io
import numbers
import sys
import urllib.error
import urllib.parse
import urllib.request
from copy import copy
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from PIL import Image, ImageOps, ImageShow

from models.yolo import Detect
from utils.augmentations import letterbox
from utils.general import (
    LOGGER,
    UserError,
    colorstr,
    has_display,
    increment_path,
    make_divisible,
    make_run_folder,
    non_max_suppression,
    scale_boxes,
    xyxy2xywh,
)
from utils.imageio import imread
from utils.plots import Annotator, colors, save_one_box
from utils.torch_utils import time_sync
from workflow.backend import DetectMultiBackend

URL_TIMEOUT = 30  # seconds to wait for an image URL to answer

_INPUTS = ("a file path or http(s) URL (str or pathlib.Path), a PIL image, a numpy array (HWC, RGB), a list of "
           "those, or a BCHW torch tensor")


def _read_url(url: str, what: str) -> bytes:
    """The bytes at an http(s) URL, read into memory; any failure is one UserError naming the URL."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers={"User-Agent": "yolov5-qat"}),
                                    timeout=URL_TIMEOUT) as r:
            return r.read()
    except urllib.error.HTTPError as e:
        reason = f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        reason = str(e.reason)
    except (OSError, ValueError) as e:  # timeouts, resets, malformed URLs
        reason = str(e) or type(e).__name__
    raise UserError(f"{what}: download failed ({reason.splitlines()[0] if reason else 'no reason given'})")


def _decode(data: bytes, what: str) -> np.ndarray:
    """Encoded image bytes -> HWC RGB uint8 (OpenCV as detect.py reads, Pillow for formats OpenCV lacks)."""
    im = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None
    if im is not None:
        return im[..., ::-1]
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return np.asarray(ImageOps.exif_transpose(pil).convert("RGB"))
    except Exception:  # Pillow raises UnidentifiedImageError, OSError, SyntaxError... for what is no image
        raise UserError(f"{what}: not a readable image") from None


def _hwc3(im: np.ndarray, what: str) -> np.ndarray:
    """A numpy image as HWC with 3 channels: grey is repeated, an alpha channel dropped, CHW transposed."""
    if im.ndim == 3 and im.shape[0] in (1, 3, 4) and im.shape[2] not in (1, 3, 4):  # CHW, as a dataloader gives
        im = im.transpose(1, 2, 0)
    if im.ndim == 2:
        im = im[..., None]
    if im.ndim != 3 or im.shape[2] not in (1, 3, 4) or not im.shape[0] or not im.shape[1]:
        raise UserError(f"{what}: numpy array of shape {tuple(im.shape)}; give an image as HxWx3 (RGB), HxWx4, HxW "
                        f"or HxWx1")
    if im.shape[2] == 1:
        im = np.repeat(im, 3, axis=2)
    im = im[..., :3]
    if im.dtype != np.uint8 and im.dtype != np.float32:  # cv2.resize takes neither float16 nor int64; 0-255 values
        im = im.astype(np.float32)
    return np.ascontiguousarray(im)


def _load(x, i: int):
    """One input -> (HWC RGB array, file name). Files are read as detect.py reads them (cv2.imread)."""
    name = f"image{i}"
    if isinstance(x, (str, Path)):
        s = str(x)
        if s.lower().startswith(("http://", "https://")):
            im = _decode(_read_url(s, s), s)
            name = Path(urllib.parse.urlsplit(s).path).name or name
        else:
            p = Path(s).expanduser()
            if not p.is_file():
                raise UserError(f"{s}: image file not found" if not p.is_dir() else
                                f"{s}: is a folder; give image files (detect.py --source takes folders)")
            im = imread(p)  # as detect.py: OpenCV's decoder and EXIF rotation, any file name
            im = im[..., ::-1] if im is not None else _decode(p.read_bytes(), s)
            name = p.name
    elif isinstance(x, Image.Image):
        im = np.asarray(ImageOps.exif_transpose(x).convert("RGB"))
        name = Path(getattr(x, "filename", "") or name).name
    elif isinstance(x, np.ndarray):
        im = x  # RGB, as upstream's AutoShape: pass cv2.imread(f)[..., ::-1] for an OpenCV image
    else:
        raise UserError(f"image {i}: cannot read a {type(x).__name__}; give {_INPUTS}")
    return _hwc3(im, f"image {i}" if isinstance(x, np.ndarray) else name), str(Path(name).with_suffix(".jpg"))


def _unique(names):
    """File names made unique within one batch (a second 'a.jpg' becomes 'a_2.jpg'), so saves do not overwrite."""
    seen, out = set(), []
    for n in names:
        stem, k, new = Path(n).stem, 2, n
        while new in seen:
            new, k = f"{stem}_{k}.jpg", k + 1
        seen.add(new)
        out.append(new)
    return out


class AutoShape(nn.Module):
    """A DetectMultiBackend that takes images as they come and returns Detections.

    Call it with a file path or http(s) URL, a pathlib.Path, a PIL image, a numpy array (HWC, RGB as upstream: pass
    `cv2.imread(f)[..., ::-1]`; HxW grey and HxWx4 work too) or a list of those, and `size` (an int, or (h, w)): each
    image is letterboxed as detect.py does, all to one batch shape, run, filtered with non-maximum suppression and its
    boxes mapped back to its own pixels. A BCHW torch tensor (0-1 values) goes to the model as it is, and the raw
    model output (bs, N, 5 + nc) comes back, without NMS.

    Set these on the instance: conf (confidence threshold), iou (NMS IoU threshold), agnostic (NMS across classes),
    multi_label (one row per class above conf), classes (keep only these class indices), max_det (detections per
    image), amp (autocast on a GPU).
    """

    conf = 0.25
    iou = 0.45
    agnostic = False
    multi_label = False
    classes = None
    max_det = 1000
    amp = False

    def __init__(self, model, verbose=True):
        super().__init__()
        if not isinstance(model, DetectMultiBackend):
            raise TypeError(f"AutoShape wraps a DetectMultiBackend, got {type(model).__name__}")
        if verbose:
            LOGGER.info("Adding AutoShape... ")
        self.model = model.eval()
        self.pt = model.pt
        self.stride = model.stride
        self.names = model.names or {}
        if self.pt:
            for k in ("yaml", "nc", "hyp"):
                if hasattr(model.model, k):
                    setattr(self, k, getattr(model.model, k))
            for m in model.model.modules():
                if isinstance(m, Detect):
                    m.inplace = False  # several threads may share the model
                    m.export = True  # the decoded tensor only: what a tensor input gets back, as upstream

    def _device(self):
        """(device, dtype) the model's inputs go to: a .pt model's own (also after .to() or .half()), else float32."""
        p = next(self.model.parameters(), None) if self.pt else None
        return (p.device, p.dtype) if p is not None else (self.model.device, torch.float32)

    def _check_settings(self):
        for k in ("conf", "iou"):
            v = getattr(self, k)
            if not isinstance(v, numbers.Real) or not 0 <= v <= 1:
                raise UserError(f"model.{k}={v!r}: must be a number in [0, 1]")
        if not isinstance(self.max_det, numbers.Integral) or self.max_det < 1:
            raise UserError(f"model.max_det={self.max_det!r}: must be an integer >= 1")

    def _batch_shape(self, size):
        """size -> (h, w) multiples of the stride; an exported file fixed to one shape must be called with it."""
        given = size
        size = (size, size) if isinstance(size, (int, np.integer)) else tuple(size) if isinstance(size, (list, tuple)) \
            else ()
        if len(size) != 2 or not all(isinstance(s, (int, np.integer)) and s >= 1 for s in size):
            raise UserError(f"size={given!r}: give an int or (height, width), each >= 1")
        size = tuple(make_divisible(int(s), self.stride) for s in size)
        fixed = None if self.pt else self.model.input_shape
        if fixed is not None and tuple(fixed[2:]) != size:
            h, w = fixed[2], fixed[3]
            raise UserError(f"{self.model.weights}: exported for {h}x{w} inputs; call the model with "
                            f"size={h if h == w else (h, w)}, or re-export at this size or with --dynamic")
        return size

    def _run(self, x, augment=False):
        """The backend's decoded output on batch x; a file exported for batch size 1 runs the images one by one."""
        fixed = None if self.pt else self.model.input_shape
        if fixed is not None and fixed[0] == 1 and len(x) > 1:
            return torch.cat([self._run(x[i:i + 1]) for i in range(len(x))])
        y = self.model(x, augment=augment)
        return y[0] if isinstance(y, (list, tuple)) else y

    @torch.no_grad()
    def forward(self, ims, size=640, augment=False, profile=False):
        """Detect objects in `ims` (see the class docstring) letterboxed to `size`; returns Detections.
        augment: test-time augmentation (.pt models). profile: log the time of each stage of this call."""
        t0 = time_sync()
        device, dtype = self._device()
        autocast = torch.autocast(device.type, enabled=bool(self.amp) and device.type != "cpu")
        if isinstance(ims, torch.Tensor):
            with autocast:
                return self.model(ims.to(device, dtype), augment=augment)

        self._check_settings()
        items = list(ims) if isinstance(ims, (list, tuple)) else [ims]
        if not items:
            raise UserError(f"no images given (an empty {type(ims).__name__}); give {_INPUTS}")
        loaded = [_load(x, i) for i, x in enumerate(items)]
        images, files = [im for im, _ in loaded], _unique([f for _, f in loaded])
        size = self._batch_shape(size)
        # as detect.py: .pt models get the smallest stride-multiple rectangle, exported files the full size
        boxed = [letterbox(im, size, stride=self.stride, auto=self.pt)[0] for im in images]
        shape = tuple(max(b.shape[k] for b in boxed) for k in (0, 1))
        if any(b.shape[:2] != shape for b in boxed):  # images of different shapes share the largest rectangle
            boxed = [letterbox(im, shape, auto=False)[0] for im in images]
        x = np.ascontiguousarray(np.stack(boxed).transpose(0, 3, 1, 2))  # BHWC -> BCHW, RGB
        x = torch.from_numpy(x).to(device).to(dtype) / 255
        t1 = time_sync()

        with autocast:
            y = self._run(x, augment)
        t2 = time_sync()
        pred = non_max_suppression(y, self.conf, self.iou, self.classes, self.agnostic, self.multi_label,
                                   max_det=self.max_det)
        for det, im in zip(pred, images):
            det[:, :4] = scale_boxes(x.shape[2:], det[:, :4].float(), im.shape)
        t3 = time_sync()
        if profile:
            LOGGER.info(f"AutoShape: pre-process {(t1 - t0) * 1e3:.1f}ms, inference {(t2 - t1) * 1e3:.1f}ms, NMS "
                        f"{(t3 - t2) * 1e3:.1f}ms for {len(images)} image(s) at shape {tuple(x.shape)}")
        return Detections(images, pred, files, (t1 - t0, t2 - t1, t3 - t2), self.names, tuple(x.shape))


def _uint8(im):
    return im if im.dtype == np.uint8 else np.clip(im, 0, 255).astype(np.uint8)


def _in_notebook() -> bool:
    ipython = sys.modules.get("IPython")
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


class Detections:
    """What AutoShape returns for a batch of n images.

    ims: the images (HWC RGB numpy arrays, as read). pred, xyxy: per image an (m, 6) tensor [x1, y1, x2, y2,
    confidence, class] in pixels, best first; xywh: [x_center, y_center, width, height, conf, class]; xyxyn, xywhn: the
    same normalised by image width and height. names: class index -> name. files: a .jpg file name per image (the
    input's name, image<i>.jpg for arrays). times: seconds spent on pre-processing, inference and NMS for the batch;
    t: the same in ms per image; s: the BCHW shape the model ran at.
    """

    def __init__(self, ims, pred, files, times=(0.0, 0.0, 0.0), names=None, shape=None):
        self.ims = ims
        self.pred = pred
        self.names = names if names is not None else {}
        self.files = files
        self.times = tuple(times)
        self.n = len(pred)
        self.t = tuple(t / max(self.n, 1) * 1e3 for t in self.times)
        self.s = tuple(shape) if shape is not None else None
        gn = [torch.tensor([im.shape[1], im.shape[0], im.shape[1], im.shape[0], 1, 1], dtype=torch.float32,
                           device=p.device) for im, p in zip(ims, pred)]
        self.xyxy = pred
        self.xywh = [xyxy2xywh(p) for p in pred]
        self.xyxyn = [p / g for p, g in zip(self.xyxy, gn)]
        self.xywhn = [p / g for p, g in zip(self.xywh, gn)]

    def _name(self, c) -> str:
        c = int(c)
        try:
            return str(self.names[c])
        except (KeyError, IndexError, TypeError):
            return str(c)

    def _annotated(self, i, labels=True) -> np.ndarray:
        """Image i (RGB uint8, a copy) with its boxes drawn; labels=False draws boxes without class and confidence."""
        annotator = Annotator(_uint8(self.ims[i]).copy(), example=str(self.names))
        for *box, conf, cls in reversed(self.pred[i].tolist()):  # best last, on top
            annotator.box_label(box, f"{self._name(cls)} {conf:.2f}" if labels else "", color=colors(cls))
        return annotator.result()

    def show(self, labels=True):
        """Open each annotated image in an image viewer (inline in a Jupyter notebook); without a display, one
        warning and nothing else."""
        notebook = _in_notebook()
        if not notebook and not has_display():
            LOGGER.warning("WARNING: Detections.show(): no display (DISPLAY is not set); use .save() or .render()")
            return
        for i in range(self.n):
            im = Image.fromarray(self._annotated(i, labels))
            if notebook:
                from IPython.display import display

                display(im)
            elif not ImageShow.show(im, title=self.files[i]):
                LOGGER.warning("WARNING: Detections.show(): no image viewer found; use .save() or .render()")
                return

    def save(self, labels=True, save_dir="runs/detect/exp", exist_ok=False):
        """Write each annotated image as save_dir/<file> (save_dir becomes exp2, exp3... when it exists, unless
        exist_ok)."""
        save_dir = make_run_folder(increment_path(save_dir, exist_ok=exist_ok))
        for i in range(self.n):
            Image.fromarray(self._annotated(i, labels)).save(save_dir / self.files[i])
        LOGGER.info(f"Saved {self.n} image{'s' * (self.n != 1)} to {colorstr('bold', save_dir)}")

    def crop(self, save=True, save_dir="runs/detect/exp", exist_ok=False):
        """Cut every detection out of its image (box grown by 2% + 10 px, as detect.py --save-crop) and, with save,
        write it as save_dir/crops/<class name>/<file>. Returns a list of dicts, one per detection: box (x1, y1, x2,
        y2 tensors), conf, cls, label ('name 0.87') and im, the crop as a numpy array in BGR order (as upstream:
        ready for cv2.imwrite)."""
        save_dir = make_run_folder(increment_path(save_dir, exist_ok=exist_ok)) if save else None
        crops = []
        for i in range(self.n):
            bgr = np.ascontiguousarray(_uint8(self.ims[i])[..., ::-1])
            for *box, conf, cls in reversed(self.pred[i]):
                file = save_dir / "crops" / self._name(cls) / self.files[i] if save else Path("im.jpg")
                im = save_one_box(torch.stack(box).cpu(), bgr, file=file, BGR=True, save=save)
                crops.append({"box": box, "conf": conf, "cls": cls, "label": f"{self._name(cls)} {conf:.2f}",
                              "im": im})
        if save:
            LOGGER.info(f"Saved {len(crops)} crop{'s' * (len(crops) != 1)} to {colorstr('bold', save_dir / 'crops')}")
        return crops

    def render(self, labels=True):
        """Draw the boxes into the images: replaces ims with annotated copies and returns them (RGB uint8)."""
        self.ims = [self._annotated(i, labels) for i in range(self.n)]
        return self.ims

    def pandas(self):
        """A copy whose xyxy, xyxyn, xywh, xywhn are lists of pandas DataFrames, one per image, with columns xmin ymin
        xmax ymax (or xcenter ycenter width height) confidence class name."""
        new = copy(self)
        corners = ["xmin", "ymin", "xmax", "ymax", "confidence", "class", "name"]
        centres = ["xcenter", "ycenter", "width", "height", "confidence", "class", "name"]
        for k, columns in (("xyxy", corners), ("xyxyn", corners), ("xywh", centres), ("xywhn", centres)):
            frames = []
            for t in getattr(self, k):
                rows = [r[:5] + [int(r[5]), self._name(r[5])] for r in t.tolist()]
                frames.append(pd.DataFrame(rows, columns=columns))
            setattr(new, k, frames)
        return new

    def tolist(self):
        """One Detections per image: `for r in results.tolist(): r.print()`."""
        times = tuple(t / max(self.n, 1) for t in self.times)
        shape = (1, *self.s[1:]) if self.s else None
        return [Detections([self.ims[i]], [self.pred[i]], [self.files[i]], times, self.names, shape)
                for i in range(self.n)]

    def print(self):
        """Log the per-image summary and the speed line."""
        LOGGER.info(str(self))

    def __len__(self):
        return self.n

    def __str__(self):
        lines = []
        for i, (im, p) in enumerate(zip(self.ims, self.pred)):
            s = f"image {i + 1}/{self.n}: {im.shape[0]}x{im.shape[1]} "
            if len(p):
                counts = [(self._name(c), int((p[:, 5] == c).sum())) for c in p[:, 5].unique()]
                s += ", ".join(f"{k} {name}{'s' * (k > 1)}" for name, k in counts)
            else:
                s += "(no detections)"
            lines.append(s)
        lines.append("Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image" % self.t +
                     (f" at shape {self.s}" if self.s else ""))
        return "\n".join(lines)

    def __repr__(self):
        return f"YOLOv5 {self.__class__} instance\n{self}"
