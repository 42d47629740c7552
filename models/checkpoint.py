"""What a YOLOv5 checkpoint holds, and loading / saving one.

A checkpoint is upstream's dict (epoch, best_fitness, model, ema, updates, optimizer, opt, git, date, ...). A float
model is pickled whole, as upstream does. A QAT model is stored as what defines it, so that renaming or moving a
quantization class never makes a saved run unloadable:

  ckpt["model"] / ckpt["ema"]   its float architecture (models.quant.float_model: plain Conv blocks and Detect with
                                the QAT model's float weights), pickled as upstream pickles a model, so tools that
                                know nothing of QAT can still read and run the float part;
  ckpt["qat"]                   {"format": QAT_FORMAT, "config": the QAT settings (QATConfig.record(): bn_folding,
                                pow2, pow2_rounding, rounding and the whole recipe), "schedule": how the run used
                                them (train.py: freeze_bn_epoch, disable_observer_epoch, calib_batches; val.py
                                --ptq: ptq, calib_batches)}, once for model and EMA;
  ckpt["qat_state"][key]        {"state_dict": the prepared model's state_dict (weights, BN statistics, every
                                quantizer's scale, zero point and observer state), "attributes": bst's
                                module_attributes, "training": its mode}.

`load_checkpoint` rebuilds such a model: prepare_yolo_qat of the float part with the saved config, then the
state_dict; callers get the QAT model in ckpt["model"] as before, and ckpt["qat"] as {"config": QATConfig,
"schedule": {...}}. Older files load too: format 2 (the settings in each qat_state entry, the schedule beside the
settings in ckpt["qat"]) and format 1 (the QAT modules pickled whole, read as they are). Loading uses an allowlist of
the classes a checkpoint may unpickle (`safe_globals`); the file-level work (safe unpickling, atomic writes, release
downloads) is utils/checkpoint_io.py.
"""
from __future__ import annotations

import os
from dataclasses import replace
from datetime import datetime

import torch
import torch.nn as nn

import bst.torch.ao.nn.intrinsic as nni
import bst.torch.ao.nn.qat as nnqat
import bst.torch.ao.nn.quantized as nnq
from bst.torch.ao import quantization as bq
from bst.torch.ao.nn.intrinsic import qat as nniqat
from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, DWConv, Focus
from models.quant import QuantizedActivation, float_model, is_quantized, load_recipe, prepare_yolo_qat
from models.quant.config import BadRecord, QATConfig
from models.yolo import Detect, DetectionModel, Ensemble
from utils.checkpoint_io import atomic_save, safe_load
from utils.general import LOGGER, UserError
from utils.safe_pickle import object_name

QAT_FORMAT = 3  # written; 1: the QAT modules pickled whole; 2: the settings in each qat_state entry; 3: in ckpt["qat"]
READS = (2, 3)  # formats of a qat_state this version reads (and format 1, which has none)
QAT_KEYS = ("model", "ema")

RELEASE_ALIASES = ("Model",)  # models.yolo names of DetectionModel in earlier release generations
MOVED = {  # classes that moved after checkpoints pickled them: the name those files hold -> the class
    "models.quant.QuantizedActivation": QuantizedActivation,  # models/quant.py became the package models/quant/
}
_NN_CLASSES = (
    nn.Conv2d, nn.ConvTranspose2d, nn.BatchNorm2d, nn.SyncBatchNorm, nn.Linear, nn.Dropout, nn.Identity,
    nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardswish, nn.Sigmoid, nn.Sequential, nn.ModuleList,
    nn.ModuleDict, nn.MaxPool2d, nn.AdaptiveAvgPool2d, nn.Upsample, nn.Flatten,
)


