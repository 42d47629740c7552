"""train.py end to end on a tiny subset of shapes (16 train / 8 val images at 128 px, batch 8: two batches an epoch).

Covers the run folder and checkpoint format, SiLU -> ReLU retraining, SIGKILL + --resume, the atomic checkpoint
write, non-finite losses, DDP with gloo on CPU, and one-line errors for bad input.
"""
import math
import os
import re
import signal
import socket
import subprocess
import sys
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
from conftest import ROOT, reference, shapes_subset, start_and_kill_when

import train
from models.checkpoint import load_checkpoint
from models.common import Conv
from utils.general import UserError, run_cli, yaml_load, yaml_save

UPSTREAM_CKPT_KEYS = {"epoch", "best_fitness", "model", "ema", "updates", "optimizer", "opt", "git", "date"}
# this project's additions: QAT settings (None for a float model), and in a checkpoint a run can be resumed from,
# where gradient accumulation stood (a resumed run steps the optimizer on the same batches as an uninterrupted one)
PROJECT_CKPT_KEYS = {"qat"}
RESUME_CKPT_KEYS = {"last_opt_step"}
UPSTREAM_COLUMNS = ["epoch", "train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision",
                    "metrics/recall", "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss",
                    "val/cls_loss", "x/lr0", "x/lr1", "x/lr2"]
FAST = ["--img", "128", "--batch-size", "8", "--workers", "0"]
# one thread per process: with 2 shared cores, OpenMP threads spinning against other processes make CPU training
# many times slower (a 1-epoch run took 89 s with 2 threads and 10 s with 1 under load)
ENV = {**os.environ, "NO_COLOR": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def subsets(tmp_path_factory):
    """Dataset yamls over the first images of shapes: 'tiny' 16 train / 8 val, 'kill' 48 train / 8 val."""
    d = tmp_path_factory.mktemp("shapes_subset")
    return {name: shapes_subset(d, n, 8, name) for name, n in (("tiny", 16), ("kill", 48))}


def _cli(*args, timeout=240):
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *map(str, args)], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


def _one_line_error(r, *fragments):
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: "), r.stderr
    assert "Traceback" not in r.stdout + r.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def _results(save_dir):
    lines = (save_dir / "results.csv").read_text().splitlines()
    header = [c.strip() for c in lines[0].split(",")]
    rows = [[float(x) for x in ln.split(",")] for ln in lines[1:]]
    return header, rows


def _finite(module):
    return all(torch.isfinite(t.float()).all() for t in module.state_dict().values() if t.is_floating_point())


