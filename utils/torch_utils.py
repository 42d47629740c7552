"""Torch helpers: devices, model summaries, Conv+BN fusion, EMA, optimizer groups, DDP helpers."""
from __future__ import annotations

import math
import time
from contextlib import contextmanager
from copy import deepcopy

import torch
import torch.distributed as dist
import torch.nn as nn

from bst.torch.ao import quantization as bq
from bst.torch.ao.nn.intrinsic.folding import fold_bn
from utils.general import LOGGER, UserError


def select_device(device="", batch_size=0, newline=True) -> torch.device:
    """'' (CUDA 0 if present, else CPU), 'cpu', '0', '0,1', 'cuda:0', 'mps'."""
    s = f"yolov5-qat torch-{torch.__version__} "
    device = str(device).strip().lower().replace("cuda:", "").replace("none", "")
    if device == "cpu":
        arg = "cpu"
        s += "CPU\n"
    elif device == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise UserError("--device mps: Apple MPS is not available on this machine, use --device cpu")
        arg = "mps"
        s += "MPS\n"
    else:
        ids = [x for x in device.split(",") if x != ""]
        if any(not x.isdigit() for x in ids):
            raise UserError(f"--device {device!r}: not a device, use 'cpu', a CUDA index such as 0, "
                            "or a list such as 0,1")
        n_avail = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if ids and (n_avail == 0 or any(int(x) >= n_avail for x in ids)):
            raise UserError(f"--device {device}: CUDA device(s) not available ({n_avail} visible); "
                            f"use --device cpu or a valid CUDA index")
        if not ids and n_avail == 0:
            arg = "cpu"
            s += "CPU\n"
        else:
            ids = ids or ["0"]
            if len(ids) > 1 and batch_size > 0 and batch_size % len(ids):
                raise UserError(f"--batch-size {batch_size} must be a multiple of the GPU count {len(ids)}")
            for i, d in enumerate(ids):
                p = torch.cuda.get_device_properties(int(d))
                s += f"{'' if i == 0 else ' ' * len(s)}CUDA:{d} ({p.name}, {p.total_memory / 1024 ** 2:.0f}MiB)\n"
            arg = f"cuda:{ids[0]}"
    if not newline:
        s = s.rstrip()
    LOGGER.info(s.rstrip())
    return torch.device(arg)


def time_sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.time()


def is_parallel(model):
    return type(model) in (nn.parallel.DataParallel, nn.parallel.DistributedDataParallel)


def de_parallel(model):
    return model.module if is_parallel(model) else model


@contextmanager
def torch_distributed_zero_first(local_rank: int):
    """Let rank 0 do something (e.g. build a dataset cache) before the other ranks."""
    if local_rank not in (-1, 0):
        dist.barrier()
    yield
    if local_rank == 0:
        dist.barrier()


def initialize_weights(model):
    """Upstream BN settings (eps 1e-3, momentum 0.03) and in-place activations."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-3
            m.momentum = 0.03
        elif isinstance(m, (nn.Hardswish, nn.LeakyReLU, nn.ReLU, nn.ReLU6, nn.SiLU)):
            m.inplace = True


def fuse_conv_and_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """A Conv2d equal to bn(conv(x)) in eval mode: w' = w * g / s, b' = b * g / s + beta - g * mean / s, rounded as
    upstream rounds it (a fused float model computes bit for bit what upstream's computes)."""
    fused = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                      conv.dilation, conv.groups, bias=True).requires_grad_(False).to(conv.weight.device)
    with torch.no_grad():
        w, b = fold_bn(conv.weight, conv.bias, bn, dtype=torch.float32, upstream_rounding=True)
    fused.weight.copy_(w.to(fused.weight.dtype))
    fused.bias.copy_(b.to(fused.bias.dtype))
    return fused