def safe_globals() -> dict:
    """Every class a YOLOv5 checkpoint may hold ("module.Name" -> class), under the names torch pickles them by.

    Only classes (allocated by the reader, never called) and the QAT output hook (a value); the plain-data
    reconstructors (tensors, OrderedDict, numpy values) belong to utils/safe_pickle.py. Releases before v7.0 pickle
    the detection model as models.yolo.Model, the name v7.0 keeps as an alias of DetectionModel."""
    project = [DetectionModel, Detect, Conv, DWConv, Bottleneck, C3, SPP, SPPF, Focus, Concat, Ensemble]
    allowed = {object_name(o): o for o in project + list(_NN_CLASSES) + checkpoint_classes()}
    allowed.update({f"models.yolo.{alias}": DetectionModel for alias in RELEASE_ALIASES})
    allowed["models.experimental.Ensemble"] = Ensemble  # upstream's home of Ensemble
    allowed.update(MOVED)
    return allowed


def checkpoint_classes() -> list:
    """The quantization classes (and the output-quantizer hook) a QAT checkpoint may pickle (QAT models pickled whole,
    before QAT_FORMAT 2), for the allowlist."""
    classes = [QuantizedActivation, bq.output_quantizer_hook]
    for mod in (bq, nniqat, nnqat, nni, nnq):
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj not in classes:
                classes.append(obj)
    return classes


def build_checkpoint(model, *, ema=None, updates=None, epoch=-1, best_fitness=None, optimizer=None, last_opt_step=None,
                     opt=None, git=None, qat=None) -> dict:
    """A checkpoint dict: upstream's keys (epoch -1 and no optimizer for a finished model) and this project's:
    last_opt_step (where gradient accumulation stands, for --resume; only while training) and qat, for a QAT model
    {"config": its QATConfig, "schedule": `qat`, how the run used it}, None for a float model."""
    ckpt = {"epoch": epoch, "best_fitness": best_fitness, "model": model, "ema": ema, "updates": updates,
            "optimizer": optimizer}
    if last_opt_step is not None:
        ckpt["last_opt_step"] = last_opt_step
    record = {"config": model.qat_config, "schedule": dict(qat or {})} if is_quantized(model) else None
    return {**ckpt, "opt": opt, "git": git, "date": datetime.now().isoformat(), "qat": record}


def load_checkpoint(path, map_location="cpu", trust=False):
    """A YOLOv5 checkpoint dict, unpickled with the allowlist above (everything when trusted), its models checked
    (`check_model`) and its QAT models rebuilt (see the module docstring)."""
    ckpt = safe_load(path, safe_globals(), map_location=map_location, trust=trust)
    if not isinstance(ckpt, dict):
        raise UserError(f"{path}: not a YOLOv5 checkpoint (torch.save of a {type(ckpt).__name__}, not of a dict with "
                        f"'model'); give a .pt file written by train.py or a YOLOv5 release")
    for key in QAT_KEYS:
        if ckpt.get(key) is not None:
            check_model(ckpt[key], f"{path}: '{key}'")
    if ckpt.get("qat_state") is not None:
        read_qat_state(ckpt, path)
    elif any(is_quantized(ckpt.get(key)) for key in QAT_KEYS if isinstance(ckpt.get(key), nn.Module)):
        read_pickled_qat_models(ckpt, path)
    return ckpt


