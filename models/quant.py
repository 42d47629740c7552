"""YOLOv5 QAT glue: which modules to fuse, where the skip-adds and concats are, and QAT recipes.

The quantization library (bst.torch.ao) knows nothing about YOLO; this module tells it:
  * every Conv block (conv + BN + act) becomes a fused QAT module: with `bn_folding` BN stays live with
    simulated folding (ConvBn[ReLU|ReLU6]2d); without it BN is folded into the conv first (Conv[ReLU]2d);
  * the Bottleneck skip-add and every concat (C3, SPPF, Concat, ...) go through a FloatFunctional with
    its own output quantizer (models/common.py calls `qadd` / `qcat` when present);
  * the input image is quantized by a QuantStub (`model.input_quant`);
  * Detect's 1x1 convs become QAT convs with an output quantizer; sigmoid and box decoding stay float.

A recipe (data/quant/*.yaml) sets the defaults and per-module overrides:

    default:                         # every quantized module, unless a rule says otherwise
      activation: {observer: minmax | moving_average | percentile | mse, percentile: 99.99,
                   training_update: track | search}   # calibrators while training with observers on
      learnable: false               # LSQ scales (log2 of the scale when pow2)
    rules:                           # applied in order; later rules win
      - match: "24"                  # a model index (model.24 and everything under it) or a name glob
        mode: float                  # float (excluded) | weight_only | quantize
      - match: "model.24.m.*"
        activation: {fixed: {scale: 0.0625, zero_point: 0}}   # fixed qparams (8/128 = 2**-4)
      - match: "model.0"
        activation: {observer: mse}
        learnable: true
"""
from __future__ import annotations

import fnmatch
import inspect
import math
from contextlib import contextmanager
from copy import deepcopy
from pathlib import Path

import torch
import torch.nn as nn

import bst.torch.ao.nn.intrinsic as nni
import bst.torch.ao.nn.qat as nnqat
import bst.torch.ao.nn.quantized as nnq
from bst.torch.ao import quantization as bq
from bst.torch.ao.nn.intrinsic import qat as nniqat
from bst.torch.ao.nn.quantized import FloatFunctional
from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, DWConv, Focus, activation_name
from models.yolo import Detect
from utils.general import LOGGER, ROOT, UserError, check_file, yaml_load
from utils.torch_utils import fuse_conv_and_bn

OBSERVERS = {
    "minmax": bq.MinMaxObserver,
    "moving_average": bq.MovingAverageMinMaxObserver,
    "percentile": bq.PercentileObserver,
    "mse": bq.MSEObserver,
}
PER_CHANNEL = {  # per_channel: true -> one scale (a shift on shift hardware) per output channel, axis 1 of NCHW
    "minmax": bq.PerChannelMinMaxObserver,
    "moving_average": bq.MovingAveragePerChannelMinMaxObserver,
}
CALIBRATORS = ("percentile", "mse")  # observers with a calibration search (training_update: track | search)
MODES = ("quantize", "float", "weight_only")
DEFAULT_RECIPE = {"default": {"activation": {"observer": "mse"}, "learnable": False}, "rules": []}


class QuantizedActivation(nnqat.TableActivation):
    """A float activation (SiLU, Hardswish, ...) whose output gets a quantizer: shift hardware applies it
    as a lookup table on int8, so its output must be on an int8 grid too. bst's TableActivation: frozen, it computes
    through the table `convert_yolo` makes of it (this class keeps the name checkpoints pickled)."""


# ---------------------------------------------------------------------------------------------- recipes

