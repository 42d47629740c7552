"""Run a bst integer model (model.json + tensors.npz) with numpy only: the golden model of a quantized network.

    python run_integer.py MODEL_DIR --check                   # rerun example.npz, compare bit for bit
    python run_integer.py MODEL_DIR --input x.npy --output y.npz

Format ("bst-integer-model", version 2; version 1 is version 2 without "lookup" nodes, and files without them
say version 1). Every tensor is integer with a power-of-two scale: real value
``(q - zero_point) * 2**exponent``; `model.json` lists each tensor's exponent, zero point and range
[quant_min, quant_max] ("axis": 1 with one exponent and zero point per channel, for model outputs). Nodes run in
order; each reads tensors by name and writes one. ``R(a, s)`` is the requantizing shift: ``a * 2**-s`` rounded as
the node's "rounding" says (s > 0: arithmetic right shift by s plus the rounding decision on the dropped bits; s <= 0:
exact left shift by -s): "half_even" (ties to the even neighbour, as ONNX QuantizeLinear) or "half_up"
(``(a + 2**(s-1)) >> s``, ties towards +inf, as an adder and a shifter). The graph's "rounding" is the nodes' common
rule ("mixed" if they differ).

    quantize          q = clamp(round(x * 2**-e_out) + z_out)                   x: float32 NCHW image in [0, 1]
    conv2d            acc = sum((q_in - z_in) * (w - z_w)) + bias               int8 w (O, I/groups, kh, kw), int32
                      r = R(acc, shift[o]);  relu: max(r, 0); relu6: min(max(r, 0), R(6, e_out))
                      q = clamp(r + z_out)                                      bias, int32 shift per out channel o
                      zero padding (of q_in - z_in), stride, dilation, groups as in torch.nn.Conv2d
    add               e = min(e_a, e_b); t = (a - z_a) << (e_a - e) + (b - z_b) << (e_b - e);
                      q = clamp(act(R(t, e_out - e)) + z_out)                   act: none or relu
    mul               q = clamp(R((a - z_a) * (b - z_b), e_out - e_a - e_b) + z_out)
    cat               each part: clamp(R(p - z_p, e_out - e_p) + z_out); joined along dim
    lookup            q = table[clamp(q_in, m, m + len(table) - 1) - m]          int32 table, m = "input_min": an
                      elementwise activation (SiLU, ...) as a table from input to output integers
    max_pool2d        window maximum (padding never wins); upsample_nearest: each value repeated factors times
    relu              max(q, z)

clamp is to the output tensor's [quant_min, quant_max]. Products and sums are computed in float64 matrix products,
exact for integers below 2**53 (an int8 conv with fewer than 2**37 taps per output). Outputs are the integers
``q`` of the tensors named in "outputs".
"""
from __future__ import annotations

import argparse
import json
import sys
import zipfile
from pathlib import Path

import numpy as np

FORMAT, VERSION = "bst-integer-model", 2
VERSIONS = (1, 2)  # what this runner reads


ROUNDINGS = ("half_even", "half_up")
INPUTS = {"quantize": 1, "conv2d": 1, "add": 2, "mul": 2, "cat": None, "max_pool2d": 1, "upsample_nearest": 1,
          "relu": 1, "lookup": 1}  # op -> number of inputs (None: one or more)
MAX_EXPONENT = 62  # exponents and shifts beyond this overflow the int64 arithmetic
MAX_WINDOW = 64  # kernel sizes, strides, paddings, dilations and upsampling factors of a real network are far smaller
INT32 = (-2 ** 31, 2 ** 31 - 1)


def _int(v, lo=None, hi=None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)


def _ints(v, n=None, lo=None, hi=None) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and len(v) > 0 and all(_int(x, lo, hi) for x in v)


def check_graph(graph: object, arrays: dict[str, np.ndarray], where: str | Path) -> None:
    """model.json against the format above, before anything runs: ValueError naming the file, the entry and what it
    must hold (a damaged or hand-edited file would otherwise fail deep in numpy, or overflow without a word)."""
    def bad(what):
        raise ValueError(f"{where}: {what}; export the model again (export.py --include integer)")

    if not isinstance(graph, dict) or graph.get("format") != FORMAT or graph.get("version") not in VERSIONS:
        bad(f"not a {FORMAT} file of version {' or '.join(map(str, VERSIONS))}")
    for key, kind in (("input", dict), ("outputs", list), ("tensors", dict), ("nodes", list)):
        if not isinstance(graph.get(key), kind) or not graph[key]:
            bad(f"'{key}' must be a non-empty {kind.__name__}")
    name = graph["input"].get("name")
    if not isinstance(name, str):
        bad("'input' has no name")
    for t_name, t in graph["tensors"].items():
        _check_tensor(t_name, t, bad)
    defined = {name}
    for i, node in enumerate(graph["nodes"]):
        _check_node(i, node, graph, arrays, defined, bad)
        defined.add(node["output"])
    missing = [o for o in graph["outputs"] if not isinstance(o, str) or o not in defined or o == name]
    if missing:
        bad(f"outputs {missing} are computed by no node")


