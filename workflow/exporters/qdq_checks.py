"""Graph checks of exported QDQ (QuantizeLinear/DequantizeLinear) ONNX files, read back with the onnx package.

`qdq_structure` reads what a file holds; `check_qdq_file` compares it with what the converted model applies
(`bst.torch.ao.nn.quantized.onnx_form.qdq_counts`) and, for a power-of-two model, requires every scale to be an
exact power of two; `detect_raw_outputs` finds the tensors Detect feeds to its sigmoids (the raw head outputs the
numerical verification compares, workflow/exporters/verify.py).
"""
from __future__ import annotations

import numpy as np
import torch

from bst.torch.ao.quantization import is_pow2
from utils.general import UserError

INTEGER_WEIGHT_TYPES = (np.int8, np.uint8)


def qdq_structure(proto) -> dict:
    """The QDQ content of an ONNX graph, read from the file.

    Returns {"quantize": n QuantizeLinear, "dequantize": n DequantizeLinear, "activation_dq": n DequantizeLinear of a
    computed tensor, "weight_dq": [{"name", "axis" (None per tensor), "dtype", "zero_points_all_zero", "channels"}]
    for each DequantizeLinear of an int8/uint8 initializer, "bias_dq": [{"name", "axis", "channels", "scale"}] for
    each DequantizeLinear of an int32 initializer, "scales": {scale name: float32 array}, "lookups": n Gather on an
    int8/uint8 table (an activation applied as a lookup table)}."""
    from onnx import numpy_helper

    inits = {i.name: i for i in proto.graph.initializer}
    consts = {n.output[0]: n for n in proto.graph.node if n.op_type == "Constant"}
    aliases = {n.output[0]: n.input[0] for n in proto.graph.node if n.op_type == "Identity"}

    def value(name):
        while name in aliases:
            name = aliases[name]
        if name in inits:
            return numpy_helper.to_array(inits[name])
        if name in consts:
            return numpy_helper.to_array(next(a for a in consts[name].attribute if a.name == "value").t)
        return None

    out = {"quantize": 0, "dequantize": 0, "activation_dq": 0, "weight_dq": [], "bias_dq": [], "scales": {},
           "lookups": 0}
    for n in proto.graph.node:
        if n.op_type == "Gather" and value(n.input[0]) is not None and value(n.input[0]).dtype in INTEGER_WEIGHT_TYPES:
            out["lookups"] += 1  # an activation's lookup table (QuantizeLinear -> Cast -> Gather -> DequantizeLinear)
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        out["quantize" if n.op_type == "QuantizeLinear" else "dequantize"] += 1
        scale = value(n.input[1])
        if scale is None:
            raise ValueError(f"proto: the scale {n.input[1]!r} of {n.name} is computed, not a constant")
        out["scales"][n.input[1]] = np.asarray(scale, dtype=np.float32)
        if n.op_type == "QuantizeLinear":
            continue
        q = value(n.input[0])
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)  # ONNX default axis 1 (per-axis only)
        if q is not None and q.dtype == np.int32:
            out["bias_dq"].append({"name": n.input[0], "axis": axis if np.ndim(scale) else None,
                                   "channels": q.shape[0] if q.ndim else 1, "scale": n.input[1]})
            continue
        if q is None or q.dtype not in INTEGER_WEIGHT_TYPES:
            out["activation_dq"] += 1
            continue
        zp = value(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros(1, q.dtype)
        out["weight_dq"].append({"name": n.input[0], "axis": axis if np.ndim(scale) else None, "dtype": str(q.dtype),
                                 "zero_points_all_zero": bool((np.asarray(zp) == 0).all()), "channels": q.shape[0]})
    return out


def check_qdq_file(proto, expected: dict, pow2: bool, path, simplified=False) -> dict:
    """The written graph holds the model's quantizers: counts of QuantizeLinear/DequantizeLinear, of int8 weight and
    int32 bias DequantizeLinear as `expected` (`qdq_counts` of the converted model), and in pow2 mode every scale
    (the bias scales input_scale x weight_scale included) an exact power of two. UserError otherwise; returns
    `qdq_structure`."""
    s = qdq_structure(proto)
    got = {"quantize": s["quantize"], "dequantize": s["dequantize"], "weights": len(s["weight_dq"]),
           "biases": len(s["bias_dq"]), "lookups": s["lookups"]}
    want = {k: expected.get(k, 0) for k in got}
    if got != want:
        hint = "; --simplify folded quantization nodes, drop it" if simplified else ""
        raise UserError(f"{path}: the QDQ graph holds {got['quantize']} QuantizeLinear, {got['dequantize']} "
                        f"DequantizeLinear ({got['weights']} on int8 weights, {got['biases']} on int32 biases), "
                        f"{got['lookups']} lookup tables where the model applies {want['quantize']}, "
                        f"{want['dequantize']} ({want['weights']}, {want['biases']}), {want['lookups']}{hint}")
    if pow2:
        bad = [k for k, v in s["scales"].items()
               if not bool(is_pow2(torch.from_numpy(np.array(v, dtype=np.float32, ndmin=1))).all())]
        if bad:
            raise UserError(f"{path}: scale {bad[0]} = {s['scales'][bad[0]].ravel()[:4].tolist()} is not an exact "
                            f"power of two although the model is pow2 ({len(bad)} such scales)")
    return s


def describe_qdq(s: dict, pow2: bool) -> str:
    """One line on a file's QDQ content (`qdq_structure`)."""
    axes = sorted({str(d["axis"]) for d in s["weight_dq"]})
    n_scales = sum(v.size for v in s["scales"].values())
    tables = f", {s['lookups']} lookup tables" if s.get("lookups") else ""
    return (f"QDQ graph: {s['quantize']} QuantizeLinear, {s['dequantize']} DequantizeLinear ({len(s['weight_dq'])} on "
            f"int8 weights, axis {'/'.join(axes)}; {len(s['bias_dq'])} on int32 biases){tables}, {n_scales} scales"
            + (", all exact powers of two" if pow2 else ""))


def detect_raw_outputs(proto) -> list:
    """Names of the tensors Detect feeds to its sigmoids: the inputs of Sigmoid nodes fed by a Transpose (the
    (bs, na, ny, nx, no) permute; through a Cast), in graph order. SiLU's sigmoids are fed by convs."""
    producer = {o: n for n in proto.graph.node for o in n.output}

    def source_op(name):
        node = producer.get(name)
        while node is not None and node.op_type in ("Cast", "Identity"):  # p.float() is a Cast to float
            node = producer.get(node.input[0])
        return None if node is None else node.op_type

    return [n.input[0] for n in proto.graph.node if n.op_type == "Sigmoid" and source_op(n.input[0]) == "Transpose"]
