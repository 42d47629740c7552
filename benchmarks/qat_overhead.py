"""Cost of a QAT training step against FP32 and against peer QAT libraries, measured side by side in one run.

    python benchmarks/qat_overhead.py                      # yolov5n ReLU, batch 8, 320 px, CPU, 2 threads
    python benchmarks/qat_overhead.py --device 0 --batch 32 --img 640
    python benchmarks/qat_overhead.py --epoch-time         # also train.py's whole epoch on shapes, FP32 vs --qat
    python benchmarks/qat_overhead.py --profile "qat default" --skip "brevitas pow2"   # where a step's time goes

Every variant is yolov5n (act=relu, 80 classes) and trains one step at a time as train.py does: forward,
ComputeLoss on fixed targets, backward, SGD step. The variants take turns step by step (interleaved rounds), so
load from other processes hits them alike, and the rounds run in several fresh processes one after the other
(--processes): what a process starts with (its allocator's state, where its threads run) moves all its times by a
few percent, more than the rounds of one process spread. The table gives the median step time, its spread
(interquartile range in percent of the median), the ratio to FP32 (the median of step / FP32's step in the same
round, pooled over processes, with a 95% interval from a bootstrap over processes and then rounds), the peak memory of
a step against FP32's, and each process's own median ratio. Other processes running on the machine widen the
interval; say what else ran when quoting it.

Calibration (--calibration-rounds, on by default): a fresh `qat default` model calibrated on 4 batches (observers
on, then the MSE scale search), against a float forward pass (eval, no gradients) over the same 4 batches, the two
taking turns; printed as the median times and their ratio with its interval.

  fp32                   the float model
  qat default            --qat --pow2-scale: the default recipe, calibrated (MSE) on 4 batches, observers on, as
                         --qat trains before --disable-observer-epoch: the calibrators track their calibrated range
  qat default, search    the same, with `training_update: search` in the recipe (the MSE search on every step)
  qat observers off      --qat --pow2-scale --disable-observer-epoch 0
  qat original flags     --qat --bn-folding --pow2-scale --disable-observer-epoch 0 --freeze-bn-epoch 0: BN
                         statistics frozen, so each Conv+BN trains as its folded conv
  qat live BN folding    --qat --bn-folding --pow2-scale --disable-observer-epoch 0: BN on batch statistics, the
                         conv output divided by the BN factor and normalised (simulated folding)
  torch.ao convs only    torch.ao eager QAT ('x86' qconfig): Conv+BN+ReLU fused, Detect convs; adds and concats
                         stay float (the setting it supports directly, its best case)
  brevitas pow2          Brevitas FixedPoint quantizers (power-of-two scales, learned) at the same places as
                         `qat default`: input, every conv's per-channel int8 weights and its output, each skip-add
                         and concat, the Detect outputs. Skipped with a message when brevitas is not installed
                         (pip install brevitas). Its activation scales are statistics, not powers of two, during
                         its first 300 steps; this benchmark runs those on a small input first and times the steps
                         after them (--brevitas-warmup).

Peak memory: on CUDA, torch.cuda.max_memory_allocated over the timed steps; on CPU, each variant runs a few steps
in a child process and reports its peak resident memory above the memory it had before the first step.
"""
from __future__ import annotations

import argparse
import copy
import json
import re
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import tempfile

import torch.ao.quantization as tq
from torch.profiler import ProfilerActivity, profile

from models.common import C3, SPPF, Bottleneck, Concat, Conv
from models.quant import quantizers
from models.yolo import Detect, DetectionModel
from utils.general import LOGGER, yaml_load
from utils.loss import ComputeLoss
from workflow.qat import QATRun

VARIANTS = ("fp32", "qat default", "qat default, search", "qat observers off", "qat original flags",
            "qat live BN folding", "torch.ao convs only", "brevitas pow2")
HYP = ROOT / "data/hyps/hyp.scratch-low.yaml"


def float_model(device):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = DetectionModel(str(ROOT / "models/yolov5n.yaml"), act="relu")
    model.hyp = yaml_load(HYP)
    return model.to(device).train()


