"""Runtime forms of an exported QDQ graph: the same integers, arranged for one runtime's kernels.

An exported QDQ file is the integer network as a chip toolchain reads it. Two runtimes compute it exactly only when
the graph is arranged for their kernels, and these functions (on onnx ModelProtos, changed in place and returned with
a count of what changed) do that without changing a single integer:

* `space_to_depth_form` (onnxruntime): a strided convolution on few input channels whose kernel and padding are
  multiples of the stride (yolov5's first layer, 6x6 stride 2 padding 2 on the 3 image channels) as SpaceToDepth of
  its 8-bit input and a stride-1 convolution on stride**2 times the channels, kernel / stride, padding / stride. Every
  output is the same sum of the same int8 x 8-bit products; onnxruntime's int8 convolution on 3 channels was 2.3x
  slower than its float one, on 12 channels with a 3x3 kernel it is not.
* `openvino_form` (OpenVINO): a Clip to the representable range of each DequantizeLinear that an Add or Sum reads.
  OpenVINO's CPU plugin fuses a convolution, its output FakeQuantize and a following Add into one convolution with a
  sum post-op, and then drops the rounding of that FakeQuantize (the sum adds the unrounded convolution output): on a
  yolov5n 2.6-3.6% of the raw head outputs were one or more steps off. The Clip changes no value (a dequantized value
  already lies in that range) and keeps the rounding. It also writes the 5-d head permute (0, 1, 3, 4, 2) as the conv
  output's NCHW -> NHWC transpose, which the plugin's convolutions write anyway, then a transpose of whole rows of
  outputs (static shapes); at 640 px this took about a tenth off the int8 and the float model alike
  (benchmarks/export_speed.py). The head's per-channel scales stay where the file has them (DequantizeLinear -> Mul
  right after the conv's QuantizeLinear): the plugin folds that Mul into the head conv, which then writes float as
  the float model's does. Moving the Reshape / Transposes onto the integers and the Mul after them was slower: the
  plugin converts to float before the transposes anyway, and the Mul by the (anchor, channel) scales in the decoding
  kernel made that kernel about twice as slow (int8 model 0.3-0.5 ms slower at 640 px, 0.1-0.2 ms at 256 px).
* `onnxruntime_kernel_form` (onnxruntime on CPUs without VNNI): every int8 initializer that feeds a DequantizeLinear
  stored as uint8 (value + 128) with its zero point + 128, so onnxruntime's int8 convolution accumulates exactly.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


def _graph_maps(proto):
    producer = {o: n for n in proto.graph.node for o in n.output}
    consumers = {}
    for n in proto.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    return producer, consumers, {t.name: t for t in proto.graph.initializer}


def _attr(node, name, default=None):
    found = [a for a in node.attribute if a.name == name]
    return helper.get_attribute_value(found[0]) if found else default


def _set_attrs(node, **values):
    for a in [a for a in node.attribute if a.name in values]:
        node.attribute.remove(a)
    node.attribute.extend(helper.make_attribute(k, v) for k, v in values.items())


def _constant(proto, name, inits):
    if name in inits:
        return numpy_helper.to_array(inits[name])
    for n in proto.graph.node:
        if n.op_type == "Constant" and n.output[0] == name:
            return numpy_helper.to_array(_attr(n, "value"))
    return None


def _topological(proto):
    """Reorder proto's nodes so that every node comes after the producers of its inputs."""
    producer = {o: n for n in proto.graph.node for o in n.output}
    order, seen = [], set()

    def visit(n):
        if id(n) in seen:
            return
        seen.add(id(n))
        for i in n.input:
            if i in producer:
                visit(producer[i])
        order.append(n)

    for n in list(proto.graph.node):
        visit(n)
    del proto.graph.node[:]
    proto.graph.node.extend(order)