def load_recipe(recipe) -> dict:
    """A recipe dict from a yaml path, a dict or None (the default recipe), checked against the recipe schema before
    any model is touched: every problem is one UserError naming the file, the entry and what is allowed."""
    if recipe is None or recipe == "":
        default_file = ROOT / "data/quant/default.yaml"
        return load_recipe(default_file) if default_file.is_file() else deepcopy(DEFAULT_RECIPE)
    if isinstance(recipe, (str, Path)):
        path = check_file(recipe, search_dirs=("data/quant",))
        data = yaml_load(path)
        where = str(Path(path).name)
        if not isinstance(data, dict):
            raise UserError(f"{where}: a recipe must be a mapping with default, rules, concat, description; "
                            f"got a {type(data).__name__}")
        data["file"] = where
    else:
        if not isinstance(recipe, dict):
            raise UserError(f"recipe: must be a mapping with default, rules, concat, description; "
                            f"got a {type(recipe).__name__}")
        data = deepcopy(recipe)
    where = data.get("file", "recipe")
    _check_keys(data, {"default", "rules", "file", "description", "concat"}, where)
    concat = data.get("concat") or {}
    if not isinstance(concat, dict):
        raise UserError(f"{where}: concat must be a mapping {{share_input_scales: true/false}}")
    _check_keys(concat, {"share_input_scales"}, f"{where}: concat")
    _check_bool(concat, "share_input_scales", f"{where}: concat")
    data["concat"] = concat
    default = data.setdefault("default", deepcopy(DEFAULT_RECIPE["default"])) or {}
    if not isinstance(default, dict):
        raise UserError(f"{where}: default must be a mapping with activation and learnable")
    data["default"] = default
    _check_keys(default, {"activation", "learnable"}, f"{where}: default")
    _check_bool(default, "learnable", f"{where}: default")
    _activation_spec(default.get("activation"), f"{where}: default")
    rules = data.setdefault("rules", []) or []
    if not isinstance(rules, list):
        raise UserError(f"{where}: rules must be a list of {{match: ..., mode/activation/learnable: ...}} entries")
    data["rules"] = rules
    for i, rule in enumerate(rules):
        at = f"{where}: rule {i}"
        if not isinstance(rule, dict) or "match" not in rule:
            raise UserError(f"{at} needs a 'match' (a model index like 24 or a name glob like model.24.m.*)")
        _check_keys(rule, {"match", "mode", "activation", "learnable"}, at)
        if not isinstance(rule["match"], (str, int)) or isinstance(rule["match"], bool):
            raise UserError(f"{at}: match {rule['match']!r} must be a model index like 24 or a name glob")
        if rule.get("mode", "quantize") not in MODES:
            raise UserError(f"{at}: mode {rule['mode']!r} must be one of {', '.join(MODES)}")
        _check_bool(rule, "learnable", at)
        _activation_spec(rule.get("activation"), at)
    return data


def _check_keys(entry: dict, allowed: set, where: str):
    unknown = sorted(str(k) for k in set(entry) - allowed)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {unknown}; allowed: {', '.join(sorted(allowed - {'file'}))}")


def _check_bool(entry: dict, key: str, where: str):
    if key in entry and entry[key] is not None and not isinstance(entry[key], bool):
        raise UserError(f"{where}: {key} {entry[key]!r} must be true or false")


# set by the project (from --pow2-scale / --pow2-rounding and the layer), not by a recipe
_PROJECT_OBSERVER_ARGS = {"dtype", "qscheme", "reduce_range", "quant_min", "quant_max", "eps", "pow2", "pow2_rounding"}


def _activation_spec(spec, where):
    """An activation entry: {observer: NAME, <that observer's own options>} or {fixed: {scale, zero_point[, dtype]}}.
    Observer options are checked by building the observer once with them (its own range checks)."""
    if spec is None:
        return
    if not isinstance(spec, dict) or len({"observer", "fixed"} & set(spec)) != 1:
        raise UserError(f"{where}: activation must be {{observer: NAME, ...options}} or "
                        f"{{fixed: {{scale: S, zero_point: Z}}}}")
    if "fixed" in spec:
        _check_keys(spec, {"fixed"}, f"{where}: activation")
        _fixed_qparams(spec["fixed"], where)
        return
    name = spec["observer"]
    if not isinstance(name, str) or name not in OBSERVERS:
        raise UserError(f"{where}: observer {name!r} unknown; choose one of {', '.join(OBSERVERS)}")
    update = spec.get("training_update")
    if update is not None and (name not in CALIBRATORS or update not in bq.TRAINING_UPDATES):
        raise UserError(f"{where}: training_update {update!r}: the {' and '.join(CALIBRATORS)} observers take "
                        f"{' or '.join(bq.TRAINING_UPDATES)}")
    per_channel = spec.get("per_channel", False)
    if not isinstance(per_channel, bool):
        raise UserError(f"{where}: per_channel {per_channel!r} must be true or false")
    if per_channel and name not in PER_CHANNEL:
        raise UserError(f"{where}: per_channel: true works with the {' and '.join(PER_CHANNEL)} observers, "
                        f"not {name}")
    options = {k: v for k, v in spec.items() if k not in ("observer", "per_channel")}
    allowed = set(inspect.signature(OBSERVERS[name]).parameters) - _PROJECT_OBSERVER_ARGS
    _check_keys(options, allowed | {"observer"}, f"{where}: activation observer {name}")
    for k, v in options.items():
        if k != "training_update" and (isinstance(v, bool) or not isinstance(v, (int, float))):
            raise UserError(f"{where}: {name} option {k} {v!r} must be a number")
    try:
        OBSERVERS[name](**options)
    except (ValueError, TypeError, OverflowError) as e:
        raise UserError(f"{where}: {name} observer: {e}") from None