def inputs(batch, img, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randint(0, 256, (batch, 3, img, img), generator=g, dtype=torch.uint8)
    rows = []
    for i in range(batch):
        xy, wh = torch.rand(8, 2, generator=g) * 0.6 + 0.2, torch.rand(8, 2, generator=g) * 0.3 + 0.05
        cls = torch.randint(0, 80, (8, 1), generator=g).float()
        rows.append(torch.cat([torch.full((8, 1), float(i)), cls, xy, wh], 1))
    return imgs.to(device), torch.cat(rows).to(device)


def qat_run(recipe=None, bn_folding=False, freeze_bn_epoch=-1, disable_observer_epoch=-1) -> QATRun:
    """train.py's QAT steps for `--qat --pow2-scale` with these flags and 4 calibration batches."""
    return QATRun(SimpleNamespace(qat=True, bn_folding=bn_folding, pow2_scale=True, qat_recipe=recipe, calib_batches=4,
                                  freeze_bn_epoch=freeze_bn_epoch, disable_observer_epoch=disable_observer_epoch))


def qat_model(base, imgs, recipe=None, bn_folding=False, freeze_bn_epoch=-1, disable_observer_epoch=-1):
    """The model train.py trains with these --qat flags, calibrated on 4 batches, at the start of epoch 0."""
    run = qat_run(recipe, bn_folding, freeze_bn_epoch, disable_observer_epoch)
    model = run.prepare(copy.deepcopy(base))
    run.calibrate(model, [(imgs,)] * 4, imgs.device)
    run.start_epoch(model, 0)
    return model.train()


def search_recipe(folder):
    """The default recipe with the MSE search on every training step."""
    path = Path(folder) / "default_search.yaml"
    recipe = yaml_load(ROOT / "data/quant/default.yaml")
    recipe["default"]["activation"]["training_update"] = "search"
    path.write_text(json.dumps(recipe))
    return str(path)


def torch_ao_model(base):
    model = copy.deepcopy(base).train()
    for m in model.modules():
        if isinstance(m, Conv) and isinstance(m.act, nn.ReLU):
            tq.fuse_modules_qat(m, [["conv", "bn", "act"]], inplace=True)
    qconfig = tq.get_default_qat_qconfig("x86")
    for m in model.modules():  # only the fused conv blocks and Detect's convs are quantized
        if isinstance(m, (Conv, Detect)):
            m.qconfig = qconfig
    return tq.prepare_qat(model, inplace=True)


def brevitas_model(base, warmup_batch, warmup_steps):
    """yolov5n with Brevitas power-of-two quantizers where `qat default` has bst's."""
    import brevitas.nn as qnn
    from brevitas.quant import Int8ActPerTensorFixedPoint, Int8WeightPerTensorFixedPoint, Uint8ActPerTensorFixedPoint

    class PerChannelWeight(Int8WeightPerTensorFixedPoint):
        scaling_per_output_channel = True

    def qconv(conv):
        q = qnn.QuantConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
                            padding=conv.padding, dilation=conv.dilation, groups=conv.groups,
                            bias=conv.bias is not None, weight_quant=PerChannelWeight)
        q.load_state_dict(conv.state_dict(), strict=False)
        return q

    class QuantOp(nn.Module):  # what models/common.py calls as qadd.add / qcat.cat, with a quantized output
        def __init__(self):
            super().__init__()
            self.out = qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint)

        def add(self, a, b):
            return self.out(a + b)

        def cat(self, xs, dim=0):
            return self.out(torch.cat(xs, dim))

    class QuantOutputs(nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv, self.out = qconv(conv), qnn.QuantIdentity(act_quant=Int8ActPerTensorFixedPoint)

        def forward(self, x):
            return self.out(self.conv(x))

    class QuantInput(nn.Module):
        def __init__(self, first):
            super().__init__()
            self.quant, self.first = qnn.QuantIdentity(act_quant=Uint8ActPerTensorFixedPoint), first

        def forward(self, x):
            return self.first(self.quant(x))

    model = copy.deepcopy(base).train()
    for m in model.modules():
        if isinstance(m, Conv):
            m.conv = qconv(m.conv)
            m.act = qnn.QuantReLU(act_quant=Uint8ActPerTensorFixedPoint)
        elif isinstance(m, Bottleneck) and m.add:
            m.qadd = QuantOp()
        elif isinstance(m, (C3, SPPF, Concat)):
            m.qcat = QuantOp()
        elif isinstance(m, Detect):
            m.m = nn.ModuleList(QuantOutputs(c) for c in m.m)
    first = model.model[0]
    model.model[0] = QuantInput(first)
    for attr in ("f", "i", "type", "np"):
        setattr(model.model[0], attr, getattr(first, attr))
    imgs, targets = warmup_batch
    model.to(imgs.device)
    # its statistics phase (activation scales are not yet powers of two) is passed on a small input: only the
    # step count matters, and the timed steps come after it
    step = make_step(model, imgs[:1, :, :64, :64], targets[targets[:, 0] == 0])
    for _ in range(warmup_steps):
        step()
    return model


def count_quantizers(key, model):
    if key.startswith("qat"):
        return len(quantizers(model))
    if key.startswith("torch.ao"):
        return sum(isinstance(m, tq.FakeQuantizeBase) for m in model.modules())
    if key.startswith("brevitas"):
        import brevitas.nn as qnn

        convs = sum(isinstance(m, qnn.QuantConv2d) for m in model.modules())
        return convs + sum(isinstance(m, (qnn.QuantIdentity, qnn.QuantReLU)) for m in model.modules())
    return 0


def make_step(model, imgs, targets):
    loss_fn = ComputeLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9, nesterov=True)
    x = imgs.float() / 255

    def step():
        loss, _ = loss_fn(model(x), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def build(key, base, imgs, targets, opt, tmp):
    if key == "fp32":
        return copy.deepcopy(base)
    if key == "qat default":
        return qat_model(base, imgs)
    if key == "qat default, search":
        return qat_model(base, imgs, recipe=search_recipe(tmp))
    if key == "qat observers off":
        return qat_model(base, imgs, disable_observer_epoch=0)
    if key == "qat original flags":
        return qat_model(base, imgs, bn_folding=True, freeze_bn_epoch=0, disable_observer_epoch=0)
    if key == "qat live BN folding":
        return qat_model(base, imgs, bn_folding=True, disable_observer_epoch=0)
    if key == "torch.ao convs only":
        return torch_ao_model(base)
    if key == "brevitas pow2":
        return brevitas_model(base, (imgs, targets), opt.brevitas_warmup)
    raise ValueError(key)


def available(key):
    if key == "brevitas pow2":
        try:
            import brevitas  # noqa: F401
        except ImportError:
            print("brevitas is not installed (pip install brevitas): its row is skipped")
            return False
    return True


def profile_steps(step, key, device):
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            step()
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(f"\n{key}: time per op type over 3 steps (torch.profiler)")
    print(prof.key_averages().table(sort_by=sort, row_limit=15))


def rss_kib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // 1024


def probe_memory(opt):
    """Child process: build one variant, run its steps, print the peak resident memory they added (KiB)."""
    device = torch.device(opt.device)
    base = float_model(device)
    imgs, targets = inputs(opt.batch, opt.img, device)
    with tempfile.TemporaryDirectory() as tmp:
        model = build(opt.probe_memory, base, imgs, targets, opt, tmp).to(device)
    step = make_step(model, imgs, targets)
    before = rss_kib()
    for _ in range(3):
        step()
    print(f"PEAK_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}")


def child_peak_mib(key, opt):
    cmd = [sys.executable, __file__, "--probe-memory", key, "--batch", str(opt.batch), "--img", str(opt.img),
           "--threads", str(opt.threads), "--brevitas-warmup", "3"]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"PEAK_KIB (-?\d+)", out.stdout)
    if not found:
        print(f"{key}: memory probe failed:\n{out.stderr[-2000:]}")
        return None
    return int(found.group(1)) / 1024