_HOOKS = ("_backward_pre_hooks", "_backward_hooks", "_forward_hooks", "_forward_pre_hooks", "_state_dict_hooks",
          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
_DATA_OVER_METHODS = {"type": str}  # parse_model's layer attribute `type` (the module's name) hides nn.Module.type
_MODULE_DICTS = {"_parameters": (nn.Parameter, torch.Tensor), "_buffers": (torch.Tensor,), "_modules": (nn.Module,)}


def check_model(model, where: str):
    """What a checkpoint's model must be before anything runs it: a DetectionModel whose layers are wired as
    parse_model wires them, with the attribute types the code reads, no hooks (a QAT model's output-quantizer hook
    aside), no instance attribute shadowing a method, and a float model must run a 64x64 image. UserError (one line,
    naming `where`) otherwise."""
    def bad(what):
        raise UserError(f"{where} {what}; give a checkpoint written by train.py or a YOLOv5 release")

    if not isinstance(model, DetectionModel):
        bad(f"is a {type(model).__name__}, not a YOLOv5 DetectionModel")
    for name, m in model.named_modules():
        at = f"module {name or 'model'} ({type(m).__name__})"
        for attr, kinds in _MODULE_DICTS.items():
            d = m.__dict__.get(attr)
            if not isinstance(d, dict) or not all(isinstance(k, str) and (v is None or isinstance(v, kinds))
                                                  for k, v in d.items()):
                bad(f"has a malformed {at}: {attr}")
        for attr in _HOOKS:
            hooks = m.__dict__.get(attr, {})
            allowed = (bq.output_quantizer_hook,) if attr == "_forward_hooks" else ()
            if not isinstance(hooks, dict) or any(h not in allowed for h in hooks.values()):
                bad(f"has {attr.strip('_').replace('_', ' ')} on {at} (a checkpoint stores none)")
        for attr, value in m.__dict__.items():
            if attr.startswith("_") or not callable(getattr(type(m), attr, None)):
                continue
            if not (attr in _DATA_OVER_METHODS and isinstance(value, _DATA_OVER_METHODS[attr])):
                bad(f"has an attribute '{attr}' on {at} that shadows its method")
        _check_layer(m, at, bad)
    layers = model.__dict__["_modules"].get("model")
    detect = layers[-1] if isinstance(layers, nn.Sequential) and len(layers) else None
    if not isinstance(detect, Detect):
        bad("has no Detect layer at the end of model.model")
    _check_wiring(model, layers, bad)
    _check_detect(detect, bad)
    names = getattr(model, "names", None)
    if isinstance(names, dict):
        names = [names[k] for k in sorted(names)] if all(isinstance(k, int) for k in names) else None
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        bad(f"has names of type {type(getattr(model, 'names', None)).__name__}; they must be a list of class names "
            f"or an {{index: name}} dict")
    stride = getattr(model, "stride", None)
    if stride is not None and not (isinstance(stride, torch.Tensor) and stride.ndim <= 1 and stride.numel()
                                   and bool(torch.isfinite(stride).all() and (stride > 0).all())):
        bad("has a stride that is not a tensor of positive numbers")
    if not is_quantized(model):
        _run_probe(model, bad)


MAX_WINDOW = 64  # kernel sizes, strides, paddings and dilations; a real layer's are single digits
MAX_SCALE = 16  # an Upsample's scale factor (YOLOv5's is 2)


def _pair(v, lo, hi=MAX_WINDOW) -> bool:
    v = v if isinstance(v, tuple) else (v,)
    return 1 <= len(v) <= 2 and all(isinstance(x, int) and not isinstance(x, bool) and lo <= x <= hi for x in v)


def _check_layer(m, at, bad):
    """A layer's settings as its class reads them, consistent with its tensors: what fusing or running it allocates
    is then bounded by the tensors the file holds (a Conv2d claiming 65536 input channels beside a 16-channel weight
    made fusing allocate a 65536-channel layer)."""
    d = m.__dict__
    if not isinstance(d.get("training"), bool):
        bad(f"has {at} without its training flag")
    if isinstance(m, nn.Conv2d):
        w = d["_parameters"].get("weight")
        ok = isinstance(w, torch.Tensor) and w.ndim == 4 and isinstance(d.get("groups"), int) and d["groups"] >= 1 \
            and d.get("out_channels") == w.shape[0] and d.get("in_channels") == w.shape[1] * d["groups"] \
            and d.get("kernel_size") == tuple(w.shape[2:]) and _pair(d.get("stride"), 1) \
            and _pair(d.get("dilation"), 1) and (_pair(d.get("padding"), 0) or d.get("padding") in ("same", "valid")) \
            and d.get("padding_mode") in ("zeros", "reflect", "replicate", "circular") and d.get("transposed") is False
        b = d["_parameters"].get("bias")
        if not ok or b is not None and tuple(b.shape) != (w.shape[0],):
            bad(f"has {at} whose settings do not match its weight (in/out channels, kernel size, groups, stride, "
                f"padding, dilation)")
    elif isinstance(m, nn.BatchNorm2d):
        n, mean = d.get("num_features"), d["_buffers"].get("running_mean")
        eps = d.get("eps")
        if not (isinstance(n, int) and (mean is None or mean.shape == (n,)) and isinstance(eps, float)
                and 0 < eps < 1 and isinstance(d.get("affine"), bool)):
            bad(f"has {at} whose num_features or eps do not fit its statistics")
    elif isinstance(m, nn.MaxPool2d):
        if not (_pair(d.get("kernel_size"), 1) and _pair(d.get("stride"), 1) and _pair(d.get("padding"), 0)
                and _pair(d.get("dilation"), 1)):
            bad(f"has {at} with a kernel, stride, padding or dilation outside 0..{MAX_WINDOW}")
    elif isinstance(m, nn.Upsample):
        f = d.get("scale_factor")
        if d.get("size") is not None or not isinstance(f, (int, float)) or isinstance(f, bool) \
                or not 0 < f <= MAX_SCALE:
            bad(f"has {at} with scale factor {f!r}; it must be a number in (0, {MAX_SCALE}]")


def _check_wiring(model, layers, bad):
    save = getattr(model, "save", None)
    if not isinstance(save, list) or not all(isinstance(i, int) and 0 <= i < len(layers) for i in save):
        bad("has a 'save' list that does not name its layers")
    for i, m in enumerate(layers):
        f = getattr(m, "f", None)
        ok = isinstance(f, int) and (f == -1 or 0 <= f < i) or isinstance(f, list) and f and all(
            isinstance(j, int) and (j == -1 or 0 <= j < i) for j in f)
        if getattr(m, "i", None) != i or not ok or (i == 0 and f != -1):
            bad(f"has layer {i} wired from {f!r} (index {getattr(m, 'i', None)!r}); layers take earlier layers")
        for j in [f] if isinstance(f, int) else f:
            if j not in (-1, i - 1) and j not in save:
                bad(f"has layer {i} reading layer {j}, which the model does not keep ('save')")


def _check_detect(m, bad):
    ints = {k: getattr(m, k, None) for k in ("nc", "no", "nl", "na")}
    if not all(isinstance(v, int) and v > 0 for v in ints.values()) or ints["no"] != ints["nc"] + 5:
        bad(f"has a Detect layer with counts {ints} (nc, no = nc + 5, nl, na must be positive integers)")
    anchors, convs = getattr(m, "anchors", None), getattr(m, "m", None)
    if not isinstance(anchors, torch.Tensor) or tuple(anchors.shape) != (m.nl, m.na, 2):
        bad(f"has Detect anchors that are not a ({m.nl}, {m.na}, 2) tensor")
    if not isinstance(convs, nn.ModuleList) or len(convs) != m.nl:
        bad(f"has a Detect layer with {len(convs) if isinstance(convs, nn.ModuleList) else 'no'} convs for {m.nl} "
            f"levels")
    stride = getattr(m, "stride", None)
    if stride is not None and not (isinstance(stride, torch.Tensor) and stride.numel() == m.nl):
        bad(f"has a Detect stride that is not a tensor of {m.nl} strides")
    for k in ("grid", "anchor_grid"):
        if not isinstance(getattr(m, k, []), (list, torch.Tensor)):
            bad(f"has a Detect {k} that is neither a list nor a tensor")


def check_runs(model, where: str, step: str):
    """After `step` changed a checked model (fusing Conv and BN for inference), the same 64x64 probe: a layer
    missing an attribute that only the changed path reads (Conv2d.in_channels for fusing) is one UserError, not a
    traceback in the middle of val.py or detect.py."""
    def bad(what):
        raise UserError(f"{where} {what} after {step}; give a checkpoint written by train.py or a YOLOv5 release")

    _run_probe(model, bad)


@torch.no_grad()
def _run_probe(model, bad):
    """One eval forward of a 64x64 zero image in the model's dtype (grids are rebuilt by the loaders anyway)."""
    detect = model.model[-1]
    training, grid, anchor_grid = model.training, detect.grid, detect.anchor_grid
    p = next(model.parameters(), None)
    try:
        detect.grid, detect.anchor_grid = [torch.empty(0)] * detect.nl, [torch.empty(0)] * detect.nl
        x = torch.zeros(1, model.yaml.get("ch", 3) if isinstance(getattr(model, "yaml", None), dict) else 3, 64, 64,
                        dtype=p.dtype if p is not None else torch.float32,
                        device=p.device if p is not None else "cpu")
        out = model.eval()(x)
        if not isinstance(out, tuple) or not isinstance(out[0], torch.Tensor) or out[0].shape[-1] != detect.no:
            bad("does not compute detections")
    except UserError:
        raise
    except Exception as e:  # wrong layer types or shapes fail in many ways; the user gets one line
        bad(f"does not run as a detection model ({type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''})")
    finally:
        model.train(training)
        detect.grid, detect.anchor_grid = grid, anchor_grid


def save_checkpoint(obj, path):
    """Write a checkpoint dict atomically (a kill during the write never leaves a truncated file); QAT models go in
    as float part + QAT state, their config once in ckpt["qat"] (the module docstring). `obj` is not changed."""
    obj = dict(obj)
    states, configs = {}, []
    for key in QAT_KEYS:
        model = obj.get(key)
        if isinstance(model, nn.Module) and is_quantized(model):
            configs.append(model.qat_config)
            states[key] = {"state_dict": model.state_dict(), "attributes": bq.module_attributes(model),
                           "training": model.training}
            obj[key] = float_model(model)
    if states:
        if any(c != configs[0] for c in configs):
            raise ValueError("save_checkpoint: model and EMA are quantized differently; a checkpoint holds one config")
        obj["qat"] = {"format": QAT_FORMAT, "config": configs[0].record(), "schedule": _schedule(obj.get("qat"))}
        obj["qat_state"] = states
    return atomic_save(obj, path)


def _schedule(record) -> dict:
    """The run schedule of a ckpt["qat"] record of any format: format 3 and in memory keep it apart from the config;
    formats 1-2 kept it beside the settings."""
    if not isinstance(record, dict):
        return {}
    if "schedule" in record:
        return dict(record["schedule"] or {})
    return {k: v for k, v in record.items() if k not in QATConfig.dests().values() and k != "format"}


def _damaged(path, what, right):
    return UserError(f"{path}: damaged QAT state ({what}; it must be {right}); give a QAT checkpoint written by "
                     f"train.py --qat")


def read_qat_state(ckpt, path="checkpoint"):
    """Rebuild the QAT models a format-2 or format-3 checkpoint stores (in place): ckpt["model"] / ckpt["ema"] become
    QAT models, ckpt["qat"] {"config": QATConfig, "schedule": {...}}, and "qat_state" goes."""
    states = ckpt.pop("qat_state")
    if not isinstance(states, dict) or not set(states) <= set(QAT_KEYS) or not all(
            isinstance(s, dict) for s in states.values()):
        raise UserError(f"{path}: corrupt QAT checkpoint (qat_state must map model/ema to their QAT state)")
    record = ckpt.get("qat") if isinstance(ckpt.get("qat"), dict) else {}
    formats = {s.get("format") for s in states.values()}
    if formats == {None}:  # format 3 says it once, in ckpt["qat"]
        fmt, ok = record.get("format"), record.get("format") == 3
    else:  # up to format 2 each entry said it
        fmt = formats.pop() if len(formats) == 1 else sorted(formats, key=repr)
        ok = fmt == 2
    if not ok:
        raise UserError(f"{path}: QAT checkpoint format {fmt!r}; this version of yolov5-qat reads formats "
                        f"{' and '.join(map(str, READS))} (and QAT models pickled whole); update it to read this file")
    config = None
    for key, state in states.items():
        try:  # format 2: each entry holds its settings
            if fmt == 2:
                own = _legacy_config(state.get("qat"))
            else:
                own = config or QATConfig.from_record(record.get("config"))
        except BadRecord as e:
            raise _damaged(path, e.what, e.right) from None
        check_qat_state(state, path)
        ckpt[key] = rebuild_qat_model(ckpt.get(key), state, own, path)
        config = config or own
    schedule = _schedule(record)
    if not all(isinstance(k, str) and isinstance(v, (bool, int, float, str, type(None))) for k, v in schedule.items()):
        raise _damaged(path, "'schedule' is not a mapping of plain values", "{setting: value}")
    ckpt["qat"] = {"config": config, "schedule": schedule}


def _legacy_config(record) -> QATConfig:
    """The settings as formats 1 and 2 recorded them (`model.qat`, a qat_state entry's "qat"): bn_folding and pow2
    always recorded; pow2_rounding, rounding and the recipe taking their defaults where a model quantized before they
    existed lacks them; 'activations' a list."""
    config = QATConfig.from_record(record, required=("bn_folding", "pow2"), extra=("activations",), name="qat")
    acts = record.get("activations", [])
    if not isinstance(acts, list) or not all(isinstance(a, str) for a in acts):
        raise BadRecord(f"the setting 'activations' is {acts!r:.60}", "a list of names")
    return config


def read_pickled_qat_models(ckpt, path="checkpoint"):
    """Format 1 (QAT models pickled whole, their settings in `model.qat`): each model gets its QATConfig
    (`model.qat_config`), and ckpt["qat"] becomes {"config", "schedule"} like a rebuilt checkpoint's."""
    config = None
    for key in QAT_KEYS:
        model = ckpt.get(key)
        if not (isinstance(model, nn.Module) and is_quantized(model)):
            continue
        try:
            own = _legacy_config(model.__dict__.pop("qat", None))
        except BadRecord as e:
            raise _damaged(path, e.what, e.right) from None
        own = own if isinstance(own.recipe, dict) else replace(own, recipe=load_recipe(own.recipe))
        model.qat_config = own
        config = config or own
    ckpt["qat"] = {"config": config, "schedule": _schedule(ckpt.get("qat"))}


def rebuild_qat_model(float_part, state, config, path="checkpoint"):
    """The QAT model a qat_state entry describes: prepared from `float_part` with `config`, then loaded."""
    if not isinstance(float_part, nn.Module):
        raise UserError(f"{path}: corrupt QAT checkpoint (no float model beside its QAT state)")
    device = next(float_part.parameters()).device
    model = prepare_yolo_qat(float_part.float().train(), config, verbose=False).to(device)
    try:
        model.load_state_dict(state["state_dict"])
        bq.load_module_attributes(model, state["attributes"])
    except (RuntimeError, ValueError) as e:
        first = str(e).splitlines()[0][:160]
        raise UserError(f"{path}: the QAT state does not fit the model rebuilt from its settings ({first})") from None
    return model.train(state["training"])


def check_qat_state(state, path="checkpoint"):
    """What rebuild_qat_model reads from a `qat_state` entry besides the config, checked before any of it is used:
    one UserError naming the file, the entry and what it must be."""
    sd = state.get("state_dict")
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise _damaged(path, "'state_dict' is not a mapping of names to tensors", "the prepared model's state_dict")
    attrs = state.get("attributes")
    if not isinstance(attrs, dict) or not all(isinstance(k, str) and isinstance(v, dict) and all(
            isinstance(a, str) and isinstance(x, (bool, int, float, str, type(None))) for a, x in v.items())
            for k, v in attrs.items()):
        raise _damaged(path, "'attributes' is not a mapping of module names to plain settings",
                       "{module name: {attribute: value}}")
    if not isinstance(state.get("training"), bool):
        raise _damaged(path, f"'training' is {state.get('training')!r:.40}", "true or false")


def strip_optimizer(f="best.pt", s=""):
    """Drop optimizer/EMA state from a finished checkpoint and store the (EMA) model in FP16, atomically.

    QAT models stay float32: rounding their weights to FP16 could move fake-quantized weights to other
    int8 steps, and val.py of best.pt must reproduce the mAP training printed.
    """
    x = load_checkpoint(f)
    if x.get("ema"):
        x["model"] = x["ema"]
    for k in "optimizer", "best_fitness", "ema", "updates":
        x[k] = None
    x.pop("last_opt_step", None)  # resume state, meaningless without the optimizer
    x["epoch"] = -1
    if not is_quantized(x["model"]):
        x["model"].half()
    for p in x["model"].parameters():
        p.requires_grad = False
    save_checkpoint(x, s or f)
    mb = os.path.getsize(s or f) / 1e6
    LOGGER.info(f"Optimizer stripped from {f},{f' saved as {s},' if s else ''} {mb:.1f}MB")