def _fixed_qparams(fx, where):
    """(scale, zero_point, signed) of a recipe's fixed activation entry, checked."""
    if not isinstance(fx, dict) or not {"scale", "zero_point"} <= set(fx):
        raise UserError(f"{where}: fixed activation needs scale and zero_point, e.g. {{scale: '8/128', zero_point: 0}}")
    _check_keys(fx, {"scale", "zero_point", "dtype"}, f"{where}: fixed")
    try:
        scale = eval_fraction(fx["scale"])
    except (ValueError, TypeError, ZeroDivisionError):
        scale = float("nan")
    if not (math.isfinite(scale) and scale > 0):
        raise UserError(f"{where}: fixed scale {fx['scale']!r} must be a positive finite number or fraction "
                        "like '8/128'")
    dtype = fx.get("dtype", "qint8")
    if dtype not in ("qint8", "quint8"):
        raise UserError(f"{where}: fixed dtype {dtype!r} must be qint8 or quint8")
    zp = fx["zero_point"]
    if isinstance(zp, bool) or not isinstance(zp, int) or not 0 <= zp <= 255:
        raise UserError(f"{where}: fixed zero_point {zp!r} must be an integer: 0 for signed int8 data, "
                        f"0-255 for unsigned (dtype quint8)")
    return scale, zp, zp == 0 and dtype == "qint8"


def _rule_targets(model, pattern, where):
    """Qualified module names a rule's `match` selects (an index, 'model.N', or a glob)."""
    pattern = str(pattern)
    names = [n for n, _ in model.named_modules() if n]
    if pattern.isdigit():
        pattern = f"model.{pattern}"
    hits = [n for n in names if n == pattern or fnmatch.fnmatchcase(n, pattern)]
    if not hits:
        raise UserError(f"{where}: match {pattern!r} names no module of this model "
                        f"(model indices are 0-{len(model.model) - 1}; names look like model.24.m.0)")
    return hits


def make_qconfig(pow2: bool, spec: dict | None, learnable: bool, pow2_rounding="ceil", weight_only=False,
                 where="recipe", rounding="half_even"):
    """A QConfig from a recipe entry (`where` names it in errors); every quantizer rounds ties by `rounding`."""
    spec = spec or {"observer": "mse"}
    if "fixed" in spec:
        scale, zp, signed = _fixed_qparams(spec["fixed"], where)
        if pow2 and not bool(bq.is_pow2(torch.tensor(scale)).all()):
            raise UserError(f"{where}: fixed scale {spec['fixed']['scale']!r} is not a power of two, but --pow2-scale "
                            f"makes every scale one (e.g. 8/128 = 2**-4)")
        obs = bq.FixedQParamsObserver.with_args(
            scale=scale, zero_point=zp,
            dtype=torch.qint8 if signed else torch.quint8, qscheme=torch.per_tensor_affine,
            quant_min=-128 if signed else 0, quant_max=127 if signed else 255, pow2=pow2)
        base = bq.get_default_qat_qconfig(pow2=pow2, pow2_rounding=pow2_rounding, learnable=learnable,
                                          rounding=rounding)
        act = bq.FixedQParamsFakeQuantize.with_args(observer=obs, rounding=rounding)
        return bq.QConfig(activation=None if weight_only else act, weight=base.weight)
    kwargs = {k: v for k, v in spec.items() if k not in ("observer", "per_channel")}
    if spec.get("per_channel"):
        # signed, zero point 0: requantization is the per-channel shift alone (a zero point added after rounding
        # would also make the integer form round ties differently from the shift)
        observer, kwargs = PER_CHANNEL[spec["observer"]], {**kwargs, "ch_axis": 1}
        dtype, qscheme = torch.qint8, torch.per_channel_symmetric
    else:
        observer, dtype, qscheme = OBSERVERS[spec["observer"]], torch.quint8, torch.per_tensor_affine
    act_observer = observer.with_args(**kwargs) if kwargs else observer
    qc = bq.get_default_qat_qconfig(pow2=pow2, pow2_rounding=pow2_rounding, learnable=learnable,
                                    activation_observer=act_observer, activation_dtype=dtype,
                                    activation_qscheme=qscheme, rounding=rounding)
    return bq.QConfig(activation=None, weight=qc.weight) if weight_only else qc


