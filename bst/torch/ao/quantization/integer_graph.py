"""The integer model as data: bst's integer reference recorded op by op, saved as a self-describing folder.

`record(run)` runs ``run()`` (a function that runs a converted model in `integer_mode` and returns its output
`QTensor`s) and notes every integer op it executes: the input quantization, each conv with its int8 weights,
int32 bias and per-channel requantizing shifts, the adds, multiplications and concatenations with their operand
exponents, lookup tables (activations such as SiLU), max-pools, nearest upsamplings and ReLUs.
`IntegerGraph.save(folder)` writes

    model.json     the graph: ops in execution order, every tensor's exponent (scale 2**exponent), zero point and
                   range, the input quantization, the outputs, the rounding rule
    tensors.npz    int8 weights, int32 biases, int32 shifts (one per output channel), int32 lookup tables
    example.npz    an example input (float32, NCHW) and the integer outputs the reference computed for it
    run_integer.py a runner that needs only numpy and executes model.json (`integer_runner.py`, copied)

The format is described in `integer_runner.py`, which is also its executable definition. The recorded graph has
no fixed spatial size: convs, pools and upsamplings apply to any input the model accepts.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from . import integer_reference as iref
from .integer_runner import FORMAT, VERSION


def _ints(v) -> int | list:
    """An int or a 0-d tensor as an int; a 1-d tensor as a list of ints (JSON)."""
    t = torch.as_tensor(v)
    return int(t) if t.dim() == 0 else [int(i) for i in t.reshape(-1).tolist()]


class IntegerGraph:
    """What `record` saw: nodes in execution order, tensors by name, arrays for tensors.npz."""

    def __init__(self) -> None:
        self.nodes, self.tensors, self.arrays = [], {}, {}
        self.input = None
        self.outputs = []
        self._names, self._keep = {}, []

    def _name(self, t) -> str:
        key = id(t)
        if key not in self._names:
            self._keep.append(t)  # keeps the object alive, so its id is never reused while recording
            name = f"t{len(self._names)}"
            self._names[key] = name
            if isinstance(t, iref.QTensor):
                axis = t.axis
                self.tensors[name] = {
                    "exponent": [iref.exponent_of(s, "scale") for s in t.scale.tolist()] if axis is not None
                    else iref.exponent_of(t.scale, "scale"),
                    "zero_point": _ints(t.zero_point), "quant_min": int(t.quant_min), "quant_max": int(t.quant_max),
                    "axis": axis}
        return self._names[key]

    def _array(self, key: str, value, dtype) -> str:
        self.arrays[key] = value.detach().cpu().numpy().astype(dtype)
        return key

    def add(self, op: str, inputs: list[torch.Tensor | iref.QTensor], output: iref.QTensor,
            attrs: dict[str, object]) -> None:
        """Called by the integer reference for every op it executes while recording."""
        if op == "quantize":
            if self.input is not None:
                raise ValueError("the recorded model quantizes more than one float input; the integer model has one")
            x = inputs[0]
            self.input = {"name": "images", "layout": "NCHW", "dtype": "float32",
                          "example_shape": list(x.shape)}
            self._names[id(x)] = "images"
            self._keep.append(x)
        node = {"op": op, "inputs": [self._name(t) for t in inputs], "output": self._name(output)}
        out = node["output"]
        if op == "conv2d":
            node["weight"] = self._array(f"{out}.weight", attrs["weight"], np.int8)
            node["weight_zero_point"] = _ints(attrs["weight_zero_point"])
            bias = attrs["bias"]
            node["bias"] = None if bias is None else self._array(f"{out}.bias", bias.reshape(-1), np.int32)
            node["shift"] = self._array(f"{out}.shift", attrs["shift"].reshape(-1), np.int32)
            for k in ("stride", "padding", "dilation"):
                node[k] = [int(v) for v in attrs[k]]
            node["groups"] = int(attrs["groups"])
            node["activation"] = attrs["activation"]
            node["rounding"] = attrs["rounding"]
        elif op == "lookup":
            node["table"] = self._array(f"{out}.table", attrs["table"].reshape(-1), np.int32)
            node["input_min"] = int(attrs["input_min"])
        else:
            for k, v in attrs.items():
                node[k] = list(v) if isinstance(v, tuple) else v
        self.nodes.append(node)

    def rounding(self) -> str:
        """The nodes' common rounding rule, or "mixed"."""
        rules = {n["rounding"] for n in self.nodes if "rounding" in n}
        return rules.pop() if len(rules) == 1 else "mixed" if rules else "half_even"

    def to_dict(self) -> dict:
        version = VERSION if any(n["op"] == "lookup" for n in self.nodes) else 1  # version 1 readers run the rest
        return {"format": FORMAT, "version": version, "rounding": self.rounding(), "input": self.input,
                "outputs": self.outputs, "tensors": self.tensors, "nodes": self.nodes}

    def save(self, folder: str | Path, example_input: torch.Tensor, example_outputs: list[iref.QTensor]) -> Path:
        """Write model.json, tensors.npz, example.npz and run_integer.py into `folder` (created)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "model.json").write_text(json.dumps(self.to_dict(), indent=1))
        np.savez(folder / "tensors.npz", **self.arrays)
        outs = {name: q.int_repr.cpu().numpy().astype(np.int32) for name, q in zip(self.outputs, example_outputs)}
        np.savez(folder / "example.npz", images=example_input.detach().float().cpu().numpy(), **outs)
        shutil.copyfile(Path(__file__).with_name("integer_runner.py"), folder / "run_integer.py")
        return folder


@contextmanager
def recording() -> Iterator[IntegerGraph]:
    """``with recording() as graph:`` every integer-reference op run in the block is noted in `graph`."""
    if iref._recorder is not None:
        raise RuntimeError("an integer graph is already being recorded")
    graph = IntegerGraph()
    iref._recorder = graph
    try:
        yield graph
    finally:
        iref._recorder = None


def record(run: Callable[[], Iterable[iref.QTensor]]) -> tuple[IntegerGraph, list[iref.QTensor]]:
    """(graph, outputs): `run()` (integer-mode execution returning a list of QTensors) recorded op by op."""
    with recording() as graph:
        outputs = list(run())
    if graph.input is None:
        raise ValueError("nothing was quantized while recording: run the converted model in integer_mode")
    for q in outputs:
        if not isinstance(q, iref.QTensor):
            raise ValueError(f"the recorded function returned a {type(q).__name__}; the integer model's outputs "
                             "are QTensors")
    graph.outputs = [graph._name(q) for q in outputs]
    return graph, outputs