def test_one_epoch_run_folder_and_checkpoints(subsets, tmp_path, yolo_log):
    opt = train.run(data=str(subsets["tiny"]), cfg="yolov5n.yaml", weights="", imgsz=128, batch_size=8,
                    workers=0, epochs=1, save_period=1, project=str(tmp_path), name="one")
    results, save = opt.metrics, tmp_path / "one"  # as upstream, run() returns the options; metrics ride along
    assert opt.save_dir == str(save) and opt.epochs == 1
    assert len(results) == 7 and not any(math.isnan(x) for x in results)  # P, R, mAP50, mAP, 3 val losses

    # the unstripped per-epoch checkpoint carries every upstream key with real content
    ck = load_checkpoint(save / "weights" / "epoch0.pt")
    assert set(ck) == UPSTREAM_CKPT_KEYS | PROJECT_CKPT_KEYS | RESUME_CKPT_KEYS and ck["qat"] is None
    assert ck["last_opt_step"] == 1
    assert ck["epoch"] == 0 and isinstance(ck["best_fitness"], float)
    assert isinstance(ck["model"], nn.Module) and isinstance(ck["ema"], nn.Module)
    assert next(ck["model"].parameters()).dtype == torch.float16
    # 2 batches; warmup starts with accumulate=1, so both batches step the optimizer and the EMA
    assert ck["updates"] == 2
    assert len(ck["optimizer"]["param_groups"]) == 3 and ck["optimizer"]["state"]
    assert ck["opt"]["epochs"] == 1 and ck["opt"]["imgsz"] == 128 and isinstance(ck["opt"]["hyp"], dict)
    assert isinstance(ck["date"], str)
    assert set(ck["git"]) == {"remote", "branch", "commit"} and len(ck["git"]["commit"]) == 40  # a git checkout
    assert _finite(ck["model"]) and _finite(ck["ema"])
    assert ck["model"].yaml["activation"] == "silu"  # recorded even when nobody asked for one

    # last.pt / best.pt are stripped: EMA as model, epoch -1, no optimizer
    for f in ("last.pt", "best.pt"):
        ck = load_checkpoint(save / "weights" / f)
        assert set(ck) == UPSTREAM_CKPT_KEYS | PROJECT_CKPT_KEYS
        assert ck["epoch"] == -1 and ck["optimizer"] is None and ck["ema"] is None and ck["updates"] is None
        assert all(not p.requires_grad for p in ck["model"].parameters())
    assert not list((save / "weights").glob(".*.tmp"))

    header, rows = _results(save)
    assert header == UPSTREAM_COLUMNS
    assert len(rows) == 1 and rows[0][0] == 0
    lr0, lr1, lr2 = rows[0][11:]  # warmup after 2 of 100 iterations: bias lr falls from 0.1, weights rise from 0
    assert lr0 == pytest.approx(0.1 + (0.01 - 0.1) * 1 / 100, rel=1e-3)
    assert lr1 == lr2 == pytest.approx(0.01 * 1 / 100, rel=1e-3)

    assert yaml_load(save / "hyp.yaml")["lr0"] == 0.01
    opt = yaml_load(save / "opt.yaml")
    assert opt["epochs"] == 1 and opt["batch_size"] == 8 and opt["save_dir"] == str(save)
    for f in ("labels.jpg", "train_batch0.jpg", "train_batch1.jpg", "results.png"):
        assert (save / f).stat().st_size > 1000, f
    log = "\n".join(yolo_log)
    assert "Starting training for 1 epochs..." in log and "Optimizer stripped from" in log

    # a new run in the same folder (--exist-ok) starts its own results.csv; the previous one is kept beside it
    before = (save / "results.csv").read_text()
    train.run(data=str(subsets["tiny"]), cfg="yolov5n.yaml", weights="", imgsz=128, batch_size=8, workers=0,
              epochs=1, noplots=True, project=str(tmp_path), name="one", exist_ok=True)
    assert [r[0] for r in _results(save)[1]] == [0]
    assert (save / "results.previous.csv").read_text() == before


def test_retrain_silu_checkpoint_with_relu(subsets, tmp_path, yolo_log):
    import val
    from models.experimental import attempt_load
    from workflow.backend import DetectMultiBackend

    src = reference("yolov5n_silu.pt")
    train.run(data=str(subsets["tiny"]), weights=str(src), act="relu", hyp="data/hyps/hyp.m-relu-tune.yaml",
              imgsz=128, batch_size=8, workers=0, epochs=1, noplots=True, project=str(tmp_path), name="relu")
    save = tmp_path / "relu"
    m = re.search(r"Transferred (\d+)/(\d+) items from (\S+) \(activation silu -> relu\)", "\n".join(yolo_log))
    assert m, yolo_log
    n, total = int(m[1]), int(m[2])
    assert total == len(train.DetectionModel("yolov5n.yaml", nc=10).state_dict())
    assert n == total - 6  # all but the 3 Detect conv weights and biases (80 -> 10 classes change their shape)

    ck = load_checkpoint(save / "weights" / "last.pt")
    assert ck["model"].yaml["activation"] == "relu" and ck["opt"]["act"] == "relu"
    assert yaml_load(save / "hyp.yaml")["lr0"] == 0.001 and yaml_load(save / "hyp.yaml")["warmup_bias_lr"] == 0.01

    def acts(model):
        return {type(mod.act) for mod in model.modules() if isinstance(mod, Conv)}

    assert acts(ck["model"]) == {nn.ReLU}
    assert acts(attempt_load(save / "weights" / "best.pt")) == {nn.ReLU}
    assert acts(DetectMultiBackend(save / "weights" / "best.pt").model) == {nn.ReLU}  # what val.py/detect.py load
    r, _, _ = val.run(data=str(subsets["tiny"]), weights=str(save / "weights" / "best.pt"), imgsz=128,
                      batch_size=8, workers=0, device="cpu", plots=False, project=str(tmp_path), name="val")
    assert len(r) == 7 and 0 <= r[2] <= 1


