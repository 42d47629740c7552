"""train.py --qat end to end on a tiny subset of shapes: the seed's five flags, checkpoints, val.py
reproducing the training mAP, kill + resume, and one-line errors for bad flag combinations."""
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, reference, shapes_subset, start_and_kill_when

from bst.torch.ao.quantization import FakeQuantizeBase
from models.checkpoint import load_checkpoint
from models.quant import all_scales_pow2
from utils.general import yaml_load, yaml_save

ENV = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
FAST = ["--img", "128", "--batch-size", "8", "--workers", "0", "--noplots", "--calib-batches", "2",
        "--hyp", "data/hyps/hyp.qat.yaml"]
SEED_FLAGS = ["--qat", "--bn-folding", "--disable-observer-epoch", "0", "--freeze-bn-epoch", "0", "--pow2-scale"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shapes_subset(tmp_path_factory.mktemp("qat_shapes"), 16, 8)


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """Two batches of 4 per epoch: for the tests that run train.py three or four times."""
    return shapes_subset(tmp_path_factory.mktemp("qat_micro"), 8, 4, name="micro")


def _train(*args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _ok(r):
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    return r.stdout


def _one_line_error(r, *fragments):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and "Traceback" not in r.stdout, r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _rows(save):
    lines = (save / "results.csv").read_text().splitlines()[1:]
    return np.array([[float(x) for x in ln.split(",")] for ln in lines])


SHIPPED = ROOT / "weights" / "shapes_yolov5n_silu.pt"  # a trained shapes model: mAPs that are not ~0


def test_seed_command_pow2_everywhere_and_val_reproduces_training_map(tiny, tmp_path):
    parent = SHIPPED if SHIPPED.exists() else reference("yolov5n_relu.pt")
    out = _ok(_train("--data", tiny, "--weights", parent, "--act", "relu", *FAST, "--epochs", "2", *SEED_FLAGS,
                     "--project", tmp_path, "--name", "seed"))
    assert "PTQ (calibrated, before QAT training)" in out
    assert "epoch 0: BN statistics frozen, observers off (scales frozen)" in out
    weights = tmp_path / "seed" / "weights"
    for f in ("last.pt", "best.pt"):
        ck = load_checkpoint(weights / f)
        model = ck["model"]
        assert ck["epoch"] == -1 and ck["qat"]["config"].pow2 and ck["qat"]["config"].bn_folding
        assert all_scales_pow2(model) and any(isinstance(m, FakeQuantizeBase) for m in model.modules())
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # --bn-folding keeps BN live
        assert next(model.parameters()).dtype == torch.float32  # QAT checkpoints are not rounded to FP16

    import val
    rows = _rows(tmp_path / "seed")
    best = rows[np.argmax(0.1 * rows[:, 6] + 0.9 * rows[:, 7])]
    r, _, _ = val.run(data=str(tiny), weights=str(weights / "best.pt"), imgsz=128, batch_size=16, workers=0,
                      device="cpu", plots=False, project=str(tmp_path), name="val")
    assert round(r[2], 4) == round(best[6], 4) and round(r[3], 4) == round(best[7], 4)
    if SHIPPED.exists():
        assert r[2] > 0.01  # a real detector, so the equality above is not 0 == 0


def test_bn_and_observer_schedules_from_epoch_1(tiny, tmp_path):
    _ok(_train("--data", tiny, "--weights", reference("yolov5n_relu.pt"), "--cfg", "yolov5n.yaml", *FAST,
               "--epochs", "3", "--qat", "--bn-folding", "--pow2-scale", "--freeze-bn-epoch", "1",
               "--disable-observer-epoch", "1", "--save-period", "1", "--project", tmp_path, "--name", "sched"))
    w = tmp_path / "sched" / "weights"
    states = [load_checkpoint(w / f"epoch{e}.pt")["model"].state_dict() for e in (0, 1, 2)]
    frozen = [k for k in states[0] if k.endswith(("running_mean", "running_var", ".scale", ".zero_point"))]
    assert len(frozen) > 100
    for k in frozen:  # state at the end of epoch 0 is what epochs 1 and 2 keep
        assert torch.equal(states[0][k], states[1][k]) and torch.equal(states[1][k], states[2][k]), k
    weights_moved = [k for k in states[0] if k.endswith("conv.weight") and not torch.equal(states[1][k], states[2][k])]
    assert weights_moved, "training goes on while BN and scales are frozen"


def test_without_bn_folding_there_is_no_bn(tiny, tmp_path):
    out = _ok(_train("--data", tiny, "--weights", reference("yolov5n_relu.pt"), "--cfg", "yolov5n.yaml", *FAST,
                     "--epochs", "1", "--qat", "--qat-recipe", "data/quant/shared_concat.yaml",
                     "--disable-observer-epoch", "0", "--project", tmp_path, "--name", "nobn"))
    assert re.search(r"concat inputs and outputs share one scale in [1-9]\d* groups", out)
    model = load_checkpoint(tmp_path / "nobn" / "weights" / "best.pt")["model"]
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert any(isinstance(m, FakeQuantizeBase) for m in model.modules())


@pytest.mark.parametrize("args, fragments", [
    (["--bn-folding"], ["--bn-folding", "add --qat"]),
    (["--pow2-scale", "--freeze-bn-epoch", "0"], ["--pow2-scale", "--freeze-bn-epoch 0", "add --qat"]),
    (["--qat", "--qat-recipe", "RECIPE"], ["names no module"]),
])
def test_bad_combinations_one_line(tiny, tmp_path, args, fragments):
    recipe = tmp_path / "bad.yaml"
    yaml_save(recipe, {"rules": [{"match": "model.31", "mode": "float"}]})
    args = [str(recipe) if a == "RECIPE" else a for a in args]
    _one_line_error(_train("--data", tiny, "--cfg", "yolov5n.yaml", "--weights", "", *FAST, "--epochs", "1", *args,
                           "--project", tmp_path), *fragments)


def test_qat_with_silu_warns(tiny, tmp_path):
    import logging
    from argparse import Namespace

    from utils.general import LOGGER
    from workflow.qat import check_qat_flags

    seen = []
    h = logging.Handler()
    h.emit = lambda rec: seen.append(rec.getMessage())
    LOGGER.addHandler(h)
    try:
        check_qat_flags(Namespace(qat=True, act="silu", calib_batches=4))
    finally:
        LOGGER.removeHandler(h)
    assert any("SiLU" in m and "--act relu" in m for m in seen)


def test_ddp_qat_two_cpu_ranks_hold_identical_quantizer_state(tiny, tmp_path):
    import socket

    import train

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dump = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(ROOT / "train.py"), "--device", "cpu", "--data", str(tiny),
           "--weights", str(reference("yolov5n_relu.pt")),
           "--cfg", "yolov5n.yaml", *FAST, "--epochs", "1", "--qat", "--bn-folding", "--pow2-scale",
           "--project", str(tmp_path), "--name", "ddp"]
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, train.DDP_DUMP_ENV: str(dump)}, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    b0, b1 = (torch.load(dump / f"rank{i}_buffers.pt") for i in (0, 1))
    scales = [k for k in b0 if k.endswith(".scale")]
    assert len(scales) > 100 and b0.keys() == b1.keys()
    assert all(torch.equal(b0[k], b1[k]) for k in b0), [k for k in b0 if not torch.equal(b0[k], b1[k])][:5]
    p0, p1 = (torch.load(dump / f"rank{i}.pt") for i in (0, 1))
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    assert all_scales_pow2(load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")["model"])


def test_continuing_a_qat_checkpoint_keeps_its_own_quantization(micro, tmp_path):
    """--weights <QAT .pt>: the model keeps how it was quantized and the checkpoint records that; flags that would
    change it are reported; a dataset with another class count is refused in one line (the head is quantized)."""
    _ok(_train("--data", micro, "--weights", reference("yolov5n_relu.pt"), "--cfg", "yolov5n.yaml", *FAST, "--epochs",
               "1", *SEED_FLAGS, "--project", tmp_path, "--name", "first"))
    qat_pt = tmp_path / "first" / "weights" / "best.pt"
    r = _train("--data", micro, "--weights", qat_pt, *FAST, "--epochs", "1", "--qat", "--project", tmp_path,
               "--name", "again")
    out = _ok(r)
    assert "--pow2-scale False" in out + r.stderr and "--bn-folding False" in out + r.stderr
    config = load_checkpoint(tmp_path / "again" / "weights" / "best.pt")["qat"]["config"]
    assert config.pow2 is True and config.bn_folding is True  # the model's, not the command line's

    three = tmp_path / "three.yaml"
    data = yaml_load(micro)
    yaml_save(three, {**data, "names": ["a", "b", "c"]})
    _one_line_error(_train("--data", three, "--weights", qat_pt, *FAST, "--epochs", "1", "--qat", "--project",
                           tmp_path), "10 classes", "3 classes", "start QAT from the float model")


def _unshared_concats(model):
    """Names of concats whose inputs and output do not all hold one scale."""
    from bst.torch.ao.nn.quantized import FloatFunctional
    from bst.torch.ao.quantization import trace_input_quantizers

    inputs = trace_input_quantizers(model, (torch.zeros(1, 3, 64, 64),))
    bad = []
    for name, m in model.named_modules():
        op = getattr(m, "qcat", None)
        if isinstance(op, FloatFunctional):
            scales = {float(q.scale) for q in inputs.get(op, []) if q is not None}
            if len(scales | {float(op.activation_post_process.scale)}) > 1:
                bad.append(name)
    return bad


def _carried_state(path):
    """What a run carries from one epoch into the next: weights with every quantizer buffer (scales, observer and
    tracking state, BN statistics), the EMA and its update count, the optimizer and gradient accumulation."""
    ckpt = load_checkpoint(path)
    return {"model": ckpt["model"].state_dict(), "ema": ckpt["ema"].state_dict(), "updates": ckpt["updates"],
            "optimizer": ckpt["optimizer"], "last_opt_step": ckpt["last_opt_step"]}


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}/{i}")
    else:
        assert a == b, where


