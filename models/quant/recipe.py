"""QAT recipes (data/quant/*.yaml): their schema, checked before any model is touched, and the QConfig each entry
makes. A recipe sets the defaults and per-module overrides:

    default:                         # every quantized module, unless a rule says otherwise
      activation: {observer: minmax | moving_average | percentile | mse | mse_histogram, percentile: 99.99,
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
    concat: {share_input_scales: true}   # every concat's inputs and output share one scale once observers freeze
"""
from __future__ import annotations

import fnmatch
import inspect
import math
from copy import deepcopy
from pathlib import Path

import torch

from bst.torch.ao import quantization as bq
from utils.general import ROOT, UserError, check_file, yaml_load

OBSERVERS = {
    "minmax": bq.MinMaxObserver,
    "moving_average": bq.MovingAverageMinMaxObserver,
    "percentile": bq.PercentileObserver,
    "mse": bq.MSEObserver,
    "mse_histogram": bq.HistogramMSEObserver,
}
PER_CHANNEL = {  # per_channel: true -> one scale (a shift on shift hardware) per output channel, axis 1 of NCHW
    "minmax": bq.PerChannelMinMaxObserver,
    "moving_average": bq.MovingAveragePerChannelMinMaxObserver,
}
# observers with a calibration search (training_update: track | search)
CALIBRATORS = ("percentile", "mse", "mse_histogram")
MODES = ("quantize", "float", "weight_only")
DEFAULT_RECIPE = {"default": {"activation": {"observer": "mse_histogram"}, "learnable": False},  # = default.yaml
                  "rules": [{"match": "model.24.m.*", "activation": {"observer": "minmax", "per_channel": True}}]}


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
        names = f"{', '.join(CALIBRATORS[:-1])} and {CALIBRATORS[-1]}"
        raise UserError(f"{where}: training_update {update!r}: the {names} observers take "
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


def make_qconfig(config, spec: dict | None, learnable: bool, weight_only=False, where="recipe"):
    """A QConfig from a recipe entry (`where` names it in errors) under a QATConfig's scales (pow2, pow2_rounding) and
    rounding of ties."""
    pow2, pow2_rounding, rounding = config.pow2, config.pow2_rounding, config.rounding
    spec = spec or {"observer": "mse_histogram"}
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
