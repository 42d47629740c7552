"""YOLOv5 v7.0 detection model: Detect head, DetectionModel and parse_model.

Usage: python models/yolo.py --cfg yolov5s.yaml   (prints the layer table and a summary)
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import time

from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, DWConv, Focus, activation_name, make_activation
from utils.general import LOGGER, UserError, check_file, colorstr, make_divisible, run_cli, yaml_load
from utils.plots import feature_visualization
from utils.torch_utils import fuse_conv_and_bn, initialize_weights, model_info, scale_img, select_device


class Detect(nn.Module):
    """Per level a 1x1 conv to na*(nc+5) channels; in eval mode also decodes boxes to pixels."""

    stride = None  # pixels per grid cell of each level, set when the model is built
    dynamic = False  # rebuild grids every call
    export = False  # return only the decoded tensor
    fused_decode = False  # decode as one elementwise chain (the same numbers; see decode_fused)

    def __init__(self, nc=80, anchors=(), ch=(), inplace=True):
        super().__init__()
        self.nc = nc
        self.no = nc + 5
        self.nl = len(anchors)
        self.na = len(anchors[0]) // 2
        self.grid = [torch.empty(0) for _ in range(self.nl)]
        self.anchor_grid = [torch.empty(0) for _ in range(self.nl)]
        self.register_buffer("anchors", torch.tensor(anchors).float().view(self.nl, -1, 2))
        self.m = nn.ModuleList(nn.Conv2d(x, self.no * self.na, 1) for x in ch)
        self.inplace = inplace

    def forward(self, x):
        z = []
        for i in range(self.nl):
            x[i] = self.m[i](x[i])
            bs, _, ny, nx = x[i].shape
            x[i] = x[i].view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous()
            if not self.training:
                if self.dynamic or self.grid[i].shape[2:4] != x[i].shape[2:4]:
                    self.grid[i], self.anchor_grid[i] = self._make_grid(nx, ny, i)
                z.append(self.decode(x[i], i).view(bs, self.na * nx * ny, self.no))
        if self.training:
            return x
        return (torch.cat(z, 1),) if self.export else (torch.cat(z, 1), x)

    def decode(self, p, i):
        """Raw level-i output (bs, na, ny, nx, no) -> xywh in pixels, objectness, class scores."""
        if self.fused_decode:
            return self.decode_fused(p, i)
        xy, wh, conf = p.float().sigmoid().split((2, 2, self.nc + 1), 4)
        xy = (xy * 2 + self.grid[i]) * self.stride[i]
        wh = (wh * 2) ** 2 * self.anchor_grid[i]
        return torch.cat((xy, wh, conf), 4)

    def decode_fused(self, p, i):
        """`decode` without splitting and concatenating the channels: s = sigmoid(p), u = s * k + gy, then
        (u * (u * q + (1 - q)) * a + gx) * t with per-channel constants (k = 2 for xywh, gy / gx the grid row / column
        for y / x, q = 1 for wh, a the anchor for wh, t the stride for xy; else 1 or 0). Per channel these are
        decode's own operations on the same values (2 s + grid, then x stride; (2 s) * (2 s), then x anchor; s), each
        other step multiplies by 1 or adds 0, also when a runtime fuses a multiply and an add: the same numbers in
        one elementwise pass, which a runtime such as OpenVINO fuses into one kernel. The two grid terms are added
        at different steps, so that no runtime folds them into one constant of the level's full size."""
        s = p.float().sigmoid()
        ch = torch.arange(self.no, device=s.device)
        square = ((ch == 2) | (ch == 3)).to(s.dtype)
        anchor = torch.ones(1, self.na, 1, 1, self.no, device=s.device, dtype=s.dtype)
        anchor[..., 2:4] = (self.anchors[i] * self.stride[i]).view(1, self.na, 1, 1, 2)
        grid_x = nn.functional.pad(self.grid[i][:, :1, :1, :, :1], (0, self.no - 1))  # (1, 1, 1, nx, no)
        grid_y = nn.functional.pad(self.grid[i][:, :1, :, :1, 1:], (1, self.no - 2))  # (1, 1, ny, 1, no)
        stride = torch.where(ch < 2, self.stride[i].to(s.device, s.dtype), torch.ones((), device=s.device))
        u = s * torch.where(ch < 4, 2.0, 1.0).to(s.dtype) + grid_y
        return (u * (u * square + (1 - square)) * anchor + grid_x) * stride

    def _make_grid(self, nx=20, ny=20, i=0):
        d, t = self.anchors[i].device, self.anchors[i].dtype
        shape = 1, self.na, ny, nx, 2
        yv, xv = torch.meshgrid(torch.arange(ny, device=d, dtype=t), torch.arange(nx, device=d, dtype=t), indexing="ij")
        grid = torch.stack((xv, yv), 2).expand(shape) - 0.5  # the -0.5 offset of 2*sigmoid-0.5
        anchor_grid = (self.anchors[i] * self.stride[i]).view((1, self.na, 1, 1, 2)).expand(shape)
        return grid, anchor_grid

    def check_anchor_order(self):
        """Anchors must grow with stride; flip them if the yaml lists them the other way round."""
        area = self.anchors.prod(-1).mean(-1).view(-1)
        da, ds = area[-1] - area[0], self.stride[-1] - self.stride[0]
        if da and (da.sign() != ds.sign()):
            LOGGER.info(f"{colorstr('AutoAnchor: ')}Reversing anchor order")
            self.anchors[:] = self.anchors.flip(0)


