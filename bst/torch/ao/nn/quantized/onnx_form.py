"""The ONNX form of the converted modules: QuantizeLinear / DequantizeLinear (QDQ) around float ops.

Under ``torch.onnx.export`` (the TorchScript-based exporter, ``dynamo=False``; opset >= 13 for per-channel
``axis``) the converted modules of `reference` write what they compute, through the functions below:

* an output quantizer (`Quantize`, `QFunctional`, `Conv2d`) -> QuantizeLinear -> DequantizeLinear: per tensor
  with a scalar float32 scale and a uint8 / int8 zero point (int8 when the range fits it), or per channel
  along the module's axis; a range narrower than its integer type (e.g. [0, 127]) -> a Clip to the grid's
  end points first, after which QuantizeLinear rounds to the same integers;
* a conv: its int8 weight -> DequantizeLinear (per output channel, axis 0, int8 zero points); its int32 bias
  -> DequantizeLinear with scale ``input_scale * weight_scale`` (per channel, axis 0, no zero point), the
  grid on which `convert` put it; then Conv, ReLU / ReLU6 (Relu / Clip) and the output QDQ. A conv whose
  input scale is unknown keeps its float bias;
* an elementwise activation between two per-tensor quantizers (`lookup`, a converted `TableActivation`) ->
  QuantizeLinear -> Cast (int32) -> Gather on an int8 / uint8 table of one entry per 8-bit code -> DequantizeLinear:
  integers in, integers out, the table computed once by `convert`;
* a conv with one output scale per channel (a detection head's raw outputs; zero points 0) and no ReLU6:
  ``round(y_c / s_c)`` is computed as ``round(y'_c)`` with ``y' = conv(x, w / s_c) + b / s_c``, i.e. weight
  and bias scales divided by ``s_c``, a QDQ pair with scale 1, then a Mul by the per-channel scales. Every
  activation QDQ pair stays per tensor (what QDQ consumers such as TensorRT require of activations), and this
  is shift hardware's arithmetic (one requantizing shift per output channel). With power-of-two scales every
  division is exact, so the numbers are the module's own.

Scales are written as float32 tensors, so a power of two stays an exact power of two. Outside export the same
functions compute the numbers (fake quantization, dequantization) exactly as the converted modules always
have. QuantizeLinear rounds half to even: a module that rounds half up has no ONNX form (ValueError).
`qdq_counts` tells how many QDQ nodes the ONNX form of a model holds; `own_initializers` gives each node of
an exported file its own named constants.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from bst.torch.ao.quantization.fake_quant_ops import fake_quantize_per_channel, fake_quantize_per_tensor

INT_TYPES = {torch.int8: (-128, 127), torch.uint8: (0, 255)}  # what QuantizeLinear / DequantizeLinear hold
ROUNDING = "half_even"  # QuantizeLinear's rounding

_counts: list[dict[str, int]] = []  # active qdq_counts tallies (innermost last)


def int_type(quant_min: int, quant_max: int, what: str = "quantizer") -> torch.dtype:
    """The ONNX integer type holding [quant_min, quant_max]: int8 if it fits, else uint8; ValueError otherwise."""
    for dtype, (lo, hi) in INT_TYPES.items():
        if lo <= quant_min and quant_max <= hi:
            return dtype
    raise ValueError(f"{what}: quantization range [{quant_min}, {quant_max}] fits neither int8 [-128, 127] nor uint8 "
                     f"[0, 255], the types of ONNX QuantizeLinear/DequantizeLinear; quantize to 8 bits")


def exporting() -> bool:
    """True while torch.onnx.export traces a model: the converted modules then write their ONNX form."""
    return torch.onnx.is_in_onnx_export()


def _note(quantize: int = 0, dequantize: int = 0, kind: str | None = None) -> None:
    if _counts:
        tally = _counts[-1]
        tally["quantize"] += quantize
        tally["dequantize"] += dequantize
        if kind is not None:
            tally[kind] += 1


def _check_rounding(rounding: str, what: str) -> None:
    if rounding != ROUNDING:
        raise ValueError(f"{what}: rounds ties {rounding.replace('_', ' ')}; ONNX QuantizeLinear rounds half to even, "
                         "so this model has no exact ONNX form")


def _shape(dim: int, axis: int | None) -> list[int]:
    shape = [1] * dim
    if axis is not None:
        shape[axis] = -1
    return shape


class _QuantizeDequantize(torch.autograd.Function):
    """Fake quantization, written by the ONNX exporter as [Clip ->] QuantizeLinear -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max, axis, clip):
        zp = zero_point.to(torch.int32)
        if axis is None:
            return fake_quantize_per_tensor(x, scale, zp, quant_min, quant_max)
        return fake_quantize_per_channel(x, scale, zp, axis, quant_min, quant_max)

    @staticmethod
    def symbolic(g, x, scale, zero_point, quant_min, quant_max, axis, clip):
        kw = {} if axis is None else {"axis_i": axis}
        if clip is not None:
            lo = g.op("Constant", value_t=torch.tensor(clip[0], dtype=torch.float32))
            hi = g.op("Constant", value_t=torch.tensor(clip[1], dtype=torch.float32))
            x = g.op("Clip", x, lo, hi)
        q = g.op("QuantizeLinear", x, scale, zero_point, **kw)
        return g.op("DequantizeLinear", q, scale, zero_point, **kw)