def eval_fraction(v):
    """'8/128' -> 0.0625; numbers pass through. No eval()."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a number")
    if isinstance(v, str) and "/" in v:
        a, b = v.split("/", 1)
        return float(a) / float(b)
    return float(v)


# ---------------------------------------------------------------------------------------------- prepare

def _fuse_conv_blocks(model, bn_folding: bool):
    for name, m in list(model.named_modules()):
        if not isinstance(m, (Conv, DWConv)) or not isinstance(getattr(m, "bn", None), nn.BatchNorm2d):
            continue
        relu = type(m.act) in (nn.ReLU, nn.ReLU6)
        if bn_folding:
            group = [f"{name}.conv", f"{name}.bn"] + ([f"{name}.act"] if relu else [])
        else:
            was = m.conv.weight.requires_grad
            m.conv = fuse_conv_and_bn(m.conv, m.bn).requires_grad_(was).train(m.training)
            m.bn = nn.Identity()
            group = [f"{name}.conv", f"{name}.act"] if relu else None
        if group:
            bq.fuse_modules_qat(model, group, inplace=True)


def _attach_functionals(model):
    for m in model.modules():
        if isinstance(m, Bottleneck) and m.add:
            m.qadd = FloatFunctional()
        elif isinstance(m, (C3, SPPF, SPP, Focus, Concat)):
            m.qcat = FloatFunctional()


def prepare_yolo_qat(model, bn_folding=False, pow2=False, recipe=None, pow2_rounding="ceil", rounding="half_even",
                     verbose=True):
    """Turn a float DetectionModel (training mode) into a QAT model, in place; returns it. `rounding`: how every
    quantizer rounds ties, "half_even" or "half_up" (shift hardware's add-then-shift). verbose: log what was made."""
    recipe = load_recipe(recipe)
    if any(isinstance(m, (bq.FakeQuantizeBase,)) for m in model.modules()):
        raise UserError("model is already prepared for QAT")
    acts = {activation_name(m.act) for m in model.modules() if isinstance(m, Conv)}
    model.train()
    _fuse_conv_blocks(model, bn_folding)
    _attach_functionals(model)
    model.input_quant = bq.QuantStub()
    # images are x/255 in [0, 1]: 1/255 puts every pixel exactly on the grid; shift hardware takes 2**-8
    model.input_quant.qconfig = make_qconfig(pow2, {"fixed": {"scale": 2 ** -8 if pow2 else 1 / 255, "zero_point": 0,
                                                              "dtype": "quint8"}}, False, pow2_rounding,
                                             rounding=rounding)

    default = recipe["default"]
    where = recipe.get("file", "recipe")
    model.qconfig = make_qconfig(pow2, default.get("activation"), bool(default.get("learnable")), pow2_rounding,
                                 where=f"{where}: default", rounding=rounding)
    for i, rule in enumerate(recipe["rules"]):
        mode = rule.get("mode", "quantize")
        for name in _rule_targets(model, rule["match"], f"{where}: rule {i}"):
            target = model.get_submodule(name)
            if mode == "float":
                target.qconfig = None
            else:
                spec = rule.get("activation", default.get("activation"))
                learn = bool(rule.get("learnable", default.get("learnable")))
                target.qconfig = make_qconfig(pow2, spec, learn, pow2_rounding, weight_only=mode == "weight_only",
                                              where=f"{where}: rule {i}", rounding=rounding)
    mapping = bq.get_default_qat_module_mappings()
    mapping.update({nn.SiLU: QuantizedActivation, nn.Hardswish: QuantizedActivation})
    bq.prepare_qat(model, mapping=mapping, inplace=True)
    for m in model.modules():  # qconfigs hold constructors; they are not needed after prepare (nor pickled)
        m.__dict__.pop("qconfig", None)
    model.qat = {"bn_folding": bool(bn_folding), "pow2": bool(pow2), "pow2_rounding": pow2_rounding,
                 "rounding": rounding, "recipe": recipe, "activations": sorted(acts)}
    n_q = sum(isinstance(m, bq.FakeQuantizeBase) for m in model.modules())
    log = LOGGER.info if verbose else LOGGER.debug
    log(f"QAT: prepared {n_q} fake quantizers (bn_folding={bn_folding}, pow2={pow2}, "
        + (f"rounding={rounding}, " if rounding != "half_even" else "")
        + f"recipe={recipe.get('file', 'default')})")
    return model


@torch.no_grad()
def share_concat_scales(model, example) -> int:
    """Give every concat's inputs and its output one scale, the largest of them, so that an int8 concat needs no
    requantization on shift hardware. Concats that share an input are joined into one group. Applies to plain
    per-tensor FakeQuantize modules with frozen observers (observers would overwrite the shared scale);
    groups whose zero points differ are left alone with a warning. Returns the number of groups changed."""
    inputs = bq.trace_input_quantizers(model, (example,))
    parent = {}

    def find(q):
        while parent.setdefault(q, q) is not q:
            q = parent[q]
        return q

    for m in model.modules():
        op = getattr(m, "qcat", None) if isinstance(m, (C3, SPPF, SPP, Focus, Concat)) else None
        if not isinstance(op, FloatFunctional) or not isinstance(op.activation_post_process, bq.FakeQuantizeBase):
            continue
        members = [q for q in inputs.get(op, []) if q is not None] + [op.activation_post_process]
        for q in members[1:]:
            parent[find(q)] = find(members[0])
    groups = {}
    for q in list(parent):
        groups.setdefault(find(q), []).append(q)
    changed = 0
    for group in groups.values():
        usable = [q for q in group if type(q) is bq.FakeQuantize and q.scale.numel() == 1]
        if len(usable) < 2:
            continue
        if len({int(q.zero_point) for q in usable}) > 1:
            LOGGER.warning(f"QAT: concat group of {len(usable)} quantizers has different zero points; "
                           "scales not shared")
            continue
        scale = max(float(q.scale) for q in usable)
        for q in usable:
            q.scale.fill_(scale)
        changed += 1
    LOGGER.info(f"QAT: concat inputs and outputs share one scale in {changed} groups")
    return changed


def quantizers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, bq.FakeQuantizeBase)]