class BaseModel(nn.Module):
    """Runs `self.model` (an nn.Sequential of layers with .f/.i) honouring the `from` indices."""

    def forward(self, x, profile=False, visualize=False):
        return self._forward_once(x, profile, visualize)

    def _forward_once(self, x, profile=False, visualize=False, stop=None):
        """`stop`: the index of a layer whose input is returned instead of running it and the layers after it."""
        quant = self._modules.get("input_quant")  # QuantStub of a QAT model (models/quant.py)
        if quant is not None:
            x = quant(x)
        y = []
        for m in self.model:
            if m.f != -1:
                x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
            if m.i == stop:
                return x
            x = m(x)
            y.append(x if m.i in self.save else None)
            if visualize:
                feature_visualization(x, m.type, m.i, save_dir=visualize)
        return x

    def fuse(self):
        """Fold BN into the preceding conv of every Conv block (inference only)."""
        for m in self.model.modules():
            if isinstance(m, (Conv, DWConv)) and hasattr(m, "bn") and isinstance(m.conv, nn.Conv2d) \
                    and type(m.conv) is nn.Conv2d:
                m.conv = fuse_conv_and_bn(m.conv, m.bn)
                delattr(m, "bn")
                m.forward = m.forward_fuse
        self.info()
        return self

    def info(self, verbose=False, img_size=640):
        return model_info(self, verbose, img_size, name=getattr(self, "summary_name", None))

    def _apply(self, fn):
        # stride and grids are plain attributes, not buffers: move/cast them with the model
        self = super()._apply(fn)
        m = self.model[-1]
        if isinstance(m, Detect):
            m.stride = fn(m.stride)
            m.grid = list(map(fn, m.grid))
            if isinstance(m.anchor_grid, list):
                m.anchor_grid = list(map(fn, m.anchor_grid))
        return self