class _Dequantize(torch.autograd.Function):
    """(q - zero_point) * scale of an integer tensor (q * scale without a zero point), written as DequantizeLinear."""

    @staticmethod
    def forward(ctx, q, scale, zero_point, axis):
        return _dequantize(q, scale, zero_point, axis)

    @staticmethod
    def symbolic(g, q, scale, zero_point, axis):
        kw = {} if axis is None else {"axis_i": axis}
        inputs = (q, scale) if zero_point is None else (q, scale, zero_point)
        return g.op("DequantizeLinear", *inputs, **kw)


def _dequantize(q, scale, zero_point, axis):
    shape = _shape(q.dim(), axis)
    values = q.to(torch.float32)
    if zero_point is not None:
        values = values - zero_point.reshape(shape).to(torch.float32)
    return values * scale.reshape(shape)


class _RoundThenScale(torch.autograd.Function):
    """Round to integers clamped to [quant_min, quant_max] (scale 1, zero point 0), then multiply by per-channel
    scales: written as QuantizeLinear -> DequantizeLinear (both scale 1) -> Mul."""

    @staticmethod
    def forward(ctx, x, quant_min, quant_max, scale, one, zero):
        return torch.clamp(torch.round(x), quant_min, quant_max) * scale

    @staticmethod
    def symbolic(g, x, quant_min, quant_max, scale, one, zero):
        q = g.op("QuantizeLinear", x, one, zero)
        return g.op("Mul", g.op("DequantizeLinear", q, one, zero), scale)


class _Sum(torch.autograd.Function):
    """x + y, written as an ONNX Sum (see `add`)."""

    @staticmethod
    def forward(ctx, x, y):
        return torch.add(x, y)

    @staticmethod
    def symbolic(g, x, y):
        return g.op("Sum", x, y)


def add(x: torch.Tensor, y: torch.Tensor, as_sum: bool = False) -> torch.Tensor:
    """``x + y``; in an ONNX export an Add, or with `as_sum` a Sum (the same sum). onnxruntime fuses
    DequantizeLinear -> Add -> QuantizeLinear into its int8 QLinearAdd, which adds the output zero point before
    rounding half to even: with an odd zero point a sum lying halfway between two steps lands on the other
    neighbour than QuantizeLinear's round-then-add gives. A Sum is not fused: it stays exact, in float."""
    if as_sum and exporting():
        return _Sum.apply(x, y)
    return torch.add(x, y)