def test_sigkill_mid_epoch_then_resume(subsets, tmp_path):
    """48 images at batch 4 (12 batches an epoch), 3 epochs; killed once epoch 1 has started."""
    save = tmp_path / "kill"
    log = tmp_path / "kill.log"
    cmd = [sys.executable, str(ROOT / "train.py"), "--data", str(subsets["kill"]), "--cfg", "yolov5n.yaml",
           "--weights", "", "--img", "128", "--batch-size", "4", "--workers", "0", "--epochs", "3", "--noplots",
           "--project", str(tmp_path), "--name", "kill"]
    start_and_kill_when(cmd, log, lambda text: (save / "weights" / "last.pt").exists()
                        and re.search(r"\s1/2\s+[\d.]+G\s", text) is not None, ENV)

    ck = load_checkpoint(save / "weights" / "last.pt")  # complete, loadable, not stripped
    assert ck["epoch"] in (0, 1) and ck["optimizer"] is not None
    killed_at = ck["epoch"]

    r = _cli("--resume", save / "weights" / "last.pt", "--workers", "0")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"Resuming training from {save / 'weights' / 'last.pt'} from epoch {killed_at + 1} to 3" in r.stdout
    header, rows = _results(save)
    assert header == UPSTREAM_COLUMNS and [row[0] for row in rows] == [0, 1, 2]
    assert load_checkpoint(save / "weights" / "last.pt")["epoch"] == -1

    _one_line_error(_cli("--resume", save / "weights" / "last.pt"), "finished", "nothing to resume")


_DIE_DURING_SAVE = """
import io, os, signal, sys
import torch
sys.path.insert(0, {root!r})
real_save = torch.save

def save_then_die_halfway(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and obj.get("epoch") == 1:  # epoch 1's last.pt: write half of it, then SIGKILL
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)

torch.save = save_then_die_halfway
import train
from utils.general import run_cli
run_cli(train.main, train.parse_opt(sys.argv[1:]))
"""