class DetectionModel(BaseModel):
    """YOLOv5 detector built from a yaml (path or dict)."""

    def __init__(self, cfg="yolov5s.yaml", ch=3, nc=None, anchors=None, act=None):
        super().__init__()
        if isinstance(cfg, dict):
            self.yaml = deepcopy(cfg)
        else:
            path = Path(check_file(cfg, search_dirs=("models",)))
            self.yaml_file = path.name
            self.yaml = yaml_load(path)
        ch = self.yaml["ch"] = self.yaml.get("ch", ch)
        if nc and nc != self.yaml.get("nc"):
            LOGGER.info(f"Overriding model.yaml nc={self.yaml.get('nc')} with nc={nc}")
            self.yaml["nc"] = nc
        if anchors:
            LOGGER.info(f"Overriding model.yaml anchors with anchors={anchors}")
            self.yaml["anchors"] = round(anchors)
        if act is not None:
            self.yaml["activation"] = activation_name(act)
        elif "activation" in self.yaml:
            self.yaml["activation"] = activation_name(self.yaml["activation"])
        try:
            self.model, self.save = parse_model(deepcopy(self.yaml), ch=[ch])
        except UserError as e:  # name the file the bad row is in
            if isinstance(cfg, dict):
                raise
            raise UserError(str(e).replace("model yaml:", f"{path}:", 1)) from None
        self.names = {i: str(i) for i in range(self.yaml["nc"])}
        self.inplace = self.yaml.get("inplace", True)

        m = self.model[-1]
        if isinstance(m, Detect):
            s = 256
            m.inplace = self.inplace
            with torch.no_grad():  # train mode: Detect returns the raw per-level maps
                out = self._forward_once(torch.zeros(1, ch, s, s))
            m.stride = torch.tensor([s / x.shape[-2] for x in out])
            m.check_anchor_order()
            m.anchors /= m.stride.view(-1, 1, 1)
            self.stride = m.stride
            self._initialize_biases()
        initialize_weights(self)

    @property
    def activation(self) -> str:
        return self.yaml.get("activation", "silu")

    def forward(self, x, augment=False, profile=False, visualize=False):
        if augment:
            return self._forward_augment(x)
        return self._forward_once(x, profile, visualize)

    def _forward_augment(self, x):
        """Test-time augmentation: full size, 0.83x flipped left-right, 0.67x; predictions merged."""
        img_size = x.shape[-2:]
        ys = []
        for si, flip in ((1, None), (0.83, 3), (0.67, None)):
            xi = scale_img(x.flip(flip) if flip else x, si, gs=int(self.stride.max()))
            yi = self._forward_once(xi)[0]
            ys.append(self._descale_pred(yi, flip, si, img_size))
        ys = self._clip_augmented(ys)
        return torch.cat(ys, 1), None

    @staticmethod
    def _descale_pred(p, flip, scale, img_size):
        p = p.clone()
        p[..., :4] /= scale
        if flip == 2:
            p[..., 1] = img_size[0] - p[..., 1]
        elif flip == 3:
            p[..., 0] = img_size[1] - p[..., 0]
        return p

    def _clip_augmented(self, y):
        """Drop the large-object tail of the upscaled pass and the small-object head of the downscaled one."""
        nl = self.model[-1].nl
        g = sum(4 ** x for x in range(nl))
        n_large = (y[0].shape[1] // g) * sum(4 ** x for x in range(1))
        y[0] = y[0][:, :-n_large]
        n_small = (y[-1].shape[1] // g) * sum(4 ** (nl - 1 - x) for x in range(1))
        y[-1] = y[-1][:, n_small:]
        return y

    def _initialize_biases(self, cf=None):
        """Objectness prior of ~8 objects per 640 image, class prior 0.6/nc (upstream's init)."""
        m = self.model[-1]
        for mi, s in zip(m.m, m.stride):
            b = mi.bias.view(m.na, -1)
            b.data[:, 4] += math.log(8 / (640 / s) ** 2)
            b.data[:, 5:5 + m.nc] += math.log(0.6 / (m.nc - 0.99999)) if cf is None else torch.log(cf / cf.sum())
            mi.bias = nn.Parameter(b.view(-1), requires_grad=True)

    @property
    def summary_name(self):
        stem = Path(getattr(self, "yaml_file", "") or "model").stem
        return stem.replace("yolov5", "YOLOv5") if stem.startswith("yolov5") else stem


Model = DetectionModel  # upstream alias, kept for older checkpoints and user code

# parse_model's registry: the module names a yaml may use. Nothing else is ever evaluated.
MODULES = {
    "Conv": Conv, "DWConv": DWConv, "Bottleneck": Bottleneck, "C3": C3, "SPP": SPP, "SPPF": SPPF,
    "Focus": Focus, "Concat": Concat, "Detect": Detect,
    "nn.Upsample": nn.Upsample, "nn.BatchNorm2d": nn.BatchNorm2d, "nn.Identity": nn.Identity,
    "nn.MaxPool2d": nn.MaxPool2d,
}
WITH_CHANNELS = {Conv, DWConv, Bottleneck, C3, SPP, SPPF, Focus}  # args start with c_out; c_in is prepended
WITH_REPEATS = {C3}  # the repeat count goes into the module, not into an nn.Sequential


class Ensemble(nn.ModuleList):
    """Several models whose detections are concatenated (NMS then merges them)."""

    def forward(self, x, augment=False, profile=False, visualize=False):
        y = [m(x, augment, profile, visualize)[0] for m in self]
        return torch.cat(y, 1), None


def _resolve_arg(a, names):
    if isinstance(a, str):
        if a in names:
            return names[a]
        if a == "None":
            return None
    return a


def _check_row(i, f, n, args, built):
    """`from` must name layers before row i (-1 the previous, -k k back, or an absolute index), `number` must be a
    positive integer, `args` a list."""
    for x in [f] if isinstance(f, int) and not isinstance(f, bool) else (f if isinstance(f, list) and f else [None]):
        if not isinstance(x, int) or isinstance(x, bool) or not -built <= x < max(i, 1) or (i == 0 and x != -1):
            raise UserError(f"model yaml: layer {i} has from={f!r}; 'from' is -1 (the previous layer), a negative "
                            f"offset or the index of an earlier layer (0-{i - 1}), or a list of those")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise UserError(f"model yaml: layer {i} has number={n!r}; it must be an integer >= 1")
    if args is not None and not isinstance(args, list):
        raise UserError(f"model yaml: layer {i} has args={args!r}; it must be a list")


def parse_model(d, ch):
    """Build the layers from a model dict; returns (nn.Sequential, sorted list of saved layer indices)."""
    try:
        anchors, nc, gd, gw = d["anchors"], d["nc"], d["depth_multiple"], d["width_multiple"]
        rows = d["backbone"] + d["head"]
    except KeyError as e:
        raise UserError(f"model yaml: missing key {e.args[0]!r} (needs nc, depth_multiple, width_multiple, "
                        f"anchors, backbone, head)") from None
    act = make_activation(d.get("activation") or True)  # one instance shared by all blocks, as upstream
    LOGGER.info(f"\n{'':>3}{'from':>18}{'n':>3}{'params':>10}  {'module':<40}{'arguments':<30}")
    na = (len(anchors[0]) // 2) if isinstance(anchors, list) else anchors
    no = na * (nc + 5)
    names = {"nc": nc, "anchors": anchors}
    layers, save, c2 = [], [], ch[-1]
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise UserError(f"model yaml: layer {i} must be [from, number, module, args], got {row!r}")
        f, n, name, args = row
        if name not in MODULES:
            raise UserError(f"model yaml: layer {i} uses unknown module {name!r}; known modules: {', '.join(MODULES)}")
        m = MODULES[name]
        _check_row(i, f, n, args, len(ch) if i else 1)
        try:
            args = [_resolve_arg(a, names) for a in (args or [])]
            n = n_ = max(round(n * gd), 1) if n > 1 else n
            kwargs = {}
            if m in WITH_CHANNELS:
                c1, c2 = ch[f], args[0]
                if c2 != no:
                    c2 = make_divisible(c2 * gw, 8)
                args = [c1, c2, *args[1:]]
                if m in WITH_REPEATS:
                    args.insert(2, n)
                    n = 1
                kwargs["act"] = act
            elif m is nn.BatchNorm2d:
                args = [ch[f]]
            elif m is Concat:
                c2 = sum(ch[x] for x in f)
            elif m is Detect:
                args.append([ch[x] for x in f])
                if isinstance(args[1], int):
                    args[1] = [list(range(args[1] * 2))] * len(f)
            else:
                c2 = ch[f]
            m_ = nn.Sequential(*(m(*args, **kwargs) for _ in range(n))) if n > 1 else m(*args, **kwargs)
        except (TypeError, ValueError, RuntimeError, IndexError, KeyError, ZeroDivisionError) as e:
            raise UserError(f"model yaml: layer {i} {row!r} cannot be built: {e}") from None
        t = f"{m.__module__}.{m.__name__}".replace("__main__.", "")
        n_params = sum(x.numel() for x in m_.parameters())
        m_.i, m_.f, m_.type, m_.np = i, f, t, n_params
        LOGGER.info(f"{i:>3}{str(f):>18}{n_:>3}{n_params:10.0f}  {t:<40}{str(args):<30}")
        save.extend(x % i for x in ([f] if isinstance(f, int) else f) if x != -1)
        layers.append(m_)
        if i == 0:
            ch = []
        ch.append(c2)
    return nn.Sequential(*layers), sorted(save)


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description="Build a YOLOv5 model from a yaml and print its summary")
    parser.add_argument("--cfg", type=str, default="yolov5s.yaml", help="model.yaml")
    parser.add_argument("--batch-size", type=int, default=1, help="total batch size for all GPUs")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--act", default=None, help="activation: silu (default), relu, relu6")
    parser.add_argument("--imgsz", type=int, default=640, help="image size for the GFLOPs figure")
    parser.add_argument("--profile", action="store_true", help="profile model speed")
    parser.add_argument("--line-profile", action="store_true", help="profile model speed layer by layer")
    return parser.parse_args(argv)


def main(opt):
    device = select_device(opt.device)
    try:
        act = activation_name(opt.act) if opt.act else None
    except ValueError as e:
        raise UserError(f"--act: {e}") from None
    model = DetectionModel(opt.cfg, act=act).to(device)
    model.info(img_size=opt.imgsz)
    if opt.profile or opt.line_profile:
        im = torch.rand(opt.batch_size, 3, opt.imgsz, opt.imgsz, device=device)
        model.eval()
        with torch.no_grad():
            model(im)
            if opt.line_profile:
                x, y = im, []
                for m in model.model:
                    if m.f != -1:
                        x = y[m.f] if isinstance(m.f, int) else [x if j == -1 else y[j] for j in m.f]
                    t0 = time.perf_counter()
                    x = m(x)
                    LOGGER.info(f"{m.i:>3} {(time.perf_counter() - t0) * 1e3:10.2f} ms  {m.type}")
                    y.append(x if m.i in model.save else None)
            else:
                t0 = time.perf_counter()
                model(im)
                LOGGER.info(f"forward: {(time.perf_counter() - t0) * 1e3:.1f} ms at batch {opt.batch_size}")
    return model


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        run_cli(main, parse_opt())
