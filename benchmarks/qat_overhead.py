"""QAT training-step overhead of bst.torch.ao on a yolov5n-shaped network, measured side by side.

    python benchmarks/qat_overhead.py [--batch 8] [--img 320] [--rounds 5] [--device cpu] [--threads N]

Variants (all trained with the same loss and optimizer, timed in interleaved rounds so that load from
other processes hits all of them alike; the table shows medians and ratios to FP32):

* fp32: the float model (Conv+BN+ReLU, adds, concats).
* bst linear / bst pow2: every conv (Conv+BN+ReLU fused with simulated BN folding, Detect convs),
  every skip-add and concat and the input quantized; observers on (moving-average min/max).
* bst pow2 frozen: the same with observers disabled (scales frozen after calibration).
* bst fused linear: linear scales through torch.fused_moving_avg_obs_fake_quant.
* bst pow2 convs only / torch.ao convs only: only Conv+BN+ReLU fused modules and Detect convs, the
  setting torch.ao's eager QAT supports directly (its default 'x86' QAT qconfig).

Columns: median wall time per step, the best (minimum) round, and median process CPU time, each with
its ratio to FP32. On CPU, bst computes fake quantization with vectorized core ops (the core CPU
fake-quant kernels, which torch.ao and the fused variant use, run a scalar loop); on CUDA it calls
the core kernels.

The network is models.yolo.DetectionModel('models/yolov5n.yaml', act='relu') when that imports and
builds, else an equivalent stack defined below. Ratios, not absolute times, are the result.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import bst.torch.ao.quantization as bq  # noqa: E402
from bst.torch.ao.nn.quantized import FloatFunctional  # noqa: E402


# --- fallback network: yolov5n's layer shapes (width 0.25, depth 0.33), ReLU -------------------------
class ConvBNReLU(nn.Module):
    def __init__(self, c1, c2, k=1, s=1):
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c, shortcut=True):
        super().__init__()
        self.cv1, self.cv2 = ConvBNReLU(c, c, 1), ConvBNReLU(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        if not self.add:
            return y
        return self.qadd.add(x, y) if hasattr(self, "qadd") else x + y


class C3(nn.Module):
    def __init__(self, c1, c2, n=1, shortcut=True):
        super().__init__()
        c = c2 // 2
        self.cv1, self.cv2, self.cv3 = ConvBNReLU(c1, c), ConvBNReLU(c1, c), ConvBNReLU(2 * c, c2)
        self.m = nn.Sequential(*(Bottleneck(c, shortcut) for _ in range(n)))

    def forward(self, x):
        parts = [self.m(self.cv1(x)), self.cv2(x)]
        return self.cv3(self.qcat.cat(parts, 1) if hasattr(self, "qcat") else torch.cat(parts, 1))


class SPPF(nn.Module):
    def __init__(self, c1, c2):
        super().__init__()
        c = c1 // 2
        self.cv1, self.cv2 = ConvBNReLU(c1, c), ConvBNReLU(4 * c, c2)
        self.m = nn.MaxPool2d(5, 1, 2)

    def forward(self, x):
        x = self.cv1(x)
        y1 = self.m(x)
        y2 = self.m(y1)
        parts = [x, y1, y2, self.m(y2)]
        return self.cv2(self.qcat.cat(parts, 1) if hasattr(self, "qcat") else torch.cat(parts, 1))


class Concat(nn.Module):
    def forward(self, xs):
        return self.qcat.cat(list(xs), 1) if hasattr(self, "qcat") else torch.cat(xs, 1)


class YoloV5nLike(nn.Module):
    """Backbone, PANet neck and 3-level detection convs of yolov5n (255 outputs per level)."""

    def __init__(self, no=255):
        super().__init__()
        self.b = nn.ModuleList([ConvBNReLU(3, 16, 6, 2), ConvBNReLU(16, 32, 3, 2), C3(32, 32, 1),
                                ConvBNReLU(32, 64, 3, 2), C3(64, 64, 2), ConvBNReLU(64, 128, 3, 2), C3(128, 128, 3),
                                ConvBNReLU(128, 256, 3, 2), C3(256, 256, 1), SPPF(256, 256)])
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.h10, self.c13 = ConvBNReLU(256, 128), C3(256, 128, 1, False)
        self.h14, self.c17 = ConvBNReLU(128, 64), C3(128, 64, 1, False)
        self.h18, self.c20 = ConvBNReLU(64, 64, 3, 2), C3(128, 128, 1, False)
        self.h21, self.c23 = ConvBNReLU(128, 128, 3, 2), C3(256, 256, 1, False)
        self.cats = nn.ModuleList([Concat() for _ in range(4)])
        self.detect = nn.ModuleList([nn.Conv2d(c, no, 1) for c in (64, 128, 256)])

    def forward(self, x):
        saved = {}
        for i, m in enumerate(self.b):
            x = m(x)
            saved[i] = x
        p10 = self.h10(x)
        p13 = self.c13(self.cats[0]([self.up(p10), saved[6]]))
        p14 = self.h14(p13)
        p17 = self.c17(self.cats[1]([self.up(p14), saved[4]]))
        p20 = self.c20(self.cats[2]([self.h18(p17), p14]))
        p23 = self.c23(self.cats[3]([self.h21(p20), p10]))
        return [d(p) for d, p in zip(self.detect, (p17, p20, p23))]


def build_network():
    """(model, name, block types): models.yolo's yolov5n with ReLU when available, else the stack above."""
    try:
        from models import common
        from models.yolo import DetectionModel

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = DetectionModel(str(ROOT / "models" / "yolov5n.yaml"), act="relu")
        return model, "models.yolo yolov5n (act=relu)", (common.Conv, common.Bottleneck,
                                                         (common.C3, common.SPPF, common.SPP, common.Concat))
    except Exception as e:  # the models issue may not have landed yet
        print(f"models.yolo unavailable ({type(e).__name__}: {e}); using the built-in yolov5n-shaped stack")
        return YoloV5nLike(), "yolov5n-shaped stack (built in)", (ConvBNReLU, Bottleneck, (C3, SPPF, Concat))


