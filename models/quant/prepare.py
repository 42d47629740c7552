"""Preparing a float DetectionModel for QAT: which modules to fuse, where the skip-adds and concats are, the input
quantizer, and each module's QConfig from the recipe (models/quant/recipe.py); bst.prepare_qat swaps the modules.

  * every Conv block (conv + BN + act) becomes a fused QAT module: with `bn_folding` BN stays live with
    simulated folding (ConvBn[ReLU|ReLU6]2d); without it BN is folded into the conv first (Conv[ReLU]2d);
  * the Bottleneck skip-add and every concat (C3, SPPF, Concat, ...) go through a FloatFunctional with
    its own output quantizer (models/common.py calls `qadd` / `qcat` when present);
  * the input image is quantized by a QuantStub (`model.input_quant`);
  * Detect's 1x1 convs become QAT convs with an output quantizer; sigmoid and box decoding stay float;
  * activations other than ReLU / ReLU6 (SiLU, Hardswish) get an output quantizer and become lookup tables.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn

import bst.torch.ao.nn.qat as nnqat
from bst.torch.ao import quantization as bq
from bst.torch.ao.nn.quantized import FloatFunctional
from models.common import C3, SPP, SPPF, Bottleneck, Concat, Conv, DWConv, Focus
from models.quant.config import QATConfig
from models.quant.recipe import _rule_targets, load_recipe, make_qconfig
from utils.general import LOGGER, UserError
from utils.torch_utils import fuse_conv_and_bn


class QuantizedActivation(nnqat.TableActivation):
    """A float activation (SiLU, Hardswish, ...) whose output gets a quantizer: shift hardware applies it
    as a lookup table on int8, so its output must be on an int8 grid too. bst's TableActivation: frozen, it computes
    through the table `convert_yolo` makes of it (this class keeps the name checkpoints pickled)."""


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


def prepare_yolo_qat(model, config: QATConfig | None = None, verbose=True):
    """Turn a float DetectionModel (training mode) into a QAT model as `config` says (default: QATConfig()), in place;
    returns it, with the config it was made with (the recipe loaded) in `model.qat_config`. verbose: log what was
    made."""
    config = config or QATConfig()
    recipe = load_recipe(config.recipe)
    if any(isinstance(m, (bq.FakeQuantizeBase,)) for m in model.modules()):
        raise UserError("model is already prepared for QAT")
    model.train()
    _fuse_conv_blocks(model, config.bn_folding)
    _attach_functionals(model)
    model.input_quant = bq.QuantStub()
    # images are x/255 in [0, 1]: 1/255 puts every pixel exactly on the grid; shift hardware takes 2**-8
    model.input_quant.qconfig = make_qconfig(config, {"fixed": {"scale": 2 ** -8 if config.pow2 else 1 / 255,
                                                                "zero_point": 0, "dtype": "quint8"}}, False)
    _assign_qconfigs(model, recipe, config)
    mapping = bq.get_default_qat_module_mappings()
    mapping.update({nn.SiLU: QuantizedActivation, nn.Hardswish: QuantizedActivation})
    bq.prepare_qat(model, mapping=mapping, inplace=True)
    for m in model.modules():  # qconfigs hold constructors; they are not needed after prepare (nor pickled)
        m.__dict__.pop("qconfig", None)
    model.qat_config = replace(config, recipe=recipe)
    n_q = sum(isinstance(m, bq.FakeQuantizeBase) for m in model.modules())
    log = LOGGER.info if verbose else LOGGER.debug
    log(f"QAT: prepared {n_q} fake quantizers (bn_folding={config.bn_folding}, pow2={config.pow2}, "
        + (f"rounding={config.rounding}, " if config.rounding != "half_even" else "")
        + f"recipe={recipe.get('file', 'default')})")
    return model


def _assign_qconfigs(model, recipe: dict, config: QATConfig):
    """model.qconfig from the recipe's default, then each rule's on the modules it matches (later rules win)."""
    default = recipe["default"]
    where = recipe.get("file", "recipe")
    model.qconfig = make_qconfig(config, default.get("activation"), bool(default.get("learnable")),
                                 where=f"{where}: default")
    for i, rule in enumerate(recipe["rules"]):
        mode = rule.get("mode", "quantize")
        for name in _rule_targets(model, rule["match"], f"{where}: rule {i}"):
            target = model.get_submodule(name)
            if mode == "float":
                target.qconfig = None
            else:
                spec = rule.get("activation", default.get("activation"))
                learn = bool(rule.get("learnable", default.get("learnable")))
                target.qconfig = make_qconfig(config, spec, learn, weight_only=mode == "weight_only",
                                              where=f"{where}: rule {i}")


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
