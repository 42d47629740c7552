"""The integer network of a QAT model: bst.convert of a frozen copy (convert_yolo) and bst's integer reference run on
it (integer_head), which the ONNX, TorchScript and integer exports are made from and checked against."""
from __future__ import annotations

import torch

import bst.torch.ao.nn.quantized as nnq
from bst.torch.ao import quantization as bq
from models.common import activation_name
from models.quant.prepare import QuantizedActivation
from models.quant.state import example_input, freeze, is_quantized
from utils.general import UserError


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