def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, quant_min: int,
                        quant_max: int, axis: int | None = None, rounding: str = "half_even",
                        what: str = "output quantizer") -> torch.Tensor:
    """Fake quantization of `x` with frozen qparams (per tensor, or per channel along `axis`): bst's fake-quant
    arithmetic outside export, [Clip ->] QuantizeLinear -> DequantizeLinear in an ONNX export."""
    _note(1, 1)
    if not exporting():
        if axis is not None:
            return fake_quantize_per_channel(x, scale, zero_point, axis, quant_min, quant_max, rounding)
        return fake_quantize_per_tensor(x, scale, zero_point, quant_min, quant_max, rounding)
    _check_rounding(rounding, what)
    dtype = int_type(quant_min, quant_max, what)
    clip = None
    if (quant_min, quant_max) != INT_TYPES[dtype]:
        if axis is not None:
            raise ValueError(f"{what}: a per-channel quantizer with the narrow range [{quant_min}, {quant_max}] has no "
                             "QDQ form here; use the full 8-bit range")
        zp, s = float(zero_point.reshape(())), float(scale.reshape(()))
        clip = ((quant_min - zp) * s, (quant_max - zp) * s)
    shape = () if axis is None else (-1,)
    return _QuantizeDequantize.apply(x, scale.float().reshape(shape), zero_point.to(dtype).reshape(shape), quant_min,
                                     quant_max, axis, clip)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, axis: int | None,
               kind: str = "weights") -> torch.Tensor:
    """(q - zero_point) * scale as float32 (q * scale when `zero_point` is None), per channel along `axis`; a
    DequantizeLinear of the integer initializer `q` in an ONNX export. `kind`: "weights" or "biases" (qdq_counts)."""
    _note(0, 1, kind)
    if not exporting():
        return _dequantize(q, scale, zero_point, axis)
    if zero_point is not None and zero_point.dtype != q.dtype:
        zero_point = zero_point.to(q.dtype)
    return _Dequantize.apply(q, scale.float().reshape(-1 if axis is not None else ()), zero_point, axis)


def round_then_scale(y: torch.Tensor, scale: torch.Tensor, quant_min: int, quant_max: int,
                     what: str = "output quantizer") -> torch.Tensor:
    """``clamp(round(y), quant_min, quant_max) * scale`` with per-channel `scale` (axis 1, zero points 0): the output
    of a conv whose weight and bias scales were divided by `scale`. QuantizeLinear -> DequantizeLinear (scale 1) ->
    Mul in an ONNX export (see the module docstring)."""
    _note(1, 1)
    dtype = int_type(quant_min, quant_max, what)
    scale = scale.float().reshape(1, -1, 1, 1)
    if not exporting():
        return torch.clamp(torch.round(y), quant_min, quant_max) * scale
    one, zero = torch.tensor(1.0), torch.tensor(0, dtype=dtype)
    return _RoundThenScale.apply(y, quant_min, quant_max, scale, one, zero)


class _Lookup(torch.autograd.Function):
    """An integer lookup between two per-tensor quantizers, written as QuantizeLinear -> Cast (int32) -> Gather on
    a table of one entry per 8-bit code -> DequantizeLinear. int8 codes index the table with negative indices too
    (Gather counts them from the end), so the table holds codes 0..127 first, then -128..-1."""

    @staticmethod
    def forward(ctx, x, in_scale, in_zero_point, by_code, out_scale, out_zero_point):
        lo, hi = INT_TYPES[in_zero_point.dtype]
        q = _shifted(torch.round(x.float() * float(torch.reciprocal(in_scale))), int(in_zero_point))
        codes = by_code.to(x.device)[torch.clamp(q, lo, hi).to(torch.int64)]  # negative codes count from the end
        return _shifted(codes.to(torch.float32), -int(out_zero_point)) * float(out_scale)

    @staticmethod
    def symbolic(g, x, in_scale, in_zero_point, by_code, out_scale, out_zero_point):
        q = g.op("QuantizeLinear", x, in_scale, in_zero_point)
        index = g.op("Cast", q, to_i=6)  # TensorProto.INT32
        return g.op("DequantizeLinear", g.op("Gather", by_code, index, axis_i=0), out_scale, out_zero_point)


def _shifted(t: torch.Tensor, k: int) -> torch.Tensor:
    """t + k, without an op for k = 0 (the exporter's peephole pass drops ``t + 0`` inside a traced autograd Function
    and then fails)."""
    return t + k if k else t


def _lookup(x, table, in_scale, in_zero_point, in_min, in_max, out_scale, out_zero_point):
    inv = float(torch.reciprocal(in_scale.float().reshape(())))
    q = _shifted(torch.round(x.float() * inv), int(in_zero_point) - in_min)
    codes = table.to(x.device)[torch.clamp(q, 0, in_max - in_min).to(torch.int64)]
    return _shifted(codes.to(torch.float32), -int(out_zero_point)) * float(out_scale.float().reshape(()))