def epoch_seconds(qat, opt):
    """train.py's first epoch on shapes, data loading included: the elapsed time of its progress bar (validation,
    calibration and start-up are outside it)."""
    cmd = [sys.executable, "train.py", "--data", "shapes.yaml", "--cfg", "yolov5n.yaml", "--weights", "",
           "--act", "relu", "--img", str(opt.img), "--batch-size", "16", "--epochs", "1", "--noval", "--nosave",
           "--noplots", "--workers", "2", "--project", str(Path(opt.tmp) / "runs"), "--name", "e",
           "--device", opt.device.split(":")[-1]]
    out = subprocess.run(cmd + (["--qat", "--pow2-scale"] if qat else []), capture_output=True, text=True, cwd=ROOT)
    if out.returncode:
        raise SystemExit(f"train.py failed ({' '.join(cmd)}):\n{out.stderr[-3000:]}")
    bars = re.findall(rf"{opt.img}: 100%.*? (\d+)/\1 \[(\d+):(\d+)<", out.stdout + out.stderr)
    if not bars:
        raise SystemExit("train.py printed no finished epoch progress bar")
    return int(bars[-1][1]) * 60 + int(bars[-1][2])


def ratio_interval(times, ref, seed=0, n=2000):
    """Median of the per-round ratios times / ref, pooled over processes, and its 95% interval from a two-level
    bootstrap: processes drawn with replacement, then rounds within each (a plain bootstrap over the rounds when there
    is one process). `times` and `ref`: one list of round times per process (flat lists: one process)."""
    if times and not isinstance(times[0], (list, tuple)):
        times, ref = [times], [ref]
    groups = [torch.tensor([t / r for t, r in zip(ts, rs)], dtype=torch.float64) for ts, rs in zip(times, ref)]
    g = torch.Generator().manual_seed(seed)
    meds = torch.empty(n, dtype=torch.float64)
    for b in range(n):
        chosen = torch.randint(0, len(groups), (len(groups),), generator=g) if len(groups) > 1 else [0]
        draws = [groups[int(i)][torch.randint(0, len(groups[int(i)]), (len(groups[int(i)]),), generator=g)]
                 for i in chosen]
        meds[b] = torch.cat(draws).median()
    return float(torch.cat(groups).median()), float(meds.quantile(0.025)), float(meds.quantile(0.975))