def _s2d_conv(node, producer, consumers, inits, max_channels):
    """(quantized input tensor, its DequantizeLinear, weight initializer, stride) when `node` is a convolution
    `space_to_depth_form` rewrites, else None."""
    if node.op_type != "Conv" or _attr(node, "group", 1) != 1:
        return None
    stride = list(_attr(node, "strides", [1, 1]))
    kernel, pads = list(_attr(node, "kernel_shape", [])), list(_attr(node, "pads", [0, 0, 0, 0]))
    s = stride[0]
    divisible = len(kernel) == 2 and not (kernel[0] % s or kernel[1] % s or any(p % s for p in pads))
    if s < 2 or len(set(stride)) != 1 or not divisible or any(d != 1 for d in _attr(node, "dilations", [1, 1])):
        return None
    x_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    q = x_dq.input[0]
    if q in inits or len(consumers.get(q, [])) != 1 or len(consumers.get(x_dq.output[0], [])) != 1 \
            or w_dq.input[0] not in inits:
        return None
    if numpy_helper.to_array(inits[w_dq.input[0]]).shape[1] > max_channels:
        return None
    return q, x_dq, inits[w_dq.input[0]], s


def space_to_depth_form(proto, max_channels=4):
    """See the module docstring. Rewrites every convolution on at most `max_channels` 8-bit input channels that
    qualifies; the input's height and width must then be multiples of the stride (yolov5's are multiples of 32).
    Returns (proto, number of convolutions rewritten)."""
    producer, consumers, inits = _graph_maps(proto)
    changed = 0
    for node in list(proto.graph.node):
        found = _s2d_conv(node, producer, consumers, inits, max_channels)
        if found is None:
            continue
        q, x_dq, w_init, s = found
        w = numpy_helper.to_array(w_init)
        o, c, kh, kw = w.shape
        w2 = w.reshape(o, c, kh // s, s, kw // s, s).transpose(0, 3, 5, 1, 2, 4).reshape(o, s * s * c, kh // s, kw // s)
        w_init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w2), w_init.name))
        _set_attrs(node, kernel_shape=[kh // s, kw // s], strides=[1, 1],
                   pads=[p // s for p in _attr(node, "pads", [0, 0, 0, 0])])
        name = f"{q}_space_to_depth"
        proto.graph.node.append(helper.make_node("SpaceToDepth", [q], [name], blocksize=s, name=name))
        x_dq.input[0] = name
        changed += 1
    if changed:
        _topological(proto)
    return proto, changed


def _dequantized_range(proto, dq, inits):
    """(low, high) a per-tensor DequantizeLinear can output, or None (per channel, or not constant)."""
    scale = _constant(proto, dq.input[1], inits)
    zero = _constant(proto, dq.input[2], inits) if len(dq.input) > 2 and dq.input[2] else np.zeros((), np.uint8)
    if scale is None or zero is None or scale.size != 1:
        return None
    info = np.iinfo(zero.dtype)
    return (np.float32((info.min - int(zero)) * float(scale)), np.float32((info.max - int(zero)) * float(scale)))


def _clip_sum_inputs(proto):
    """A Clip to the DequantizeLinear's range between each DequantizeLinear and an Add or Sum reading it."""
    producer, _, inits = _graph_maps(proto)
    changed = 0
    for node in list(proto.graph.node):
        if node.op_type not in ("Add", "Sum"):
            continue
        for k, name in enumerate(node.input):
            dq = producer.get(name)
            span = None if dq is None or dq.op_type != "DequantizeLinear" else _dequantized_range(proto, dq, inits)
            if span is None:
                continue
            base = f"{node.name or node.output[0]}_input{k}_clip"
            proto.graph.initializer.extend([numpy_helper.from_array(np.array(span[0]), f"{base}_low"),
                                            numpy_helper.from_array(np.array(span[1]), f"{base}_high")])
            proto.graph.node.append(helper.make_node("Clip", [name, f"{base}_low", f"{base}_high"], [base], name=base))
            node.input[k] = base
            changed += 1
    return changed


def _head_permute_4d(proto):
    """Reshape(bs, na, no, ny, nx) -> Transpose(0, 1, 3, 4, 2) with a constant shape as Transpose(0, 2, 3, 1) of the
    4-d (bs, na * no, ny, nx) input -> Reshape(bs, ny, nx, na, no) -> Transpose(0, 3, 1, 2, 4): the same elements in
    the same order. The first transpose is the NHWC layout the plugin's convolutions write anyway, the second moves
    whole rows of `no` values."""
    producer, _, inits = _graph_maps(proto)
    changed = 0
    for node in list(proto.graph.node):
        if node.op_type != "Transpose" or list(_attr(node, "perm", [])) != [0, 1, 3, 4, 2]:
            continue
        reshape = producer.get(node.input[0])
        shape = None if reshape is None or reshape.op_type != "Reshape" else _constant(proto, reshape.input[1], inits)
        if shape is None or shape.size != 5 or (shape <= 0).any():
            continue
        bs, na, no, ny, nx = (int(v) for v in shape)
        out = node.output[0]
        nhwc, rows = f"{out}_nhwc", f"{out}_nhwc_shape"
        proto.graph.initializer.append(numpy_helper.from_array(np.array([bs, ny, nx, na, no], np.int64), rows))
        proto.graph.node.insert(list(proto.graph.node).index(reshape),
                                helper.make_node("Transpose", [reshape.input[0]], [nhwc], name=nhwc, perm=[0, 2, 3, 1]))
        reshape.input[:] = [nhwc, rows]
        _set_attrs(node, perm=[0, 3, 1, 2, 4])
        changed += 1
    return changed


def openvino_form(proto):
    """See the module docstring. Returns (proto, {"clips": n, "permutes": n})."""
    counts = {"clips": _clip_sum_inputs(proto), "permutes": _head_permute_4d(proto)}
    _topological(proto)
    return proto, counts


def onnxruntime_kernel_form(proto):
    """`proto` (an onnx ModelProto, changed in place and returned) with every int8 initializer that feeds a
    DequantizeLinear stored as uint8 (value + 128) with its zero point + 128: the same integers and the same
    dequantized values, so the graph means exactly what it meant.

    Why: with int8 weights onnxruntime's x86 QLinearConv uses its u8 x s8 kernel, which on CPUs without VNNI multiplies
    with VPMADDUBSW; that instruction adds pairs of products in 16 bits and saturates (255 x 127 x 2 > 32767), so a
    conv's int32 accumulator is wrong wherever two large products meet (40% of an exported yolov5n's raw head outputs
    were then off, by up to 11 steps). With uint8 weights the u8 x u8 kernel widens to 16 bits before multiplying
    and accumulates in 32 bits: exact on every CPU. Returns the number of initializers re-encoded as well."""
    inits = {t.name: t for t in proto.graph.initializer}
    users = {}
    for node in proto.graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    changed = 0
    for node in proto.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        tensor = inits[node.input[0]]
        if tensor.data_type != onnx.TensorProto.INT8 or len(users[tensor.name]) != 1:
            continue
        if len(node.input) > 2 and node.input[2]:
            zp_name = node.input[2]
            if zp_name not in inits:
                continue
            zp = numpy_helper.to_array(inits[zp_name])
        else:
            scale = inits.get(node.input[1])
            if scale is None:
                continue
            zp = np.zeros(numpy_helper.to_array(scale).shape, np.int8)
        w = numpy_helper.to_array(tensor)
        tensor.CopyFrom(numpy_helper.from_array((w.astype(np.int16) + 128).astype(np.uint8), tensor.name))
        new_zp = numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), f"{tensor.name}_zero_point_u8")
        proto.graph.initializer.append(new_zp)
        while len(node.input) < 3:
            node.input.append("")
        node.input[2] = new_zp.name
        changed += 1
    if changed:  # zero points no longer used by any node would make onnxruntime warn once per initializer
        used = {name for node in proto.graph.node for name in node.input}
        keep = [t for t in proto.graph.initializer if t.name in used]
        del proto.graph.initializer[:]
        proto.graph.initializer.extend(keep)
    return proto, changed