def _check_tensor(name, t, bad):
    if not isinstance(t, dict) or "axis" not in t or not (t["axis"] is None or _int(t["axis"], 1, 1)):
        bad(f"tensor {name!r} must be a mapping with 'axis' null or 1")
    per_tensor = t["axis"] is None
    for key, lo, hi in (("exponent", -MAX_EXPONENT, MAX_EXPONENT), ("zero_point", *INT32)):
        v = t.get(key)
        if not (_int(v, lo, hi) if per_tensor else _ints(v, None, lo, hi)):
            bad(f"tensor {name!r}: '{key}' must be {'an integer' if per_tensor else 'a list of integers'} in "
                f"[{lo}, {hi}]")
    if not per_tensor and len(t["exponent"]) != len(t["zero_point"]):
        bad(f"tensor {name!r}: one exponent and one zero point per channel")
    if not (_int(t.get("quant_min"), *INT32) and _int(t.get("quant_max"), *INT32) and t["quant_min"] <= t["quant_max"]):
        bad(f"tensor {name!r}: 'quant_min' <= 'quant_max' must be int32 integers")


def _check_node(i, node, graph, arrays, defined, bad):
    op = node.get("op") if isinstance(node, dict) else None
    if not isinstance(op, str) or op not in INPUTS:
        bad(f"node {i} has op {op!r}; the ops are {', '.join(INPUTS)}")
    at = f"node {i} ({op})"
    ins, out, n = node.get("inputs"), node.get("output"), INPUTS[op]
    if not isinstance(ins, list) or not ins or not all(isinstance(x, str) for x in ins) or (
            n is not None and len(ins) != n):
        bad(f"{at} must read {n or 'one or more'} tensor(s)")
    first = graph["input"]["name"]
    if [x for x in ins if x not in defined or (x == first) != (op == "quantize")]:
        bad(f"{at} reads {ins}: a node reads tensors computed before it ('quantize' the input {first!r})")
    if not isinstance(out, str) or out in defined or out not in graph["tensors"]:
        bad(f"{at} writes {out!r}, which must be a new tensor listed in 'tensors'")
    if node.get("rounding", ROUNDINGS[0]) not in ROUNDINGS or node.get("activation") not in (None, "relu", "relu6"):
        bad(f"{at}: 'rounding' must be one of {ROUNDINGS} and 'activation' null, relu or relu6")
    pairs = {"conv2d": (("stride", 1), ("padding", 0), ("dilation", 1)), "upsample_nearest": (("factors", 1),),
             "max_pool2d": (("kernel_size", 1), ("stride", 1), ("padding", 0))}.get(op, ())
    for key, lo in pairs:
        if not _ints(node.get(key), 2, lo, MAX_WINDOW):
            bad(f"{at}: '{key}' must be two integers in [{lo}, {MAX_WINDOW}]")
    if op == "cat" and not _int(node.get("dim"), -4, 3):
        bad(f"{at}: 'dim' must be an axis of an NCHW tensor")
    if op == "conv2d":
        _check_conv(at, node, arrays, bad)
    if op == "lookup":
        table = arrays.get(node.get("table")) if isinstance(node.get("table"), str) else None
        if table is None or table.ndim != 1 or not 1 <= len(table) <= 1 << 16 or table.dtype.kind not in "iu":
            bad(f"{at}: 'table' must name a 1-d integer array of at most 65536 entries in tensors.npz")
        if not _int(node.get("input_min"), *INT32):
            bad(f"{at}: 'input_min' must be an int32 integer")