class WithInputStub(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.quant = bq.QuantStub()
        self.model = model

    def forward(self, x):
        return self.model(self.quant(x))


def fuse_conv_blocks(model, conv_type, fuse_fn):
    for m in model.modules():
        if isinstance(m, conv_type) and isinstance(getattr(m, "act", None), nn.ReLU):
            fuse_fn(m, [["conv", "bn", "act"]], inplace=True)


def bst_qat(base, types, qconfig, functionals=True):
    conv_type, bottleneck_type, cat_types = types
    model = copy.deepcopy(base).train()
    fuse_conv_blocks(model, conv_type, bq.fuse_modules_qat)
    if functionals:
        for m in model.modules():
            if isinstance(m, bottleneck_type) and m.add:
                m.qadd = FloatFunctional()
            elif isinstance(m, cat_types):
                m.qcat = FloatFunctional()
        model = WithInputStub(model)
    model.qconfig = qconfig
    return bq.prepare_qat(model)


def torch_ao_qat(base, types):
    import torch.ao.quantization as tq

    model = copy.deepcopy(base).train()
    fuse_conv_blocks(model, types[0], tq.fuse_modules_qat)
    model.qconfig = tq.get_default_qat_qconfig("x86")
    return tq.prepare_qat(model)


def make_step(model, x):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9)

    def step():
        out = model(x)
        loss = sum(o.float().mean() for o in (out if isinstance(out, (list, tuple)) else [out]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x.is_cuda:
            torch.cuda.synchronize()
    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--img", type=int, default=320)
    p.add_argument("--rounds", type=int, default=5, help="timed steps per variant (interleaved)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--skip", nargs="*", default=[], help="variant names to leave out")
    opt = p.parse_args(argv)
    if opt.threads:
        torch.set_num_threads(opt.threads)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)
    device = torch.device(opt.device)
    base, name, types = build_network()
    base = base.to(device).train()
    x = torch.randn(opt.batch, 3, opt.img, opt.img, device=device)

    variants = {"fp32": lambda: copy.deepcopy(base)}
    variants["bst linear"] = lambda: bst_qat(base, types, bq.get_default_qat_qconfig())
    variants["bst pow2"] = lambda: bst_qat(base, types, bq.get_default_qat_qconfig(pow2=True))

    def frozen():
        model = bst_qat(base, types, bq.get_default_qat_qconfig(pow2=True))
        make_step(model, x)()  # calibrate once, then freeze
        model.apply(bq.disable_observer)
        return model
    variants["bst pow2 frozen"] = frozen
    variants["bst fused linear"] = lambda: bst_qat(base, types, bq.get_default_qat_qconfig(fused=True))
    variants["bst pow2 convs only"] = lambda: bst_qat(base, types, bq.get_default_qat_qconfig(pow2=True), False)
    if importlib.util.find_spec("torch.ao.quantization") is not None:
        variants["torch.ao convs only"] = lambda: torch_ao_qat(base, types)
    else:
        print("torch.ao.quantization is not available: its row is skipped")
    variants = {k: v for k, v in variants.items() if k not in opt.skip}

    steps = {}
    for key, build in variants.items():
        model = build().to(device)
        steps[key] = make_step(model, x)
        for _ in range(opt.warmup):
            steps[key]()
    wall = {key: [] for key in steps}
    cpu = {key: [] for key in steps}
    for _ in range(opt.rounds):
        for key, step in steps.items():
            t, c = time.perf_counter(), time.process_time()
            step()
            wall[key].append(time.perf_counter() - t)
            cpu[key].append(time.process_time() - c)

    print(f"\n{name}, batch {opt.batch}, {opt.img} px, {device}, {torch.get_num_threads()} threads, "
          f"{opt.rounds} interleaved rounds")
    # on a shared machine other processes slow every variant alike only on average: the best (minimum)
    # round and the process CPU time are shown next to the median wall time
    columns = {"wall": (wall, statistics.median), "best": (wall, min), "cpu": (cpu, statistics.median)}
    print(f"{'variant':<22}" + "".join(f"{c + ' ms':>10}{'x FP32':>8}" for c in columns))
    for key in steps:
        row = f"{key:<22}"
        for times, reduce in columns.values():
            value = reduce(times[key])
            base = reduce(times["fp32"]) if "fp32" in times else None
            row += f"{value * 1e3:>10.1f}" + (f"{value / base:>8.2f}" if base else f"{'-':>8}")
        print(row)

if __name__ == "__main__":
    main()