def all_scales_pow2(model) -> bool:
    return all(bool(bq.is_pow2(m.scale.float()).all()) for _, m in quantizers(model) if hasattr(m, "scale"))


def set_observers(model, enabled: bool):
    model.apply(bq.enable_observer if enabled else bq.disable_observer)


def set_fake_quant(model, enabled: bool):
    model.apply(bq.enable_fake_quant if enabled else bq.disable_fake_quant)


def freeze_bn(model):
    model.apply(nniqat.freeze_bn_stats)


def observer_states(model):
    return [bool(m.observer_enabled[0]) for _, m in quantizers(model)]


def restore_observer_states(model, states):
    for (_, m), on in zip(quantizers(model), states):
        m.enable_observer(on)


def model_rounding(model) -> str:
    """How the enabled fake quantizers of `model` round ties: "half_even", "half_up" or "mixed"."""
    rules = {m.rounding for m in model.modules() if bq.fake_quant_enabled(m)}
    return rules.pop() if len(rules) == 1 else "mixed" if rules else "half_even"


def model_pow2(model) -> bool:
    """True when every enabled fake quantizer of `model` keeps power-of-two scales."""
    qs = [m for m in model.modules() if bq.fake_quant_enabled(m)]
    return bool(qs) and all(bool(getattr(m, "pow2", False)) for m in qs)


def is_quantized(model) -> bool:
    """True for a QAT-prepared model (it carries fake quantizers, which fusion must not touch)."""
    return any(isinstance(m, bq.FakeQuantizeBase) for m in model.modules())


