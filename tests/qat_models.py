"""Small QAT models for the export and integer-model tests: yolov5n prepared and calibrated on noise (small_qat), or
from the reference ReLU checkpoint on shapes images (qat_from_reference), saved as checkpoints and exported once per
configuration (exported)."""
from pathlib import Path

import numpy as np
import onnx
import torch
import torch.nn as nn
from conftest import ROOT, reference

import export
from models.checkpoint import save_checkpoint
from models.quant import QATConfig, calibrate, prepare_yolo_qat
from models.yolo import DetectionModel
from utils.dataloaders import LoadImages
from workflow.backend import load_pytorch_model

H, W = 64, 96  # non-square on purpose


def small_qat(act="relu", bn_folding=True, pow2=True, recipe=None, rounding="half_even"):
    """yolov5n (nc=10) prepared for QAT and calibrated on noise, in eval mode.

    BN statistics come from two noise batches first: with a fresh model's BN (mean 0, var 1) the activations shrink
    layer by layer to ~1e-7 at the head, where the int32 bias grid input_scale * weight_scale no longer holds the
    biases (onnxruntime's bias quantization then saturates)."""
    torch.manual_seed(0)
    model = DetectionModel(ROOT / "models/yolov5n.yaml", nc=10, act=act).train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = None  # cumulative average of the batches below
        for _ in range(2):
            model(torch.rand(2, 3, H, W))
    for bn in bns:
        bn.momentum = 0.03
    prepare_yolo_qat(model, QATConfig(bn_folding=bn_folding, pow2=pow2, recipe=recipe, rounding=rounding))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(0, 256, (2, 3, H, W), dtype=torch.uint8, generator=g),) for _ in range(2)]
    calibrate(model, batches, 2, torch.device("cpu"))
    return model.eval()


def save_qat(model, path):
    save_checkpoint({"model": model, "ema": None, "epoch": -1, "best_fitness": None}, path)
    return path


_CACHE = {}


def exported(tmp_path_factory, act="relu", bn_folding=True, pow2=True, recipe=None, **run_kw):
    """(fake-quant model as loaded from the checkpoint, onnx path, loaded proto), exported once per configuration."""
    key = (act, bn_folding, pow2, recipe, tuple(sorted(run_kw.items())))
    if key not in _CACHE:
        d = tmp_path_factory.mktemp(f"qat_{act}_{int(bn_folding)}_{int(pow2)}")
        pt = save_qat(small_qat(act, bn_folding, pow2, recipe), d / "qat.pt")
        run_kw.setdefault("include", ["onnx"])
        files = export.run(weights=pt, imgsz=(H, W), **run_kw)
        f = next(Path(x) for x in files if x.endswith(".onnx"))
        model = export.prepare_for_export(load_pytorch_model(pt))
        _CACHE[key] = model, f, onnx.load(str(f)), files
    return _CACHE[key]


def qat_from_reference(bn_folding, path):
    """The float ReLU reference checkpoint prepared for pow2 QAT and calibrated on 4 shapes val images."""
    model = load_pytorch_model(reference("yolov5n_relu.pt"), fuse=False).float().train()
    prepare_yolo_qat(model, QATConfig(bn_folding=bn_folding, pow2=True))
    src = sorted((ROOT / "datasets/shapes/images/val").glob("*.jpg"))[4:8]
    images = [im for _, im, *_ in LoadImages([str(s) for s in src], img_size=160, auto=False)]
    calibrate(model, [(torch.from_numpy(np.stack(images)),)], 1, torch.device("cpu"))
    return save_qat(model.eval(), path)
