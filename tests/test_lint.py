"""The code base passes its linter configuration (pyproject.toml; `make lint`, which CI runs before the tests), and
no function of the project's own code is longer than MAX_FUNCTION_LINES."""
import ast
import subprocess
import sys

from conftest import ROOT

MAX_FUNCTION_LINES = 80  # def line (decorators not counted) to the function's last line, as ast reports them


def test_ruff_passes():
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


def project_sources():
    """The .py files git tracks outside tests/ (tests and their data files are not held to the limit)."""
    r = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=ROOT, capture_output=True, text=True, check=True)
    files = [ROOT / f for f in r.stdout.split("\0") if f]
    return [f for f in files if f.parts[len(ROOT.parts)] != "tests" and f.is_file()]


def long_functions(path, limit=MAX_FUNCTION_LINES, root=ROOT):
    """'file:line name (N lines)' for every function or method in `path` (nested ones too) longer than `limit`
    lines, the file named relative to `root`."""
    tree = ast.parse(path.read_bytes(), str(path))
    functions = sorted((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))),
                       key=lambda node: node.lineno)
    return [f"{path.relative_to(root)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in functions if node.end_lineno - node.lineno + 1 > limit]


SAMPLE = """\
@staticmethod
def short():
    return 1


class A:
    async def method(self):
        a = 1
        b = 2
        return a + b


def outer():
    def inner():
        a = 1
        b = 2
        return a + b
    return inner
"""


def test_long_functions_names_functions_methods_and_nested_ones(tmp_path):
    """Lines count from the def line (not a decorator) to the last line of the body."""
    (tmp_path / "m.py").write_text(SAMPLE)
    assert long_functions(tmp_path / "m.py", limit=3, root=tmp_path) == ["m.py:7 method (4 lines)",
                                                                        "m.py:13 outer (6 lines)",
                                                                        "m.py:14 inner (4 lines)"]
    assert long_functions(tmp_path / "m.py", limit=1, root=tmp_path)[0] == "m.py:2 short (2 lines)"
    assert long_functions(tmp_path / "m.py", limit=6, root=tmp_path) == []


def test_project_sources_found():
    names = {str(f.relative_to(ROOT)) for f in project_sources()}
    assert {"train.py", "val.py", "detect.py", "models/yolo.py"} <= names
    assert not any(n.startswith("tests/") for n in names)


def test_functions_are_short():
    """A function longer than MAX_FUNCTION_LINES does several jobs: split it into named helpers."""
    too_long = [x for f in project_sources() for x in long_functions(f)]
    assert not too_long, f"functions longer than {MAX_FUNCTION_LINES} lines:\n" + "\n".join(too_long)