def _check_conv(at, node, arrays, bad):
    def array(key, ndim):
        name = node.get(key)
        a = arrays.get(name) if isinstance(name, str) else None
        if a is None or a.ndim != ndim or a.dtype.kind not in "iu":
            bad(f"{at}: '{key}' must name a {ndim}-d integer array of tensors.npz")
        return a

    w = array("weight", 4)
    o = w.shape[0]
    zp = node.get("weight_zero_point")
    if not (_int(zp, *INT32) or _ints(zp, o, *INT32)):
        bad(f"{at}: 'weight_zero_point' must be an integer or one per output channel")
    for key in ("shift",) + (("bias",) if node.get("bias") is not None else ()):
        if len(array(key, 1)) != o:
            bad(f"{at}: '{key}' must hold one value per output channel ({o})")
    if np.abs(arrays[node["shift"]].astype(np.int64)).max() > MAX_EXPONENT:
        bad(f"{at}: shifts must lie in [-{MAX_EXPONENT}, {MAX_EXPONENT}]")
    if not _int(node.get("groups"), 1) or o % node["groups"]:
        bad(f"{at}: 'groups' must be a positive divisor of the {o} output channels")


def shift_round(a: int | np.ndarray, s: int | np.ndarray, rounding: str = "half_even") -> np.ndarray:
    """a * 2**-s rounded half to even or half up, in int64 (s an int or an array broadcasting against a)."""
    a = np.asarray(a, dtype=np.int64)
    s = np.asarray(s, dtype=np.int64)
    right = np.maximum(s, 0)
    floor = a >> right
    dropped = a - (floor << right)
    half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
    if rounding == "half_up":
        up = (right > 0) & (dropped >= half)
    else:
        up = (right > 0) & ((dropped > half) | ((dropped == half) & ((floor & 1) == 1)))
    return np.where(s > 0, floor + up, a << np.maximum(-s, 0))


def round_float(t: np.ndarray, rounding: str) -> np.ndarray:
    """Float values rounded to integers (still float): half to even (np.rint) or half up (floor(t + 1/2))."""
    return np.floor(t + np.float32(0.5)) if rounding == "half_up" else np.rint(t)


