"""PyTorch Hub entry points, as in upstream YOLOv5 v7.0.

Usage:
    import torch
    model = torch.hub.load('path/to/yolov5-qat', 'custom', path='runs/train/exp/weights/best.pt', source='local')
    model = torch.hub.load('path/to/yolov5-qat', 'yolov5s', source='local')  # weights/yolov5s.pt (fetched if missing)
    results = model('img.jpg')  # or a URL, PIL image, RGB numpy array, or a list of those; see workflow/hub.py
    results.print()
    results.pandas().xyxy[0]  # xmin ymin xmax ymax confidence class name
    results.save()  # runs/detect/exp*

`custom` loads anything detect.py loads: a float or QAT .pt checkpoint, a .torchscript or an .onnx file.
"""
import argparse as _argparse  # every name here starts with "_": torch.hub.list takes each public callable for
import logging as _logging  # an entry point
import pathlib as _pathlib
import sys as _sys

_ROOT = _pathlib.Path(__file__).resolve().parent
# torch.hub puts this folder on sys.path only while an entry point runs; the model imports more of the project later
if str(_ROOT) not in _sys.path[1:]:
    _sys.path.append(str(_ROOT))

from models.yolo import DetectionModel as _DetectionModel
from utils.general import LOGGER as _LOGGER
from utils.general import UserError as _UserError
from utils.general import intersect_dicts as _intersect_dicts
from utils.general import run_cli as _run_cli
from utils.torch_utils import select_device as _select_device
from workflow.backend import DetectMultiBackend as _DetectMultiBackend
from workflow.backend import load_pytorch_model as _load_pytorch_model
from workflow.hub import AutoShape as _AutoShape


def _create(name, pretrained=True, channels=3, classes=80, autoshape=True, verbose=True, device=None):
    """A YOLOv5 model by release name ('yolov5s': weights/yolov5s.pt) or weights path ('path/to/best.pt').

    pretrained with channels=3 and classes=80: the weights file through DetectMultiBackend (.pt, .torchscript, .onnx,
    an OpenVINO *_openvino_model folder), wrapped in AutoShape when autoshape (images in, Detections out; else the
    DetectMultiBackend itself). A release file missing from weights/ is downloaded; without a network that is one error
    saying where to put it.
    Other channels/classes, or pretrained=False: a DetectionModel built from models/<name>.yaml, with (pretrained) the
    checkpoint's weights of matching shape copied in, returned as it is (no AutoShape), as upstream.
    verbose=False: warnings only while loading. device: 'cpu', '0', 'cuda:0', a torch.device, None (CUDA if present).
    """
    level = _LOGGER.level
    if not verbose:
        _LOGGER.setLevel(_logging.WARNING)
    try:
        name = _pathlib.Path(str(name))
        path = name.with_suffix(".pt") if name.suffix == "" and not name.is_dir() else name
        device = _select_device("" if device is None else str(device))
        if pretrained and channels == 3 and classes == 80:
            model = _DetectMultiBackend(path, device=device, fuse=autoshape)
            return _AutoShape(model, verbose=verbose) if autoshape else model

        cfg = _ROOT / "models" / f"{path.stem}.yaml"
        if not cfg.is_file():
            known = ", ".join(sorted(p.stem for p in (_ROOT / "models").glob("*.yaml")))
            raise _UserError(f"{name}: no model yaml models/{path.stem}.yaml to build it with channels={channels}, "
                            f"classes={classes} (there are: {known}); a checkpoint of your own loads with custom()")
        model = _DetectionModel(cfg, ch=channels, nc=classes)
        if pretrained:
            source = _load_pytorch_model(path, device="cpu", fuse=False)
            state = _intersect_dicts(source.float().state_dict(), model.state_dict(), exclude=["anchors"])
            model.load_state_dict(state, strict=False)
            _LOGGER.info(f"Transferred {len(state)}/{len(model.state_dict())} items from {path}")
            if len(source.names) == classes:
                model.names = source.names
        return model.to(device)
    finally:
        _LOGGER.setLevel(level)


def custom(path="path/to/model.pt", autoshape=True, _verbose=True, device=None):
    """Your own weights: a train.py checkpoint (float or QAT), or an export.py .torchscript / .onnx file."""
    return _create(path, autoshape=autoshape, verbose=_verbose, device=device)


def yolov5n(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5n (nano): weights/yolov5n.pt, or models/yolov5n.yaml built with pretrained=False."""
    return _create("yolov5n", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5s(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5s (small): weights/yolov5s.pt, or models/yolov5s.yaml built with pretrained=False."""
    return _create("yolov5s", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5m(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5m (medium): weights/yolov5m.pt, or models/yolov5m.yaml built with pretrained=False."""
    return _create("yolov5m", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5l(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5l (large): weights/yolov5l.pt, or models/yolov5l.yaml built with pretrained=False."""
    return _create("yolov5l", pretrained, channels, classes, autoshape, _verbose, device)


def yolov5x(pretrained=True, channels=3, classes=80, autoshape=True, _verbose=True, device=None):
    """YOLOv5x (xlarge): weights/yolov5x.pt, or models/yolov5x.yaml built with pretrained=False."""
    return _create("yolov5x", pretrained, channels, classes, autoshape, _verbose, device)


if __name__ == "__main__":
    parser = _argparse.ArgumentParser(description="Load a model through the hub entry points and detect on images")
    parser.add_argument("--model", default="yolov5s", help="release name (yolov5n ... yolov5x) or weights path")
    parser.add_argument("--source", nargs="+", default=[str(_ROOT / "data/images/shapes1.jpg")], help="images")
    parser.add_argument("--size", type=int, default=640, help="inference size")
    opt = parser.parse_args()

    def _main(opt):
        results = _create(opt.model)(opt.source, size=opt.size)
        results.print()
        results.save()

    _run_cli(_main, opt)