def test_kill_during_checkpoint_write_keeps_last_pt(subsets, tmp_path, monkeypatch):
    driver = tmp_path / "die_during_save.py"
    driver.write_text(_DIE_DURING_SAVE.format(root=str(ROOT)))
    save = tmp_path / "atomic"
    r = subprocess.run([sys.executable, str(driver), "--data", str(subsets["tiny"]), "--cfg", "yolov5n.yaml",
                        "--weights", "", *FAST, "--epochs", "3", "--noplots", "--project", str(tmp_path),
                        "--name", "atomic"], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == -signal.SIGKILL, r.stdout[-3000:] + r.stderr[-3000:]
    partial = list((save / "weights").glob(".last.pt.*.tmp"))
    assert len(partial) == 1  # the interrupted write went to a temporary file...
    with pytest.raises(UserError, match="corrupt"):
        load_checkpoint(partial[0])  # ...which is truncated
    ck = load_checkpoint(save / "weights" / "last.pt")  # ...while last.pt is epoch 0's, whole
    assert ck["epoch"] == 0 and _finite(ck["model"])

    # resume restores the live model (not the EMA), the EMA, the optimizer, the epoch and the best fitness
    seen = {}
    build_model, resume_state = train.build_model, train.resume_state

    def spy_build(*args):
        model, ckpt = build_model(*args)
        seen["model"] = {k: v.clone() for k, v in model.state_dict().items()}
        return model, ckpt

    def spy_resume(ckpt, optimizer, ema, weights, epochs):
        out = resume_state(ckpt, optimizer, ema, weights, epochs)
        seen.update(out=out, optimizer=deepcopy(optimizer.state_dict()), updates=ema.updates,
                    ema={k: v.clone() for k, v in ema.ema.state_dict().items()})
        return out

    monkeypatch.setattr(train, "build_model", spy_build)
    monkeypatch.setattr(train, "resume_state", spy_resume)
    train.run(resume=str(save / "weights" / "last.pt"), workers=0)
    saved_model, saved_ema = ck["model"].float().state_dict(), ck["ema"].float().state_dict()
    assert all(torch.equal(seen["model"][k], saved_model[k]) for k in saved_model)
    assert not all(torch.equal(saved_ema[k], saved_model[k]) for k in saved_model)
    assert all(torch.equal(seen["ema"][k], saved_ema[k]) for k in saved_ema)
    assert seen["updates"] == ck["updates"] == 2
    assert seen["out"] == (ck["best_fitness"], 1, 3)
    momentum = [st["momentum_buffer"] for st in seen["optimizer"]["state"].values()]
    assert len(momentum) == len(ck["optimizer"]["state"]) > 0
    assert all(torch.equal(a, b["momentum_buffer"]) for a, b in zip(momentum, ck["optimizer"]["state"].values()))
    assert not list((save / "weights").glob(".*.tmp"))
    assert [row[0] for row in _results(save)[1]] == [0, 1, 2]
    assert load_checkpoint(save / "weights" / "last.pt")["epoch"] == -1


def test_nonfinite_loss_stops_with_last_good_checkpoint(subsets, tmp_path, monkeypatch):
    calls = []

    class LossGoesNaN(train.ComputeLoss):
        def __call__(self, p, targets):
            loss, items = super().__call__(p, targets)
            if torch.is_grad_enabled():  # training batches only, not val.run's loss
                calls.append(1)
                if len(calls) > 2:  # epoch 0 has 2 batches; epoch 1 batch 0 diverges
                    loss = loss * float("nan")
            return loss, items

    monkeypatch.setattr(train, "ComputeLoss", LossGoesNaN)
    save = tmp_path / "nan"
    with pytest.raises(UserError, match=r"non-finite loss .* at epoch 1 batch 0; stopped") as e:
        train.run(data=str(subsets["tiny"]), cfg="yolov5n.yaml", weights="", imgsz=128, batch_size=8,
                  workers=0, epochs=3, noplots=True, project=str(tmp_path), name="nan")
    last = save / "weights" / "last.pt"
    assert f"lower lr0 in --hyp and continue from it with --weights {last} (--resume keeps the run's " in str(e.value)
    ck = load_checkpoint(last)
    assert ck["epoch"] == 0 and ck["optimizer"] is not None and _finite(ck["model"]) and _finite(ck["ema"])
    assert [row[0] for row in _results(save)[1]] == [0]


def test_absurd_learning_rate_stops_cleanly(subsets, tmp_path):
    hyp = yaml_load(ROOT / "data/hyps/hyp.scratch-low.yaml")
    hyp["lr0"] = 1e30
    yaml_save(tmp_path / "hyp.lr1e30.yaml", hyp)
    r = _cli("--data", subsets["tiny"], "--cfg", "yolov5n.yaml", "--weights", "", *FAST, "--epochs", "3",
             "--noplots", "--hyp", tmp_path / "hyp.lr1e30.yaml", "--project", tmp_path, "--name", "lr")
    # the first update at lr ~1e28 already overflows the weights: epoch 0 is refused a checkpoint (upstream would
    # have saved infinities as last.pt) and the next batch's loss is never reached
    _one_line_error(r, "non-finite weights after epoch 0", "not written yet; lower lr0 in --hyp and start again")
    assert not (tmp_path / "lr" / "weights" / "last.pt").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_cpu_ranks_end_identical(subsets, tmp_path):
    dump = tmp_path / "ranks"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "train.py"), "--device", "cpu", "--data", str(subsets["tiny"]), "--cfg", "yolov5n.yaml",
           "--weights", "", *FAST, "--epochs", "1", "--noplots", "--sync-bn", "--project", str(tmp_path),
           "--name", "ddp"]
    r = subprocess.run(cmd, cwd=ROOT, env={**ENV, train.DDP_DUMP_ENV: str(dump)}, capture_output=True, text=True,
                       timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "--sync-bn needs CUDA devices; ignored on CPU" in r.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "ranks"]  # one run folder, named by rank 0
    assert load_checkpoint(tmp_path / "ddp" / "weights" / "last.pt")["epoch"] == -1
    r0, r1 = (torch.load(dump / f"rank{i}.pt") for i in (0, 1))
    assert r0.keys() == r1.keys() and len(r0) == len(list(train.DetectionModel("yolov5n.yaml", nc=10).parameters()))
    # ranks start from different seeds and see different images: only DDP's broadcast and gradient all-reduce
    # can make them agree, bit for bit
    assert all(torch.equal(r0[k], r1[k]) for k in r0)
    b0, b1 = (torch.load(dump / f"rank{i}_buffers.pt") for i in (0, 1))  # BN statistics, re-broadcast each epoch
    assert b0.keys() == b1.keys() and any("running_mean" in k for k in b0)
    assert all(torch.equal(b0[k], b1[k]) for k in b0)