def _conv2d(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups) -> np.ndarray:
    """Integer conv of int64 x (N, C, H, W) and w (O, C/groups, kh, kw) by patches and a float64 product."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    cols = np.empty((n, c, kh, kw, ho, wo), dtype=np.float64)
    for i in range(kh):
        for j in range(kw):
            cols[:, :, i, j] = x[:, :, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
    cols = cols.reshape(n, groups, cg * kh * kw, ho * wo)
    wg = w.reshape(groups, o // groups, cg * kh * kw).astype(np.float64)
    out = np.einsum("gok,ngkp->ngop", wg, cols, optimize=True)
    return np.rint(out).astype(np.int64).reshape(n, o, ho, wo)


class IntegerModel:
    """A loaded integer model; `run(images)` -> {output name: int64 array}."""

    def __init__(self, folder: str | Path) -> None:
        folder = Path(folder)
        self.where = folder / "model.json"
        try:
            self.graph = json.loads(self.where.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{self.where}: not JSON ({e}); export the model again") from None
        try:
            with np.load(folder / "tensors.npz") as arrays:
                self.arrays = {k: arrays[k] for k in arrays.files}
        except (zipfile.BadZipFile, EOFError, ValueError) as e:
            raise ValueError(f"{folder / 'tensors.npz'}: not a readable .npz of integer arrays ({e}); export the "
                             f"model again") from None
        check_graph(self.graph, self.arrays, self.where)
        self.tensors = self.graph["tensors"]

    def _bcast(self, name, key, ndim):
        """A tensor's exponent or zero point, shaped to broadcast over an NCHW array (per channel: axis 1)."""
        t = self.tensors[name]
        v = np.asarray(t[key], dtype=np.int64)
        if t["axis"] is not None:
            shape = [1] * ndim
            shape[t["axis"]] = -1
            v = v.reshape(shape)
        return v

    def _finish(self, name, r, activation=None, rounding="half_even"):
        t = self.tensors[name]
        if activation == "relu":
            r = np.maximum(r, 0)
        elif activation == "relu6":
            r = np.minimum(np.maximum(r, 0), shift_round(6, self._bcast(name, "exponent", r.ndim), rounding))
        elif activation is not None:
            raise ValueError(f"activation {activation!r} is not supported")
        return np.clip(r + self._bcast(name, "zero_point", r.ndim), t["quant_min"], t["quant_max"])

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(f"the input must be float32 NCHW images, got shape {list(images.shape)}")
        values = {self.graph["input"]["name"]: images}
        for i, node in enumerate(self.graph["nodes"]):
            try:
                self._run_node(node, values)
            except ValueError as e:  # shapes that do not fit: the model's weights, or the input given
                raise ValueError(f"{self.where}: node {i} ({node['op']}) cannot run on input {list(images.shape)} "
                                 f"({str(e).splitlines()[0][:160]})") from None
        return {name: values[name] for name in self.graph["outputs"]}

    def _run_node(self, node, values):
        """Execute one node, writing its output into `values`."""
        op, out = node["op"], node["output"]
        ins = [values[i] for i in node["inputs"]]
        t = self.tensors[out]
        rounding = node.get("rounding", "half_even")
        if op == "quantize":
            inv = np.float32(2.0 ** -t["exponent"])
            values[out] = np.clip(round_float(ins[0] * inv, rounding).astype(np.int64) + t["zero_point"],
                                  t["quant_min"], t["quant_max"])
            return
        src = node["inputs"]
        if op == "conv2d":
            x = ins[0] - self._bcast(src[0], "zero_point", 4)
            w = self.arrays[node["weight"]].astype(np.int64) - np.asarray(node["weight_zero_point"],
                                                                         dtype=np.int64).reshape(-1, 1, 1, 1)
            acc = _conv2d(x, w, node["stride"], node["padding"], node["dilation"], node["groups"])
            if node.get("bias") is not None:
                acc = acc + self.arrays[node["bias"]].astype(np.int64).reshape(1, -1, 1, 1)
            shift = self.arrays[node["shift"]].astype(np.int64).reshape(1, -1, 1, 1)
            values[out] = self._finish(out, shift_round(acc, shift, rounding), node.get("activation"), rounding)
        elif op in ("add", "mul"):
            (a, b), (ea, eb) = ins, [self.tensors[n]["exponent"] for n in src]
            a, b = a - self.tensors[src[0]]["zero_point"], b - self.tensors[src[1]]["zero_point"]
            if op == "add":
                e = min(ea, eb)
                total, e_acc = (a << (ea - e)) + (b << (eb - e)), e
            else:
                total, e_acc = a * b, ea + eb
            values[out] = self._finish(out, shift_round(total, t["exponent"] - e_acc, rounding),
                                       node.get("activation"), rounding)
        elif op == "cat":
            parts = [self._finish(out, shift_round(p - self.tensors[n]["zero_point"],
                                                   t["exponent"] - self.tensors[n]["exponent"], rounding))
                     for p, n in zip(ins, src)]
            values[out] = np.concatenate(parts, axis=node["dim"])
        elif op == "max_pool2d":
            (kh, kw), (sh, sw), (ph, pw) = node["kernel_size"], node["stride"], node["padding"]
            x = np.pad(ins[0], ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=np.iinfo(np.int64).min)
            ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
            best = None
            for i in range(kh):
                for j in range(kw):
                    win = x[:, :, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw]
                    best = win if best is None else np.maximum(best, win)
            values[out] = best
        elif op == "lookup":
            table, lo = self.arrays[node["table"]].astype(np.int64), node["input_min"]
            values[out] = table[np.clip(ins[0], lo, lo + len(table) - 1) - lo]
        elif op == "upsample_nearest":
            fh, fw = node["factors"]
            values[out] = np.repeat(np.repeat(ins[0], fh, axis=2), fw, axis=3)
        elif op == "relu":
            values[out] = np.maximum(ins[0], self._bcast(src[0], "zero_point", ins[0].ndim))
        else:
            raise ValueError(f"op {op!r} is not part of {FORMAT} version {VERSION}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="folder holding model.json and tensors.npz")
    parser.add_argument("--check", action="store_true", help="run example.npz and compare with its outputs")
    parser.add_argument("--input", help=".npy float32 NCHW images in [0, 1]")
    parser.add_argument("--output", help=".npz to write the integer outputs to")
    opt = parser.parse_args(argv)
    try:
        model = IntegerModel(opt.model)
        if opt.check:
            example = Path(opt.model) / "example.npz"
            with np.load(example) as ex:
                missing = sorted({"images", *model.graph["outputs"]} - set(ex.files))
                if missing:
                    raise ValueError(f"{example}: holds no {', '.join(missing)}; export the model again")
                out = model.run(ex["images"])
                if any(out[k].shape != ex[k].shape for k in out):
                    raise ValueError(f"{example}: its outputs' shapes differ from what the model computes")
                bad = {k: int((out[k] != ex[k]).sum()) for k in out}
                total = sum(ex[k].size for k in out)
            print(f"{sum(bad.values())} of {total} output integers differ from example.npz")
            return 1 if any(bad.values()) else 0
        if not opt.input:
            parser.error("give --input (and --output), or --check")
        out = model.run(np.load(opt.input))
        if opt.output:
            np.savez(opt.output, **{k: v.astype(np.int32) for k, v in out.items()})
        for k, v in out.items():
            print(f"{k}: shape {list(v.shape)}, range [{v.min()}, {v.max()}]")
        return 0
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:  # one line: the file, what, what to do
        print(f"ERROR: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