def count_flops(model, shape) -> float:
    """Floating point operations of one forward of `model` (not modified) on an input of `shape`: 2 x the
    multiply-accumulates of every convolution and linear layer (what upstream's thop count reports; the element-wise
    ops of a detector are negligible beside them). Counted by forward hooks on a copy of the model on the meta
    device, which computes shapes only; a model that cannot run there (some quantized modules) is run for real."""
    total = []

    def hook(mod, _, out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        if isinstance(mod, nn.Linear):
            total.append(2 * out.numel() * mod.in_features)
        else:
            total.append(2 * out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size))

    p = next(model.parameters())
    for device in ("meta", p.device):
        total.clear()
        copy = deepcopy(model).to(device).eval()
        for m in copy.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                m.register_forward_hook(hook)
        try:
            with torch.no_grad():
                copy(torch.zeros(shape, device=device, dtype=p.dtype))
            return float(sum(total))
        except Exception:  # noqa: BLE001 - shapes only: an op without a meta kernel falls back to the real device
            if device != "meta":
                raise
    return 0.0


def model_info(model, verbose=False, imgsz=640, name=None):
    """Print `<name> summary: L layers, P parameters, G gradients, F GFLOPs` (FLOPs at imgsz)."""
    n_p = sum(p.numel() for p in model.parameters())
    n_g = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if verbose:
        LOGGER.info(f"{'layer':>5} {'name':>40} {'gradient':>9} {'parameters':>12} {'shape':>20} "
                    f"{'mu':>10} {'sigma':>10}")
        for i, (n, p) in enumerate(model.named_parameters()):
            LOGGER.info(f"{i:5g} {n:>40} {str(p.requires_grad):>9} {p.numel():12g} {str(list(p.shape)):>20} "
                        f"{p.mean():10.3g} {p.std() if p.numel() > 1 else 0:10.3g}")
    fs = ""
    try:
        stride = max(int(model.stride.max()), 32) if hasattr(model, "stride") else 32
        flops = count_flops(model, (1, model.yaml.get("ch", 3) if hasattr(model, "yaml") else 3, stride, stride)) / 1e9
        imgsz = imgsz if isinstance(imgsz, (list, tuple)) else [imgsz, imgsz]
        fs = f", {flops * imgsz[0] / stride * imgsz[1] / stride:.1f} GFLOPs"
    except Exception as e:  # FLOPs are informative only; never fail a summary for them
        LOGGER.debug(f"FLOPs not counted: {e}")
    name = name or "Model"
    LOGGER.info(f"{name} summary: {len(list(model.modules()))} layers, {n_p} parameters, {n_g} gradients{fs}")
    return n_p, fs


def scale_img(img, ratio=1.0, same_shape=False, gs=32):
    """Resize a BCHW batch by ratio and pad to a multiple of gs (test-time augmentation)."""
    if ratio == 1.0:
        return img
    h, w = img.shape[2:]
    s = (int(h * ratio), int(w * ratio))
    img = nn.functional.interpolate(img, size=s, mode="bilinear", align_corners=False)
    if not same_shape:
        h, w = (math.ceil(x * ratio / gs) * gs for x in (h, w))
    return nn.functional.pad(img, [0, w - s[1], 0, h - s[0]], value=0.447)


def copy_attr(a, b, include=(), exclude=()):
    for k, v in b.__dict__.items():
        if (len(include) and k not in include) or k.startswith("_") or k in exclude:
            continue
        setattr(a, k, v)


def _is_bn(m):
    return isinstance(m, nn.modules.batchnorm._BatchNorm)


def averaged_state_keys(model) -> set:
    """state_dict keys the EMA averages: float parameters and BatchNorm running statistics, except quantizer state.

    Quantizer state (bst's `quantizer_state_keys`: scales, zero points, learnable scales, observer statistics, enable
    flags) is copied from the live model instead: averaging a power-of-two scale gives a non-power-of-two, and
    averaging observer statistics smears them.
    """
    keys = {n for n, p in model.named_parameters() if p.dtype.is_floating_point}
    for name, m in model.named_modules():
        if _is_bn(m):
            keys |= {f"{name}.running_mean" if name else "running_mean",
                     f"{name}.running_var" if name else "running_var"}
    return keys - bq.quantizer_state_keys(model)