def example_input(model, size: int = 64) -> torch.Tensor:
    """A small input on the model's device: enough for one traced forward of a YOLOv5 model (stride <= 32)."""
    t = next(model.parameters(), None)
    t = next(model.buffers(), None) if t is None else t
    return torch.zeros(1, 3, size, size, device=t.device if t is not None else "cpu", dtype=torch.float32)


def freeze(model):
    """Freeze a QAT DetectionModel's qparams for evaluation or export (bq.freeze_qparams); returns it.
    val.py, detect.py, training's validation and export.py all evaluate a QAT model through this."""
    training = model.training
    bq.freeze_qparams(model, (example_input(model),))
    model.train(training)
    return model


@contextmanager
def observers_frozen(model):
    """``with observers_frozen(model):`` evaluate with frozen qparams; each observer's on/off state comes back
    afterwards, also when the evaluation raises."""
    states = observer_states(model)
    try:
        yield freeze(model)
    finally:
        restore_observer_states(model, states)


def apply_schedule(model, epoch: int, freeze_bn_epoch: int, disable_observer_epoch: int):
    """BN statistics and observers per the QAT flags at the start of `epoch` (-1: never)."""
    if freeze_bn_epoch >= 0 and epoch >= freeze_bn_epoch:
        freeze_bn(model)
    observe = not (disable_observer_epoch >= 0 and epoch >= disable_observer_epoch)
    set_observers(model, observe)
    return {"bn_frozen": freeze_bn_epoch >= 0 and epoch >= freeze_bn_epoch, "observers": observe}


@torch.no_grad()
def calibrate(model, loader, n_batches: int, device):
    """Observers on, fake quantization off, eval mode (BN statistics untouched): fill the observers
    with `n_batches` batches, then freeze them into scales and turn fake quantization on."""
    model.eval()
    set_fake_quant(model, False)
    set_observers(model, True)
    seen = 0
    for i, batch in enumerate(loader):
        if i >= n_batches:
            break
        imgs = batch[0].to(device, non_blocking=True).float() / 255
        model(imgs)
        seen += imgs.shape[0]
    set_fake_quant(model, True)
    freeze(model)  # observers off: computes lazily evaluated qparams (e.g. MSE) now
    model.train()
    LOGGER.info(f"QAT: calibrated on {seen} images ({min(n_batches, len(loader))} batches)")
    return seen


def float_model(model):
    """The float architecture of a QAT DetectionModel, as upstream pickles a model (Conv blocks of conv, BN and
    activation; Detect convs; no quantizers), computing what the QAT model computes with fake quantization off. It
    shares the QAT model's weight, bias and BN tensors (so a checkpoint holding both stores them once); where BN was
    folded into the conv before QAT, an identity BN (weight 1, mean 0, variance 1 - eps) carries the conv's bias.
    `prepare_yolo_qat` of it with the QAT model's settings rebuilds the QAT model's architecture (models/checkpoint.py
    stores QAT models this way)."""
    if not is_quantized(model):
        raise ValueError("model: not a QAT model")
    shared = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    f = deepcopy(model, shared)  # new modules around the same tensors
    f.__dict__.pop("qat", None)
    f._modules.pop("input_quant", None)
    for m in list(f.modules()):
        m._forward_hooks.clear()  # prepare_qat's output-quantizer hooks
        for attr in ("qadd", "qcat"):
            m._modules.pop(attr, None)
        if isinstance(m, Conv):
            _float_conv_block(m)
        elif isinstance(m, Detect):
            m.m = nn.ModuleList(_float_parts(c)[0] for c in m.m)
    if is_quantized(f) or any(isinstance(m, FloatFunctional) for m in f.modules()):
        raise ValueError("model: has quantized modules outside Conv blocks and Detect; no float architecture")
    return f


