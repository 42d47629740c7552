"""Imports go one way: the project's import graph, read from the source, has no cycle, every import points down the
layers (LAYERS), and a function imports only heavy optional packages (the rest is imported at module top, where a
cycle cannot hide)."""
from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".venv", "datasets", "runs", "tests", "notes", "__pycache__", ".git"}

# The project's floors, lowest first: a module imports only modules of its own floor or of floors below it.
#   bst       the quantization library, which knows nothing of YOLO
#   utils     ground helpers: files, data, metrics, plots, loss, graph rewriting, runtime sessions
#   models    the network, its checkpoints and the YOLO side of QAT
#   workflow  what needs a model: training steps, QAT runs, DetectMultiBackend, torch.hub, exporters
#   scripts   the command-line scripts and the benchmarks
LAYERS = ("bst", "utils", "models", "workflow", "scripts")
SCRIPTS = {"train", "val", "detect", "export", "qat_report", "demo", "hubconf", "benchmarks"}

# Imported inside the function that needs them, never at module top: packages that are optional (not in
# requirements.txt, or only needed by one export format or plot) or slow to import for every command.
HEAVY_OPTIONAL = {"onnx", "onnxruntime", "onnxslim", "onnxsim", "openvino", "tensorrt", "coremltools", "matplotlib",
                  "seaborn", "pandas", "scipy", "pycocotools", "mss", "IPython", "brevitas", "thop", "yolov5",
                  "ultralytics", "torch.utils.tensorboard"}


def project_modules(root: Path = ROOT) -> dict[str, Path]:
    mods = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if SKIP_DIRS & set(rel.parts):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _targets(node, module: str, is_package: bool, mods) -> list[str]:
    """Project modules one import statement loads: the deepest module each name resolves to."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in mods]
    base = node.module or ""
    if node.level:
        pkg = module.split(".") if is_package else module.split(".")[:-1]
        pkg = pkg[:len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([base] if base else []))
    out = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
    if len(out) < len(node.names) and base in mods:
        out.append(base)
    return out


def import_graph(mods) -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> project modules it imports anywhere in its source, [(module, line, statement)] of imports made
    inside functions that are neither relative nor of a heavy optional package)."""
    graph, inner = {}, []
    for name, path in mods.items():
        tree = ast.parse(path.read_text(), str(path))
        edges = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges.update(_targets(node, name, path.name == "__init__.py", mods))
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    names = [("." * node.level) + (node.module or "")]
                else:
                    continue
                if not all(any(n == h or n.startswith(h + ".") for h in HEAVY_OPTIONAL) for n in names):
                    inner.append((name, node.lineno, ast.unparse(node)))
        graph[name] = edges - {name}
    return graph, inner


@functools.cache
def project_graph():
    return import_graph(project_modules())


def find_cycle(graph) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph.get(v, ())):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state:
                found = visit(w)
                if found:
                    return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(graph):
        if v not in state:
            found = visit(v)
            if found:
                return found
    return None


def test_find_cycle_finds_one_and_only_a_real_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_graph_reads_every_kind_of_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("from .a import x\n")
    (tmp_path / "pkg" / "a.py").write_text("import pkg.b\nx = 1\n")
    (tmp_path / "pkg" / "b.py").write_text("def f():\n    from pkg import a\n    import onnx\n")
    graph, inner = import_graph(project_modules(tmp_path))
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b"}, "pkg.b": {"pkg.a"}}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    assert inner == [("pkg.b", 2, "from pkg import a")]  # onnx is a heavy optional package


def test_no_import_cycle():
    graph, _ = project_graph()
    assert len(graph) > 60 and "models.checkpoint" in graph["models.experimental"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_functions_import_only_heavy_optional_packages():
    _, inner = project_graph()
    assert not inner, "imports inside functions (move them to the module top):\n" + "\n".join(
        f"  {m}:{line}: {stmt}" for m, line, stmt in inner)


def layer_of(module: str) -> int:
    """The index in LAYERS of a project module (ValueError for a top-level name LAYERS does not place)."""
    top = module.split(".")[0]
    return LAYERS.index("scripts" if top in SCRIPTS else top)


def upward_imports(graph) -> list[str]:
    """'a (layer) -> b (layer)' for every import of a module from a higher layer than the importer's."""
    return [f"{m} ({LAYERS[layer_of(m)]}) -> {t} ({LAYERS[layer_of(t)]})" for m in sorted(graph)
            for t in sorted(graph[m]) if layer_of(t) > layer_of(m)]


def test_the_layer_check_finds_an_upward_import():
    graph = {"utils.plots": {"utils.general"}, "models.yolo": {"utils.plots", "bst.torch"}, "train": {"val"},
             "utils.loss": {"models.yolo"}, "workflow.qat": {"models.yolo", "train"}}
    assert upward_imports(graph) == ["utils.loss (utils) -> models.yolo (models)",
                                     "workflow.qat (workflow) -> train (scripts)"]


def test_every_module_has_a_layer():
    graph, _ = project_graph()
    unplaced = sorted({m.split(".")[0] for m in graph if m.split(".")[0] not in SCRIPTS | set(LAYERS)})
    assert not unplaced, f"top-level modules without a layer (add them to LAYERS or SCRIPTS): {unplaced}"


def test_imports_point_down_the_layers():
    graph, _ = project_graph()
    bad = upward_imports(graph)
    assert not bad, "imports from a higher layer (move the code down, or the importer up):\n  " + "\n  ".join(bad)


def test_any_module_imports_first():
    """A module that needs another one fully initialised before it would fail here: in one fresh process, each
    module is imported while no other project module is loaded (torch and the rest stay cached)."""
    firsts = ["bst.torch.ao.nn.qat", "bst.torch.ao.nn.quantized.reference", "bst.torch.ao.nn.intrinsic.qat",
              "bst.torch.ao.quantization.mappings", "bst.torch.ao.quantization", "models.yolo", "models.checkpoint",
              "models.quant", "models.experimental", "workflow.qat", "utils.torch_utils", "qat_report", "train",
              "export"]
    code = f"""
import importlib, sys
own = {sorted({m.split(".")[0] for m in project_modules()})!r}
for first in {firsts!r}:
    for m in [m for m in sys.modules if m.split(".")[0] in own]:
        del sys.modules[m]
    importlib.import_module(first)
    q = importlib.import_module("bst.torch.ao.quantization")
    assert q.convert and q.integer_mode, first
print("ok", len({firsts!r}))
"""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == f"ok {len(firsts)}", r.stderr[-3000:]