def _table_by_code(table: torch.Tensor, in_min: int, in_max: int, dtype: torch.dtype, out_dtype: torch.dtype):
    """The table indexed by every 8-bit code of `dtype` (codes outside [in_min, in_max] take the clamped code's
    entry, as the input quantizer clamps): uint8 codes 0..255 in order, int8 codes 0..127 then -128..-1."""
    lo, hi = INT_TYPES[dtype]
    codes = torch.arange(lo, hi + 1)
    if dtype == torch.int8:
        codes = torch.cat([codes[128:], codes[:128]])
    return table[torch.clamp(codes, in_min, in_max) - in_min].to(out_dtype)


def lookup(x: torch.Tensor, table: torch.Tensor, input_qparams: tuple, output_qparams: tuple,
           what: str = "lookup table") -> torch.Tensor:
    """Float `x` on the grid of the input quantizer (`input_qparams`: scale, zero point, quant_min, quant_max, per
    tensor) mapped through integer `table` (index ``q - quant_min``) and dequantized with `output_qparams`:
    ``(table[clamp(round(x / s_in) + z_in) - quant_min] - z_out) * s_out`` in float32. In an ONNX export:
    QuantizeLinear -> Cast -> Gather -> DequantizeLinear (`_Lookup`)."""
    _note(1, 1, "lookups")
    in_scale, in_zp, in_min, in_max = input_qparams
    out_scale, out_zp, out_min, out_max = output_qparams
    if not exporting():
        return _lookup(x, table, in_scale, in_zp, in_min, in_max, out_scale, out_zp)
    dtype, out_dtype = int_type(in_min, in_max, f"{what} input"), int_type(out_min, out_max, what)
    by_code = _table_by_code(table, in_min, in_max, dtype, out_dtype)
    return _Lookup.apply(x, in_scale.float().reshape(()), in_zp.to(dtype).reshape(()), by_code,
                         out_scale.float().reshape(()), out_zp.to(out_dtype).reshape(()))


@contextmanager
def _counting() -> Iterator[dict[str, int]]:
    tally = {"quantize": 0, "dequantize": 0, "weights": 0, "biases": 0, "lookups": 0}
    _counts.append(tally)
    try:
        yield tally
    finally:
        _counts.remove(tally)


@torch.no_grad()
def qdq_counts(model: torch.nn.Module, example_inputs: tuple) -> dict[str, int]:
    """The QDQ nodes the ONNX form of converted `model` holds, counted on one forward of `example_inputs`:
    {"quantize": QuantizeLinear, "dequantize": DequantizeLinear, "weights": DequantizeLinear of int8 weights,
    "biases": DequantizeLinear of int32 biases, "lookups": lookup tables, each a QuantizeLinear -> Cast -> Gather ->
    DequantizeLinear}. Every quantize-dequantize the model applies counts, also one
    that a graph rewrite (e.g. a simplifier) could fold away."""
    if not isinstance(example_inputs, tuple):
        raise ValueError(f"example_inputs: a tuple of model inputs is expected, got {type(example_inputs).__name__}")
    with _counting() as tally:
        model(*example_inputs)
    return dict(tally)


def _scope(node_name: str) -> str:
    """The module a node of the exporter belongs to, from its scoped name: '/model.0/conv/QuantizeLinear' ->
    'model.0.conv'. The exporter names a container's child '<container>.<index>' after the container itself
    ('/model.2/m/m.0/cv1/conv/...' for model.2.m.0.cv1.conv), so such a component replaces the one before it."""
    names = []
    for part in [p for p in node_name.split("/") if p][:-1]:
        if names and part.startswith(names[-1] + "."):
            names[-1] = part
        else:
            names.append(part)
    return ".".join(names) or "graph"


def _same_value(a: Any, b: Any) -> bool:
    """Two TensorProtos hold the same type, shape and values (names aside)."""
    a2, b2 = type(a)(), type(b)()
    a2.CopyFrom(a)
    b2.CopyFrom(b)
    a2.name = b2.name = ""
    return a2.SerializeToString() == b2.SerializeToString()