def calibration_times(base, imgs, rounds):
    """(calibrate seconds, float forward seconds) per round: a deep copy of `base` prepared as `qat default`
    calibrated on 4 batches of `imgs`, and base's forward over the same 4 batches, taking turns."""
    batches, cal, fwd = [(imgs,)] * 4, [], []
    model = base.eval()
    for _ in range(rounds):
        run = qat_run()
        q = run.prepare(copy.deepcopy(base).train())
        t = time.perf_counter()
        run.calibrate(q, batches, imgs.device)
        cal.append(time.perf_counter() - t)
        t = time.perf_counter()
        with torch.no_grad():
            for (x,) in batches:
                model(x.float() / 255)
        fwd.append(time.perf_counter() - t)
    base.train()
    return cal, fwd


def print_results(opt, device, keys, counts, times, peaks, calib, epochs):
    """The step table, then the calibration and epoch lines when they were measured. `times`: per variant, one list
    of round times per process."""
    threads = f", {torch.get_num_threads()} threads" if device.type == "cpu" else ""
    processes = len(times[keys[0]])
    print(f"\nyolov5n ReLU, batch {opt.batch}, {opt.img} px, {device}{threads}, {processes} process"
          f"{'es' if processes > 1 else ''} x {opt.rounds} interleaved rounds (forward + loss + backward + SGD step)")
    print(f"{'variant':<22}{'quantizers':>11}{'ms/step':>10}{'spread':>8}{'x FP32':>8}{'95% interval':>14}"
          f"{'peak MiB':>10}{'x FP32':>8}{'per process':>14}")
    for key in keys:
        t = sorted(v for group in times[key] for v in group)
        med = statistics.median(t)
        q1, q3 = statistics.quantiles(t, n=4)[0], statistics.quantiles(t, n=4)[2]
        peak, base_peak = peaks.get(key), peaks.get("fp32")
        row = f"{key:<22}{counts[key]:>11}{med * 1e3:>10.1f}{100 * (q3 - q1) / med:>7.0f}%"
        each = ""
        if "fp32" in times:
            r, lo, hi = ratio_interval(times[key], times["fp32"])
            row += f"{r:>8.2f}{f'{lo:.2f}-{hi:.2f}':>14}"
            if processes > 1:
                each = " ".join(f"{ratio_interval(a, b)[0]:.2f}" for a, b in zip(times[key], times["fp32"]))
        else:
            row += f"{'-':>8}{'-':>14}"
        row += f"{peak:>10.0f}" if peak else f"{'-':>10}"
        row += f"{peak / base_peak:>8.2f}" if peak and base_peak else f"{'-':>8}"
        print(row + f"  {each}")
    if calib:
        r, lo, hi = ratio_interval(*calib)
        cal = statistics.median(v for g in calib[0] for v in g)
        fwd = statistics.median(v for g in calib[1] for v in g)
        print(f"\ncalibration of `qat default` on 4 batches: {cal * 1e3:.0f} ms, float forward over the same batches "
              f"{fwd * 1e3:.0f} ms: x{r:.2f} (95% interval {lo:.2f}-{hi:.2f}, {processes} x {opt.calibration_rounds} "
              f"rounds)")
    if epochs:
        print(f"\ntrain.py, epoch 0 on shapes (600 images, {opt.img} px, batch 16, 2 workers, data loading included): "
              f"FP32 {epochs[False]} s, --qat --pow2-scale {epochs[True]} s, x{epochs[True] / epochs[False]:.2f}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--rounds", type=int, default=10, help="timed steps per variant and process (interleaved)")
    p.add_argument("--processes", type=int, default=3,
                   help="fresh processes that each time every variant, one after the other (1: this process)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first")
    p.add_argument("--brevitas-warmup", type=int, default=300,
                   help="brevitas steps before timing (its statistics phase)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2, help="torch threads on CPU")
    p.add_argument("--skip", nargs="*", default=[], choices=VARIANTS, metavar="NAME", help="variants to leave out")
    p.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    p.add_argument("--epoch-time", action="store_true", help="also time one train.py epoch on shapes, FP32 vs --qat")
    p.add_argument("--profile", default="", choices=("",) + VARIANTS, metavar="NAME",
                   help="also print torch.profiler's time per op type over 3 steps of this variant")
    p.add_argument("--calibration-rounds", type=int, default=5,
                   help="rounds of calibration vs float forward (0: do not measure calibration)")
    p.add_argument("--probe-memory", default="", help=argparse.SUPPRESS)
    p.add_argument("--timing-child", action="store_true", help=argparse.SUPPRESS)
    opt = p.parse_args(argv)
    opt.device = f"cuda:{opt.device}" if opt.device.isdigit() else opt.device
    torch.set_num_threads(opt.threads)
    warnings.filterwarnings("ignore")
    LOGGER.setLevel("WARNING")
    if opt.probe_memory:
        return probe_memory(opt)

    keys = [k for k in VARIANTS if k not in opt.skip and available(k)]
    if opt.timing_child:
        print("TIMES " + json.dumps(time_variants(opt, keys)))
        return None
    if opt.processes <= 1:
        runs = [time_variants(opt, keys)]
    else:
        runs = [child_times(opt, keys, i) for i in range(opt.processes)]
    times = {k: [r["times"][k] for r in runs] for k in keys}
    calib = [[r["calibration"][j] for r in runs] for j in (0, 1)] if opt.calibration_rounds else None
    with tempfile.TemporaryDirectory() as tmp:
        opt.tmp = tmp
        peaks = runs[0]["cuda_peaks"]
        if not opt.no_memory and opt.device == "cpu":
            peaks = {key: child_peak_mib(key, opt) for key in keys}
        epochs = {q: epoch_seconds(q, opt) for q in (False, True)} if opt.epoch_time else {}
    print_results(opt, torch.device(opt.device), keys, runs[0]["counts"], times, peaks, calib, epochs)


def time_variants(opt, keys) -> dict:
    """One process's measurements: the variants' step times over interleaved rounds, their quantizer counts, and the
    calibration-vs-forward rounds (the CUDA peak memory when on CUDA)."""
    device = torch.device(opt.device)
    base = float_model(device)
    imgs, targets = inputs(opt.batch, opt.img, device)
    steps, counts = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        opt.tmp = tmp
        for key in keys:
            model = build(key, base, imgs, targets, opt, tmp).to(device)
            counts[key] = count_quantizers(key, model)
            steps[key] = make_step(model, imgs, targets)
            for _ in range(opt.warmup):
                steps[key]()
        times, peaks = {k: [] for k in keys}, {}
        for _ in range(opt.rounds):
            for key in keys:
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t = time.perf_counter()
                steps[key]()
                times[key].append(time.perf_counter() - t)
                if device.type == "cuda":
                    peaks[key] = max(peaks.get(key, 0), torch.cuda.max_memory_allocated(device) / 2 ** 20)
        if opt.profile in steps:
            profile_steps(steps[opt.profile], opt.profile, device)
    calib = calibration_times(base, imgs, opt.calibration_rounds) if opt.calibration_rounds else ([], [])
    return {"times": times, "counts": counts, "calibration": calib, "cuda_peaks": peaks}


def child_times(opt, keys, i) -> dict:
    """`time_variants` in a fresh process (the i-th): what a process starts with (its allocator's state, where its
    threads run) moves every variant's times a little, so the interval has to see several processes."""
    cmd = [sys.executable, __file__, "--timing-child", "--batch", str(opt.batch), "--img", str(opt.img),
           "--rounds", str(opt.rounds), "--warmup", str(opt.warmup), "--brevitas-warmup", str(opt.brevitas_warmup),
           "--device", opt.device, "--threads", str(opt.threads), "--calibration-rounds", str(opt.calibration_rounds),
           "--profile", opt.profile if i == 0 else "", "--skip", *(k for k in VARIANTS if k not in keys)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    found = re.search(r"^TIMES (.*)$", out.stdout, re.M)
    if out.returncode or not found:
        raise SystemExit(f"timing process {i + 1} failed:\n{out.stderr[-3000:]}")
    if opt.profile and i == 0:
        print(out.stdout[out.stdout.find(f"\n{opt.profile}: time per op type"):found.start()], end="")
    return json.loads(found.group(1))


if __name__ == "__main__":
    main()
