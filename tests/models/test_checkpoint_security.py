"""Crafted checkpoints must not run code through the weights_only allowlist.

The attack these tests replay: with `builtins.getattr` on the allowlist, a pickle walks from an allowlisted class to
a module's globals (`Conv.forward.__globals__`), BUILDs an allowlisted module instance with that dict and then with the
builtins dict (nn.Module.__setstate__ merges any dict into the instance), reads `exec` off the instance, installs it as
the instance's `__setstate__` with a third BUILD, and a fourth BUILD hands it a code string. Injected as one extra key
into an otherwise valid checkpoint, it ran code in every CLI. Each payload here is first shown to be live (a trusted
load runs it and creates the marker file), then refused by the loader with one line and no side effect.
"""
import struct
import zipfile

import pytest
import torch
import torch.nn as nn
from conftest import ROOT

from models.checkpoint import load_checkpoint, safe_globals
from utils.general import UserError


def _str(s: str) -> bytes:
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _getattr(obj: bytes, name: str) -> bytes:
    return _global("builtins", "getattr") + b"(" + obj + _str(name) + b"tR"


def exploit_pickle(marker, cls=("torch.nn.modules.linear", "Identity"), via=("models.common", "Conv")) -> bytes:
    """{'epoch': 1, 'x': <allowlisted instance that ran `open(marker, 'w')` while being unpickled>} (protocol 2)."""
    code = f"open({str(marker)!r}, 'w').close()"
    inst = _global(*cls) + b")\x81" + b"q\x01"  # an allowlisted module instance (NEWOBJ, as torch pickles), memo 1
    globals_dict = _getattr(_getattr(_global(*via), "forward"), "__globals__")
    builtins_dict = _getattr(b"h\x01", "__builtins__")
    setstate = b"}" + _str("__setstate__") + _getattr(b"h\x01", "exec") + b"s"
    value = inst + globals_dict + b"b" + builtins_dict + b"b" + setstate + b"b" + _str(code) + b"b"
    return b"\x80\x02}q\x00(" + _str("epoch") + b"K\x01" + _str("x") + value + b"u."


def write_checkpoint(path, pickle_bytes):
    """A torch.save zip whose data.pkl is `pickle_bytes` (the other records from a real save)."""
    tmp = path.with_suffix(".tmp")
    torch.save({"epoch": 1}, tmp)
    with zipfile.ZipFile(tmp) as src, zipfile.ZipFile(path, "w") as dst:
        for item in src.infolist():
            data = pickle_bytes if item.filename.endswith("/data.pkl") else src.read(item.filename)
            dst.writestr(item, data)
    tmp.unlink()
    return path


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv("YOLOV5_TRUST_CHECKPOINTS", raising=False)


@pytest.mark.parametrize("cls", [("torch.nn.modules.linear", "Identity"), ("torch.nn.modules.activation", "ReLU"),
                                 ("torch.nn.modules.container", "Sequential"), ("models.common", "Concat"),
                                 ("models.experimental", "Ensemble")])
def test_getattr_build_exploit_is_refused(tmp_path, cls):
    marker = tmp_path / "pwned"
    evil = write_checkpoint(tmp_path / "evil.pt", exploit_pickle(marker, cls))
    assert load_checkpoint(evil, trust=True)["epoch"] == 1 and marker.exists(), "the payload must be live"
    marker.unlink()
    with pytest.raises(UserError) as e:
        load_checkpoint(evil)
    assert not marker.exists()
    assert "refused to load" in str(e.value) and "builtins.getattr" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("cli", ["val.py", "detect.py", "export.py", "train.py"])
def test_every_cli_refuses_the_exploit_in_one_line(tmp_path, cli):
    import subprocess
    import sys

    marker = tmp_path / "pwned"
    evil = write_checkpoint(tmp_path / "evil.pt", exploit_pickle(marker))
    runs = ["--project", str(tmp_path / "runs")]
    args = {"val.py": ["--data", "shapes.yaml", *runs], "detect.py": ["--source", str(ROOT / "models"), *runs],
            "export.py": ["--include", "onnx"], "train.py": ["--data", "shapes.yaml", "--epochs", "1", *runs]}[cli]
    r = subprocess.run([sys.executable, cli, "--weights", str(evil), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=300, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert r.returncode != 0 and not marker.exists()
    errors = [line for line in r.stderr.splitlines() if "refused to load" in line]
    assert len(errors) == 1 and "builtins.getattr" in errors[0] and "Traceback" not in r.stderr


def test_allowlist_holds_no_callable_that_reaches_arbitrary_objects():
    """Only classes and plain-data constructors: nothing that reads attributes, imports, evaluates or calls."""
    import builtins
    import functools
    import operator

    allowed = list(safe_globals().values())
    dangerous = [getattr, setattr, delattr, eval, exec, compile, __import__, globals, vars, open, builtins.input,
                 functools.partial, functools.reduce, operator.attrgetter, operator.itemgetter, operator.methodcaller]
    assert not [d for d in dangerous if any(a is d for a in allowed)]
    functions = [a for a in allowed if not isinstance(a, type)]
    names = sorted(f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', f)}" for f in functions)
    # classes only (the reader allocates them, never calls them), and the QAT output hook as a value
    assert names == ["bst.torch.ao.quantization.quantize._output_quantizer_hook"], names


def test_legitimate_checkpoints_still_load(tmp_path):
    from conftest import reference

    for name in ("yolov5n_silu.pt", "yolov5n_relu.pt"):
        ckpt = load_checkpoint(reference(name))
        assert isinstance(ckpt["model"], nn.Module)
    ckpt = load_checkpoint(ROOT / "weights" / "shapes_yolov5n_silu.pt")
    assert isinstance(ckpt["model"], nn.Module)