@pytest.mark.parametrize("recipe", ["default", "shared_concat"])
def test_resumed_run_equals_the_uninterrupted_run(micro, tmp_path, recipe):
    """Killed in the middle of epoch 1 (where the observers stop), or stopped at the boundary after epoch 0, and
    resumed (with another number of dataloader workers), a QAT run ends with exactly the state of the run that was
    never interrupted: model, quantizer buffers, EMA, optimizer. With shared concat scales the sharing, which needs
    no calibration batch, holds after the resume."""
    args = ["--data", micro, "--weights", reference("yolov5n_relu.pt"), "--cfg", "yolov5n.yaml", *FAST,
            "--batch-size", "4", "--epochs", "2", "--qat", "--pow2-scale", "--disable-observer-epoch", "1",
            "--save-period", "1", "--project", tmp_path]
    if recipe == "shared_concat":
        args += ["--qat-recipe", "data/quant/shared_concat.yaml"]
    whole = tmp_path / "whole"
    _ok(_train(*args, "--name", "whole", "--workers", "2"))

    boundary = tmp_path / "boundary"  # the run as it stood when epoch 0 had been saved
    shutil.copytree(whole, boundary)
    for f in (boundary / "weights").glob("*.pt"):
        f.unlink()
    shutil.copy(whole / "weights" / "epoch0.pt", boundary / "weights" / "last.pt")
    _ok(_train("--resume", boundary / "weights" / "last.pt", "--workers", "0"))

    killed, log = tmp_path / "killed", tmp_path / "killed.log"
    start_and_kill_when([sys.executable, str(ROOT / "train.py"), *map(str, args), "--name", "killed"], log,
                        lambda text: (killed / "weights" / "last.pt").exists()
                        and re.search(r"\s1/1\s+[\d.]+G\s", text) is not None, ENV)
    before = load_checkpoint(killed / "weights" / "last.pt")
    out = _ok(_train("--resume", killed / "weights" / "last.pt", "--workers", "0"))
    assert "Continuing the QAT model" in out and "observers off (scales frozen)" in out
    assert "PTQ" not in out  # a resumed run is not calibrated again

    expected = _carried_state(whole / "weights" / "epoch1.pt")
    for run in (boundary, killed):
        assert [row[0] for row in _rows(run)] == [0, 1]
        _assert_same(_carried_state(run / "weights" / "epoch1.pt"), expected, run.name)
    np.testing.assert_array_equal(_rows(killed), _rows(whole))  # the same losses and mAPs, epoch by epoch

    model = load_checkpoint(killed / "weights" / "last.pt")["model"]
    assert all_scales_pow2(model) \
        and load_checkpoint(killed / "weights" / "last.pt")["qat"]["schedule"]["disable_observer_epoch"] == 1
    scales = {k: v for k, v in before["model"].state_dict().items() if k.endswith(".scale")}
    if recipe == "default":  # observers off from epoch 1: the scales of epoch 0 are kept exactly
        assert all(torch.equal(v, expected["model"][k]) for k, v in scales.items())
    else:
        assert re.search(r"share one scale in [1-9]\d* groups", out)
        assert _unshared_concats(model) == []


def test_rounding_half_up_trains(micro, tmp_path):
    """--rounding half_up: every quantizer of the trained checkpoint rounds half up and the QAT metadata says so
    (tests/models/test_integer_model.py: such a model's integer export and the ONNX refusal)."""
    out = _ok(_train("--data", micro, "--weights", reference("yolov5n_relu.pt"), "--cfg", "yolov5n.yaml", *FAST,
                     "--epochs", "1", *SEED_FLAGS, "--rounding", "half_up", "--project", tmp_path, "--name", "up"))
    assert "rounding=half_up" in out
    ckpt = load_checkpoint(tmp_path / "up" / "weights" / "best.pt")
    assert ckpt["model"].qat_config.rounding == "half_up" == ckpt["qat"]["config"].rounding
    assert {m.rounding for m in ckpt["model"].modules() if isinstance(m, FakeQuantizeBase)} == {"half_up"}
