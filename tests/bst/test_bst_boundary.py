"""bst is used through its public API: no module outside bst (tests aside) imports a private bst name or reads a private
attribute of bst objects, so bst can change its internals without breaking the project. Read from the source (ast)."""
from __future__ import annotations

import ast
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".venv", "datasets", "runs", "tests", "notes", "__pycache__", ".git", "bst"}
# children / buffers of bst modules that are reached through a public accessor, never through torch's private
# registries (module._modules["activation_post_process"], ...)
BST_CHILDREN = {"activation_post_process", "weight_fake_quant", "fake_quant_enabled", "observer_enabled"}
TORCH_NAMES = set(dir(nn.Module())) | set(dir(torch.autograd.Function)) | set(dir(object)) | set(dir(torch.Tensor))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _sources(root: Path, inside_bst: bool):
    for path in sorted(root.rglob("*.py")):
        parts = set(path.relative_to(root).parts)
        if inside_bst == ("bst" in parts) and not (SKIP_DIRS - {"bst"}) & parts:
            yield path


def defined_names(tree: ast.AST) -> set[str]:
    """Private names a module defines: module-level functions, classes and variables, class attributes and methods,
    and attributes assigned on ``self``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for sub in ast.walk(t):
                    if isinstance(sub, ast.Name):
                        names.add(sub.id)
                    elif isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                        names.add(sub.attr)
    return {n for n in names if _private(n)}


def bst_private_names(root: Path = ROOT) -> set[str]:
    """Private names bst defines that neither torch nor the rest of the project defines as well."""
    inside = set().union(*(defined_names(ast.parse(p.read_text())) for p in _sources(root, True)))
    outside = set().union(*(defined_names(ast.parse(p.read_text())) for p in _sources(root, False)))
    return inside - outside - TORCH_NAMES


def violations(source: str, private_names: set[str], where: str = "<source>") -> list[str]:
    """Where `source` imports a private bst name or reads a private attribute of bst objects."""
    tree = ast.parse(source)
    bst_bound = set()  # local names bound to bst modules or objects imported from bst
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "bst":
                    bst_bound.add(a.asname or "bst")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "bst":
            for a in node.names:
                bst_bound.add(a.asname or a.name)
                if _private(a.name):
                    found.append(f"{where}:{node.lineno}: from {node.module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if node.attr in private_names:
                found.append(f"{where}:{node.lineno}: .{node.attr} (a private attribute of bst)")
            elif isinstance(node.value, ast.Name) and node.value.id in bst_bound:
                found.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr}")
        elif isinstance(node, ast.Call):
            func, args = node.func, node.args
            keys = [a.value for a in args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if isinstance(func, ast.Name) and func.id in ("getattr", "setattr", "hasattr", "delattr") and keys:
                if any(_private(k) and k in private_names for k in keys):
                    found.append(f"{where}:{node.lineno}: {func.id}(..., {keys[0]!r})")
            elif (isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute)
                  and func.value.attr in ("_modules", "_buffers", "_parameters") and set(keys) & BST_CHILDREN):
                found.append(f"{where}:{node.lineno}: {func.value.attr}.{func.attr}({keys[0]!r})")
        elif (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute)
              and node.value.attr in ("_modules", "_buffers", "_parameters") and isinstance(node.slice, ast.Constant)
              and node.slice.value in BST_CHILDREN):
            found.append(f"{where}:{node.lineno}: {node.value.attr}[{node.slice.value!r}]")
    return found


def test_the_scan_finds_private_access():
    names = {"_activation", "_stale", "_output_quantizer_hook"}
    bad = """
import bst.torch.ao.quantization.quantize as bq_quantize
from bst.torch.ao.quantization.quantize import _output_quantizer_hook
from bst.torch.ao.nn.qat import conv
a = qat._activation
b = fq.__dict__.get("_stale") or getattr(fq, "_stale")
c = conv._private_helper(1)
d = qat._modules.get("activation_post_process")
e = qat._modules["weight_fake_quant"]
f = bq_quantize._output_quantizer_hook
"""
    found = violations(bad, names)
    assert len(found) == 7, found
    good = """
from bst.torch.ao.quantization import frozen_qparams, output_quantizer
import torch
q = output_quantizer(conv)
m = model._modules.get("input_quant")
t = x._version + torch._C._get_tracing_state
"""
    assert violations(good, names) == []


def test_bst_private_names_are_what_bst_hides():
    names = bst_private_names()
    assert {"_activation", "_stale", "_output_quantizer_hook", "_InputTracer", "_quantize_output"} <= names
    assert not {"_modules", "_buffers", "_apply", "_version", "_load_from_state_dict"} & names  # torch's


def test_no_module_outside_bst_reads_bst_privates():
    names = bst_private_names()
    found = []
    for path in _sources(ROOT, False):
        found += violations(path.read_text(), names, str(path.relative_to(ROOT)))
    assert not found, "private bst names used outside bst (use or add a public bst API):\n" + "\n".join(found)