def own_initializers(proto: Any) -> int:
    """Give every QuantizeLinear / DequantizeLinear of an exported ONNX ModelProto its own named constants, in place.

    The exporter turns the qparams computed in forward (a scalar scale, an int8 zero point, a divided scale) into
    anonymous initializers and shares equal-valued ones through Identity nodes. Here each constant a QDQ node reads
    becomes an initializer named after the node's module scope (``/model.0/conv/QuantizeLinear`` ->
    ``model.0.conv``) and its role, as onnxruntime's QDQ fusion and hardware toolchains expect:
    ``.output_scale`` / ``.output_zero_point`` (an activation QDQ pair; both nodes of the pair read them),
    ``.weight_scale`` / ``.weight_zero_point`` (DequantizeLinear of int8 weights), ``.bias_scale`` (of int32
    biases); for a per-channel output written as a QDQ pair of scale 1 and a Mul (see the module docstring) the
    pair reads ``.unit_scale`` / ``.unit_zero_point`` and the Mul ``.output_scale``; a lookup table (`lookup`) reads
    ``.input_scale`` / ``.input_zero_point`` (its QuantizeLinear) and ``.table`` (its Gather). Identity and Constant
    nodes and initializers nothing reads any more are dropped. Works on the protobuf objects alone (no onnx import).
    Returns the number of initializers added."""
    graph = proto.graph
    made = {i.name: i for i in graph.initializer}  # name -> initializer; a name taken by another value gets a suffix
    consts = {n.output[0]: n for n in graph.node if n.op_type == "Constant" and len(n.output) == 1}
    aliases = {n.output[0]: n.input[0] for n in graph.node
               if n.op_type == "Identity" and (n.input[0] in made or n.input[0] in consts)}
    consumers = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def tensor_of(name):
        return _constant(aliases.get(name, name), made, consts)

    def scaling_mul(dq):
        """The Mul by constant per-channel scales that follows DequantizeLinear `dq` in its scope, or None."""
        for n in consumers.get(dq.output[0], []):
            if n.op_type == "Mul" and _scope(n.name) == _scope(dq.name):
                other = [i for i in n.input if i != dq.output[0]]
                if len(other) == 1 and tensor_of(other[0]) is not None:
                    return n
        return None

    added = []

    def own(node, index, role):
        src = node.input[index]
        t = tensor_of(src)
        if t is None:
            return
        base = f"{_scope(node.name)}.{role}"
        name, k = base, 1
        while name in made and not _same_value(made[name], t):  # another constant of this scope and role
            name, k = f"{base}_{k}", k + 1
        if name not in made:
            copy = graph.initializer.add()
            copy.CopyFrom(t)
            copy.name = name
            made[name] = copy
            added.append(name)
        node.input[index] = name

    integer_types = {2: "weight", 3: "weight", 6: "bias"}  # TensorProto UINT8, INT8, INT32
    for n in list(graph.node):
        if n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        data = tensor_of(n.input[0])
        if n.op_type == "DequantizeLinear" and data is not None and data.data_type in integer_types:
            prefix = integer_types[data.data_type]
        else:
            dq = next((c for c in consumers.get(n.output[0], []) if c.op_type == "DequantizeLinear"), None) \
                if n.op_type == "QuantizeLinear" else n
            mul = scaling_mul(dq) if dq is not None else None
            prefix = "input" if dq is None else "output" if mul is None else "unit"  # input: a lookup's integers
            if mul is not None:
                own(mul, next(i for i, name in enumerate(mul.input) if name != dq.output[0]), "output_scale")
        own(n, 1, f"{prefix}_scale")
        if len(n.input) > 2 and n.input[2]:
            own(n, 2, f"{prefix}_zero_point")
    for n in list(graph.node):
        if n.op_type == "Gather" and tensor_of(n.input[0]) is not None:
            own(n, 0, "table")
    _drop_unread(graph)
    return len(added)


def _constant(name: str, initializers: dict, constants: dict) -> Any:
    """The TensorProto an initializer or a Constant node holds under `name`, or None."""
    if name in initializers:
        return initializers[name]
    node = constants.get(name)
    if node is not None:
        return next((a.t for a in node.attribute if a.name == "value" and a.HasField("t")), None)
    return None


def _drop_unread(graph: Any) -> None:
    """Remove what nothing reads any more: forwarding Identity nodes, Constant nodes, initializers."""
    graph_outputs = {o.name for o in graph.output}
    while True:
        reads = {i for n in graph.node for i in n.input} | graph_outputs
        dead = [n for n in graph.node if n.op_type in ("Identity", "Constant") and not set(n.output) & reads]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    for i in [i for i in graph.initializer if i.name not in reads]:
        graph.initializer.remove(i)