def _float_parts(mod) -> list:
    """A prepared conv (QAT, or the float fused container of a layer left in float) as plain float modules
    [conv, (BN), (ReLU / ReLU6)] over the same tensors."""
    if isinstance(mod, nn.Sequential):  # a float fused container (a layer the recipe left in float)
        return list(mod)
    if not isinstance(mod, (nnqat.Conv2d, nniqat.ConvBn2d)):
        return [mod]
    conv = nn.Conv2d(mod.in_channels, mod.out_channels, mod.kernel_size, mod.stride, mod.padding, mod.dilation,
                     mod.groups, mod.bias is not None, mod.padding_mode, device="meta")
    conv.weight = mod.weight
    conv.bias = mod.bias
    parts = [conv, mod.bn] if isinstance(mod, nniqat.ConvBn2d) else [conv]
    if isinstance(mod, (nniqat.ConvBnReLU2d, nniqat.ConvReLU2d)):
        parts.append(nn.ReLU(inplace=True))
    elif isinstance(mod, (nniqat.ConvBnReLU62d, nniqat.ConvReLU62d)):
        parts.append(nn.ReLU6(inplace=True))
    return parts


def _float_conv_block(block):
    parts = _float_parts(block.conv)
    conv = parts[0]
    bn = next((p for p in parts[1:] if isinstance(p, nn.BatchNorm2d)), None)
    act = next((p for p in parts[1:] if isinstance(p, (nn.ReLU, nn.ReLU6))), None)
    if bn is None:  # BN was folded into the conv before QAT: an identity BN carries the bias
        device = conv.weight.device
        bn = nn.BatchNorm2d(conv.out_channels, eps=1e-3, momentum=0.03, device=device)
        with torch.no_grad():
            bn.running_var.fill_(1 - bn.eps)
        if conv.bias is not None:
            bn.bias = conv.bias
        plain = nn.Conv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                          conv.dilation, conv.groups, False, conv.padding_mode, device="meta")
        plain.weight = conv.weight
        conv = plain
    block.conv, block.bn = conv, bn
    if act is not None:
        block.act = act
    elif isinstance(block.act, QuantizedActivation):
        block.act = block.act.act


def checkpoint_classes() -> list:
    """The quantization classes (and the output-quantizer hook) a QAT checkpoint pickles; models/checkpoint.py
    adds them to the weights_only allowlist."""
    classes = [QuantizedActivation, bq.output_quantizer_hook]
    for mod in (bq, nniqat, nnqat, nni, nnq):
        for name in dir(mod):
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, nn.Module) and obj not in classes:
                classes.append(obj)
    return classes


# ---------------------------------------------------------------------------------------------- integer model

def convert_yolo(model, example=None, integer=True):
    """The integer network of a QAT DetectionModel: bst.convert of a frozen copy (int8 weights, int32 biases on the
    grid input scale x weight scale, power-of-two requantization, quantized adds and concats). `model` is frozen
    (observers off) but otherwise untouched. The converted model computes in float exactly what the QAT model
    computes in eval mode; `integer_head` runs it on integers, torch.onnx.export writes its QDQ form. Activations
    such as SiLU become lookup tables from their input to their output integers (bst TableActivation).
    integer=False also converts a model where an activation stays float because a quantizer next to it is off (a
    recipe's float or weight_only layers): it has an ONNX form but no integer one."""
    if not is_quantized(model):
        raise UserError("the model is not a QAT model; the integer network is made from a train.py --qat checkpoint")
    freeze(model)
    example = example_input(model) if example is None else example
    mapping = bq.get_default_convert_module_mappings()
    mapping[QuantizedActivation] = nnq.TableActivation.from_qat
    converted = bq.convert(model.eval(), (example,), mapping=mapping)
    acts = sorted({activation_name(m.act) for m in converted.modules() if isinstance(m, QuantizedActivation)})
    if acts and integer:
        raise UserError(f"the model's {', '.join(acts)} activations have no integer form: a quantizer before or after "
                        "them is off (recipe mode float / weight_only), so they cannot be lookup tables")
    return converted


@torch.no_grad()
def integer_head(converted, x) -> list:
    """bst's integer reference on float images `x`: the input quantized, every layer on integers, the Detect convs'
    raw outputs as `QTensor`s (int64 values, per-tensor or per-channel power-of-two scales), one per level, in the
    conv's layout (bs, na * no, ny, nx). Box decoding (sigmoid, grids, anchors) is the host's float work."""
    detect = converted.model[-1]
    with bq.integer_mode(converted):
        feats = converted._forward_once(x, stop=detect.i)
        return [conv(f) for conv, f in zip(detect.m, feats)]