def test_bad_input_one_line_exit_2(subsets, tmp_path, monkeypatch, capsys):
    _one_line_error(_cli("--data", tmp_path / "missing.yaml", "--cfg", "yolov5n.yaml", "--weights", ""), "missing.yaml",
                    "not found")

    def in_process(*args):
        args = args if "--weights" in args or "--resume" in args else ("--weights", "", *args)  # not yolov5s.pt
        with pytest.raises(SystemExit) as e:
            run_cli(train.main, train.parse_opt(list(map(str, args))))
        err = capsys.readouterr().err.strip().splitlines()
        assert e.value.code == 2 and len(err) == 1 and err[0].startswith("ERROR: "), err
        return err[0]

    assert "missing.pt: weights file not found" in in_process("--data", subsets["tiny"], "--weights",
                                                              tmp_path / "missing.pt", "--project", tmp_path)
    assert "no last.pt found" in in_process("--resume", "--project", tmp_path / "no_runs_here")
    assert "--evolve 0: the number of generations must be >= 1" in in_process("--evolve", "0", "--data",
                                                                               subsets["tiny"], "--cfg",
                                                                               "yolov5n.yaml")
    bad_hyp = tmp_path / "hyp.yaml"
    bad_hyp.write_text("lr0: 0.01\n")
    assert "missing lrf" in in_process("--data", subsets["tiny"], "--cfg", "yolov5n.yaml", "--hyp", bad_hyp,
                                       "--project", tmp_path, "--name", "badhyp")
    for flags, message in ((["--batch-size", "0"], "--batch-size 0: must be an integer >= 1"),
                           (["--batch-size", "-3"], "--batch-size -3: must be an integer >= 1"),
                           (["--epochs", "0"], "--epochs 0: must be an integer >= 1"),
                           (["--batch-size", "-1", "--device", "cpu"], "--batch-size -1 (AutoBatch) measures CUDA "
                                                                       "memory and needs a CUDA --device"),
                           (["--imgsz", "0"], "--imgsz 0: must be an integer >= 1"),
                           (["--imgsz", "-32"], "--imgsz -32: must be an integer >= 1"),
                           (["--imgsz", "100000"], "--imgsz 100000: each size must be at most 8192 pixels"),
                           (["--qat", "--freeze-bn-epoch", "-5"], "--freeze-bn-epoch -5: must be an epoch index >= 0"),
                           (["--disable-observer-epoch", "-2"], "--disable-observer-epoch -2: must be an epoch")):
        assert message in in_process("--data", subsets["tiny"], "--cfg", "yolov5n.yaml", "--act", "relu",
                                     *flags, "--project", tmp_path, "--name", "badflag")
    assert not (tmp_path / "badflag").exists()
    bad_recipe = tmp_path / "recipe.yaml"
    bad_recipe.write_text("default:\n  activation: {observer: percentile, percentile: 150}\n")
    assert "recipe.yaml: default: percentile observer: percentile=150 must be in (50, 100]" in in_process(
        "--data", subsets["tiny"], "--cfg", "yolov5n.yaml", "--act", "relu", "--qat", "--qat-recipe", bad_recipe,
        "--project", tmp_path, "--name", "badrecipe")
    from utils.general import claim_run_folder

    with claim_run_folder(tmp_path / "busy"):  # another run holds the folder: this one stops before any work
        assert "busy: another training run" in in_process("--data", subsets["tiny"], "--cfg", "yolov5n.yaml",
                                                          "--project", tmp_path, "--name", "busy", "--exist-ok")
    assert not (tmp_path / "busy" / "weights").exists()
    (tmp_path / "dirlast" / "weights" / "last.pt").mkdir(parents=True)  # refused before the first epoch
    assert "last.pt: is a folder, but a checkpoint file is written there; remove or rename it" in in_process(
        "--data", subsets["tiny"], "--cfg", "yolov5n.yaml", "--project", tmp_path, "--name", "dirlast",
        "--exist-ok")
    (tmp_path / "a_file").write_text("")
    assert "cannot write the run folder (Not a directory); choose a writable --project" in in_process(
        "--data", subsets["tiny"], "--cfg", "yolov5n.yaml", "--project", tmp_path / "a_file" / "runs")
    monkeypatch.setattr(train, "LOCAL_RANK", 0)  # as under torchrun with 2 processes, checked before any DDP setup
    monkeypatch.setattr(train, "WORLD_SIZE", 2)
    assert "multiple of WORLD_SIZE 2" in in_process("--data", subsets["tiny"], "--cfg", "yolov5n.yaml",
                                                    "--batch-size", "5")