class ModelEMA:
    """Exponential moving average of a model (Polyak averaging), with upstream's ramped decay.

    Only `averaged_state_keys` are averaged; quantizer state is copied with bst's `copy_quantizer_state_` and the
    rest (BN batch counters, anchors) is copied, so quantization state stays exact.
    """

    def __init__(self, model, decay=0.9999, tau=2000, updates=0):
        self.ema = deepcopy(de_parallel(model)).eval()
        self.updates = updates
        self.decay_max, self.tau = decay, tau
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self._averaged = averaged_state_keys(self.ema)
        self._quantizer = bq.quantizer_state_keys(self.ema)
        self._copied = set(self.ema.state_dict()) - self._averaged - self._quantizer

    def decay(self, updates):
        return self.decay_max * (1 - math.exp(-updates / self.tau))

    @torch.no_grad()
    def update(self, model):
        self.updates += 1
        d = self.decay(self.updates)
        model = de_parallel(model)
        msd, esd = model.state_dict(), self.ema.state_dict(keep_vars=True)  # esd: the EMA's own tensors
        for k in self._averaged:
            esd[k].mul_(d).add_(msd[k].detach().to(esd[k].dtype), alpha=1 - d)
        for k in self._copied:
            esd[k].copy_(msd[k])
        bq.copy_quantizer_state_(self.ema, model, keys=self._quantizer, src_state=msd, dst_state=esd)

    def update_attr(self, model, include=(), exclude=("process_group", "reducer")):
        copy_attr(self.ema, de_parallel(model), include, exclude)


def parameter_groups(model):
    """Upstream's three groups: weights with decay, BN weights and learnable quantization scales (bst's
    `quantizer_parameters`) without, biases."""
    decay, no_decay, biases = [], [], []
    quantizer = {id(p) for p in bq.quantizer_parameters(model)}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in quantizer:
                no_decay.append(p)
            elif name == "bias":
                biases.append(p)
            elif name == "weight" and not _is_bn(module):
                decay.append(p)
            else:  # BN weights, ...
                no_decay.append(p)
    return decay, no_decay, biases


def smart_optimizer(model, name="Adam", lr=0.001, momentum=0.9, decay=1e-5):
    """SGD / Adam / AdamW over the three groups; group 0 holds the biases (warmup_bias_lr applies to it)."""
    g_decay, g_no_decay, g_bias = parameter_groups(model)
    if name == "Adam":
        optimizer = torch.optim.Adam(g_bias, lr=lr, betas=(momentum, 0.999))
    elif name == "AdamW":
        optimizer = torch.optim.AdamW(g_bias, lr=lr, betas=(momentum, 0.999), weight_decay=0.0)
    elif name == "SGD":
        optimizer = torch.optim.SGD(g_bias, lr=lr, momentum=momentum, nesterov=True)
    else:
        raise UserError(f"--optimizer {name}: not supported, use SGD, Adam or AdamW")
    optimizer.add_param_group({"params": g_decay, "weight_decay": decay})
    optimizer.add_param_group({"params": g_no_decay, "weight_decay": 0.0})
    LOGGER.info(f"optimizer: {type(optimizer).__name__}(lr={lr}) with parameter groups "
                f"{len(g_no_decay)} weight(decay=0.0), {len(g_decay)} weight(decay={decay}), {len(g_bias)} bias")
    return optimizer


class EarlyStopping:
    """Stop when fitness has not improved for `patience` epochs."""

    def __init__(self, patience=30):
        self.best_fitness = 0.0
        self.best_epoch = 0
        self.patience = patience or float("inf")
        self.possible_stop = False

    def __call__(self, epoch, fitness):
        if fitness >= self.best_fitness:
            self.best_epoch = epoch
            self.best_fitness = fitness
        delta = epoch - self.best_epoch
        self.possible_stop = delta >= (self.patience - 1)
        stop = delta >= self.patience
        if stop:
            LOGGER.info(f"Stopping training early as no improvement observed in last {self.patience} epochs. "
                        f"Best results observed at epoch {self.best_epoch}, best model saved as best.pt.\n"
                        f"To update EarlyStopping(patience={self.patience}) pass a new patience value, "
                        f"i.e. `python train.py --patience 300` or use `--patience 0` to disable EarlyStopping.")
        return stop


def one_cycle(y1=0.0, y2=1.0, steps=100):
    """Cosine ramp from y1 to y2 over steps."""
    return lambda x: ((1 - math.cos(x * math.pi / steps)) / 2) * (y2 - y1) + y1
