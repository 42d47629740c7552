"""A trained, saved and reloaded power-of-two QAT checkpoint and its QDQ export compute the same integers.

The export of a QAT checkpoint once disagreed with the checkpoint on some runs and not on others: the PyTorch model
added its conv biases in float, so some conv outputs lay within a float rounding of a tie of the next quantizer, and
onnxruntime, summing in another order, rounded them to the other side; the difference then grew layer by layer.
Frozen models (bst freeze_qparams) add their bias on the int32 grid input_scale * weight_scale, where every sum is
exact. These tests train a few steps the way train.py does (observers on, EMA, checkpoint copy), save, reload, export,
and require 0 differing raw head outputs, for every observer kind, several seeds and thread counts.
"""
import pytest
import torch
import torch.nn as nn
from conftest import ROOT

import export
from models.checkpoint import save_checkpoint
from models.quant import QATConfig, calibrate, prepare_yolo_qat
from models.yolo import DetectionModel
from utils.general import yaml_load
from utils.loss import ComputeLoss
from utils.torch_utils import ModelEMA, smart_optimizer
from workflow.backend import load_pytorch_model
from workflow.exporters.verify import sample_batch, verify_onnx_qdq
from workflow.qat import checkpoint_copy

H, W = 96, 128


def _targets(g, bs=4, n=6):
    """(n*bs, 6) rows [image, class, x, y, w, h] (normalised)."""
    rows = []
    for i in range(bs):
        xy = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        cls = torch.randint(0, 10, (n, 1), generator=g).float()
        rows.append(torch.cat([torch.full((n, 1), float(i)), cls, xy, wh], 1))
    return torch.cat(rows)


def trained_qat_checkpoint(path, observer, seed, steps=4):
    """yolov5n (ReLU, nc=10) with BN statistics from noise, prepared (pow2, BN folding, `observer` for activations),
    calibrated, then trained `steps` optimizer steps with observers on and an EMA, saved as train.py saves."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = DetectionModel(ROOT / "models/yolov5n.yaml", nc=10, act="relu").train()
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for bn in bns:
            bn.momentum = None
        for _ in range(2):
            model(torch.rand(2, 3, H, W, generator=g))
    for bn in bns:
        bn.momentum = 0.03
    recipe = {"default": {"activation": {"observer": observer}}}
    prepare_yolo_qat(model, QATConfig(bn_folding=True, pow2=True, recipe=recipe))
    batches = [(torch.randint(0, 256, (4, 3, H, W), dtype=torch.uint8, generator=g),) for _ in range(2)]
    calibrate(model, batches, 2, torch.device("cpu"))
    model.hyp = yaml_load(ROOT / "data/hyps/hyp.qat.yaml")
    model.train()
    for m in model.modules():  # observers on while training, as --qat without --disable-observer-epoch
        if hasattr(m, "enable_observer"):
            m.enable_observer()
    ema = ModelEMA(model)
    optimizer = smart_optimizer(model, "SGD", lr=0.01, momentum=0.9, decay=5e-4)
    loss_fn = ComputeLoss(model)
    for _ in range(steps):
        imgs = torch.randint(0, 256, (4, 3, H, W), dtype=torch.uint8, generator=g).float() / 255
        loss, _ = loss_fn(model(imgs), _targets(g))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
    save_checkpoint({"epoch": -1, "best_fitness": None, "model": checkpoint_copy(model),
                     "ema": checkpoint_copy(ema.ema), "updates": ema.updates, "optimizer": None}, path)
    return path


@pytest.mark.parametrize("observer, seed, threads", [("mse", 0, 1), ("minmax", 3, 2), ("moving_average", 4, 1),
                                                    ("percentile", 5, 2)])
def test_trained_pow2_checkpoint_exports_bit_exactly(observer, seed, threads, tmp_path):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        pt = trained_qat_checkpoint(tmp_path / "qat.pt", observer, seed)
        (f,) = export.run(weights=pt, imgsz=(H, W), include=["onnx"])  # its own check must pass: exact for pow2
        model = export.prepare_for_export(load_pytorch_model(pt))
        for s in range(2):
            r = verify_onnx_qdq(model, f, sample_batch((1, 3, H, W), seed=10 + s))
            assert r["ok"] and r["raw_share_differ"] == 0.0, (observer, seed, threads, r["raw_share_differ"])
    finally:
        torch.set_num_threads(before)


def test_unfrozen_float_bias_is_what_broke_exactness(tmp_path):
    """The export holds the biases on the integer grid; the same model evaluated with its float biases (input
    scales unknown, as before freezing) computes other integers, and the exactness check tells."""
    from bst.torch.ao.nn.intrinsic.qat import ConvBn2d
    from bst.torch.ao.nn.qat.conv import set_input_scale

    pt = trained_qat_checkpoint(tmp_path / "qat.pt", "mse", 0)
    (f,) = export.run(weights=pt, imgsz=(H, W), include=["onnx"])
    model = export.prepare_for_export(load_pytorch_model(pt))
    frozen = verify_onnx_qdq(model, f, sample_batch((1, 3, H, W), seed=10))
    for m in model.modules():
        if isinstance(m, ConvBn2d):
            set_input_scale(m, None)
    loose = verify_onnx_qdq(model, f, sample_batch((1, 3, H, W), seed=10), check=False)
    assert frozen["raw_share_differ"] == 0.0
    assert loose["raw_share_differ"] > 0.0


def test_frozen_pow2_model_predictions_do_not_depend_on_the_batch(tmp_path):
    """Every image of a batch gets the same raw outputs alone or batched with others, padded as rect batches pad
    (114 grey): frozen power-of-two arithmetic is exact, so neither batch size nor neighbours change a prediction."""
    pt = trained_qat_checkpoint(tmp_path / "qat.pt", "mse", 7)
    model = load_pytorch_model(pt)
    g = torch.Generator().manual_seed(3)
    ims = torch.full((8, 3, H, W), 114 / 255)
    ims[:, :, 8:H - 8] = torch.randint(0, 256, (8, 3, H - 16, W), generator=g).float() / 255
    with torch.no_grad():  # raw head outputs (the Detect convs' quantized outputs), level by level
        together = model(ims)[1]
        alone = [model(ims[i:i + 1])[1] for i in range(8)]
        pairs = [model(ims[i:i + 2])[1] for i in range(0, 8, 2)]
    for level, t in enumerate(together):
        assert torch.equal(t, torch.cat([a[level] for a in alone]))
        assert torch.equal(t, torch.cat([p[level] for p in pairs]))