def test_upstream_quickstart_without_network_says_where_to_put_weights_and_data(tmp_path):
    """`python train.py --data coco128.yaml --epochs 3` as upstream's README has it: the defaults are yolov5s.pt and
    coco128.yaml; with no network (a proxy that refuses, so the test never downloads) one line names both."""
    env = {**ENV, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9", "NO_PROXY": ""}
    r = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data", "coco128.yaml", "--epochs", "3",
                        "--project", str(tmp_path)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    dataset = [] if (ROOT.parent / "datasets" / "coco128" / "images" / "train2017").is_dir() else [  # present: no fetch
        "coco128.yaml: could not download https://ultralytics.com/assets/coco128.zip", "fetch it by hand into"]
    _one_line_error(r, "yolov5s.pt: weights not found", f"put it in {ROOT / 'weights'}", *dataset)
    assert not list(tmp_path.glob("exp*"))


def test_evolve_mutates_records_and_continues(subsets, tmp_path):
    """--evolve 2: two whole runs, the first with the --hyp yaml as given, the second mutated from it; evolve.csv
    holds both, hyp_evolve.yaml the better one; started again with --exist-ok the search continues."""
    from workflow.evolve import METRICS, read_history

    kw = dict(data=str(subsets["tiny"]), cfg="yolov5n.yaml", weights="", imgsz=64, batch_size=8, workers=0,
              epochs=1, project=str(tmp_path), name="ev", hyp="data/hyps/hyp.scratch-low.yaml")
    opt = train.run(**kw, evolve=2)
    save = tmp_path / "ev"
    base = yaml_load(ROOT / "data/hyps/hyp.scratch-low.yaml")
    keys = [k for k, v in base.items() if isinstance(v, (int, float))]
    history = read_history(save / "evolve.csv", keys)
    assert history.shape == (2, len(METRICS) + len(keys))
    first, second = (dict(zip(keys, row[len(METRICS):])) for row in history)
    assert first == pytest.approx({k: base[k] for k in keys}, rel=1e-4)
    changed = [k for k in keys if second[k] != pytest.approx(first[k], rel=1e-4)]
    assert changed and "fliplr" not in changed and second["copy_paste"] == 0  # gain-0 genes never move
    best = yaml_load(save / "hyp_evolve.yaml")
    assert set(best) == set(base) and (save / "evolve.png").stat().st_size > 1000
    from utils.metrics import fitness

    assert opt.metrics == pytest.approx(tuple(history[int(fitness(history).argmax()), :7]))  # the best generation's
    train.run(**kw, evolve=1, exist_ok=True)
    assert len(read_history(save / "evolve.csv", keys)) == 3


def test_autobatch_fits_the_probed_memory():
    """Memory 0.5 GB + 0.25 GB per image on a 16 GB device: 60% of it (9.6 GB) holds 36 images; a probe that ran out
    of memory (nan) is left out of the fit; what was reserved before counts against the budget."""
    from workflow.autobatch import batch_for_memory

    sizes = [1, 2, 4, 8, 16]
    used = [0.5 + 0.25 * n for n in sizes]
    assert batch_for_memory(sizes, used, 16, 0) == 36
    assert batch_for_memory(sizes, used[:4] + [float("nan")], 16, 0) == 36
    assert batch_for_memory(sizes, used, 16, 1.0) == 32
    assert batch_for_memory(sizes, used, 1, 0) == 1  # not even one image fits the budget: 1, training will say more
    with pytest.raises(UserError, match="fewer than two probe batches fit"):
        batch_for_memory(sizes, [1.0] + [float("nan")] * 4, 16, 0)


def test_resume_drops_results_rows_of_unsaved_epochs(tmp_path):
    """A kill between logging epoch k and saving its checkpoint (or in the middle of the csv write) must not leave
    epoch k twice, or a broken line, once the run resumes from epoch k."""
    f = tmp_path / "results.csv"
    f.write_text("epoch,x\n   0, 0.5\n   1, 0.6\n   2, 0.7\n   3, 0.")
    train.trim_results(f, 2)
    assert f.read_text() == "epoch,x\n   0, 0.5\n   1, 0.6\n"
    f.write_text("epoch,x\n   0, 0.5\n  ")
    train.trim_results(f, 1)
    assert f.read_text() == "epoch,x\n   0, 0.5\n"


def test_class_and_image_weights():
    import numpy as np

    from utils.class_weights import labels_to_class_weights, labels_to_image_weights

    box = [0.5, 0.5, 0.1, 0.1]
    labels = [np.array([[0, *box], [0, *box]]), np.array([[1, *box]]), np.zeros((0, 5))]
    w = labels_to_class_weights(labels, nc=3)
    # counts 2, 1, 0 (an absent class counts as 1): inverse 0.5, 1, 1, normalised to sum 1
    assert w.tolist() == pytest.approx([0.2, 0.4, 0.4])
    # an image weighs the sum of its objects' class weights; a background image weighs nothing
    assert labels_to_image_weights(labels, nc=3, class_weights=w.numpy()).tolist() == pytest.approx([0.4, 0.4, 0])
    assert labels_to_class_weights([np.zeros((0, 5))], nc=4).tolist() == [0.25] * 4
    assert labels_to_image_weights([], nc=3).shape == (0,)


def test_activation_choice_order(tmp_path):
    """--act, else the --cfg yaml's own activation, else the checkpoint's, else SiLU."""
    from argparse import Namespace

    cfg = yaml_load(ROOT / "models/yolov5n.yaml")
    cfg["activation"] = "nn.ReLU6()"
    yaml_save(tmp_path / "relu6.yaml", cfg)
    relu_model = train.DetectionModel("yolov5n.yaml", act="relu")
    plain = str(ROOT / "models/yolov5n.yaml")
    assert train.pick_activation(Namespace(act=None, cfg=plain, weights="")) == "silu"
    assert train.pick_activation(Namespace(act=None, cfg=str(tmp_path / "relu6.yaml"), weights="")) == "relu6"
    assert train.pick_activation(Namespace(act="relu", cfg=str(tmp_path / "relu6.yaml"), weights="")) == "relu"
    assert train.pick_activation(Namespace(act=None, cfg=plain, weights="x.pt"), relu_model) == "relu"
    assert train.pick_activation(Namespace(act=None, cfg="", weights="x.pt"), relu_model) == "relu"
    cfg["activation"] = "gelu"
    yaml_save(tmp_path / "gelu.yaml", cfg)
    with pytest.raises(UserError, match="gelu.*not supported"):
        train.pick_activation(Namespace(act=None, cfg=str(tmp_path / "gelu.yaml"), weights=""))


def test_resume_falls_back_to_the_checkpoint_opt_without_opt_yaml(tmp_path):
    """As upstream: a last.pt moved without its run's opt.yaml resumes with the options saved inside it."""
    from argparse import Namespace

    from models.checkpoint import save_checkpoint

    last = tmp_path / "moved" / "weights" / "last.pt"
    saved = {"epochs": 5, "batch_size": 4, "data": "shapes.yaml", "imgsz": 128, "device": "0", "workers": 8}
    model = train.DetectionModel("yolov5n.yaml", nc=2)
    save_checkpoint({"epoch": 1, "model": model, "optimizer": {"state": {}}, "opt": saved}, last)
    opt = train.resume_options(Namespace(resume=str(last), device="cpu", workers=0, project=str(tmp_path)))
    assert (opt.epochs, opt.batch_size, opt.imgsz, opt.data) == (5, 4, 128, "shapes.yaml")
    assert (opt.device, opt.workers, opt.resume, opt.weights) == ("cpu", 0, True, str(last))
    assert opt.save_dir == str(tmp_path / "moved")
    save_checkpoint({"epoch": 1, "model": model, "optimizer": {"state": {}}, "opt": None}, last)
    with pytest.raises(UserError, match="holds no training run's options"):
        train.resume_options(Namespace(resume=str(last), device="cpu", workers=0, project=str(tmp_path)))
