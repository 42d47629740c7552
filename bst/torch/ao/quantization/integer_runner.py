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
from pathlib import Path

import numpy as np

FORMAT, VERSION = "bst-integer-model", 2
VERSIONS = (1, 2)  # what this runner reads


ROUNDINGS = ("half_even", "half_up")


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
        self.graph = json.loads((folder / "model.json").read_text())
        if self.graph.get("format") != FORMAT or self.graph.get("version") not in VERSIONS:
            raise ValueError(f"{folder / 'model.json'}: not a {FORMAT} file of version "
                             f"{' or '.join(map(str, VERSIONS))}")
        bad = {n.get("rounding") for n in self.graph["nodes"] if "rounding" in n} - set(ROUNDINGS)
        if bad:
            raise ValueError(f"rounding {sorted(bad)} is not supported by this runner ({', '.join(ROUNDINGS)})")
        with np.load(folder / "tensors.npz") as arrays:
            self.arrays = {k: arrays[k] for k in arrays.files}
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
        values = {self.graph["input"]["name"]: np.asarray(images, dtype=np.float32)}
        for node in self.graph["nodes"]:
            op, out = node["op"], node["output"]
            ins = [values[i] for i in node["inputs"]]
            t = self.tensors[out]
            rounding = node.get("rounding", "half_even")
            if op == "quantize":
                inv = np.float32(2.0 ** -t["exponent"])
                values[out] = np.clip(round_float(ins[0] * inv, rounding).astype(np.int64) + t["zero_point"],
                                      t["quant_min"], t["quant_max"])
                continue
            src = node["inputs"]
            if op == "conv2d":
                x = ins[0] - self._bcast(src[0], "zero_point", 4)
                w = self.arrays[node["weight"]].astype(np.int64) - np.asarray(node["weight_zero_point"],
                                                                             dtype=np.int64).reshape(-1, 1, 1, 1)
                acc = _conv2d(x, w, node["stride"], node["padding"], node["dilation"], node["groups"])
                if node["bias"] is not None:
                    acc = acc + self.arrays[node["bias"]].astype(np.int64).reshape(1, -1, 1, 1)
                shift = self.arrays[node["shift"]].astype(np.int64).reshape(1, -1, 1, 1)
                values[out] = self._finish(out, shift_round(acc, shift, rounding), node["activation"], rounding)
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
        return {name: values[name] for name in self.graph["outputs"]}


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
            with np.load(Path(opt.model) / "example.npz") as ex:
                out = model.run(ex["images"])
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
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
