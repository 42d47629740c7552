"""Every public function and method of bst.torch.ao is fully annotated (parameters and return).

Checked: public module-level functions defined in each module, and the public methods (plus ``__init__`` and
``__new__``) and properties that public classes expose, wherever in bst they are defined (a private bst base
class included); what a class inherits from torch or the standard library is not checked. Exempt: the first
parameter of a method (self / cls), ``*args`` and ``**kwargs``.
"""
import importlib
import inspect
import pkgutil
import textwrap
import types

import bst.torch.ao

CONSTRUCTORS = ("__init__", "__new__")


def _is_public(name: str) -> bool:
    return not name.startswith("_") or name in CONSTRUCTORS


def _missing(fn, label: str, is_method: bool) -> list[str]:
    """'label: param' for every unannotated parameter, 'label: return' for a missing return annotation."""
    fn = inspect.unwrap(fn)  # contextmanager, torch.no_grad, functools.wraps
    sig = inspect.signature(fn, follow_wrapped=False)
    params = list(sig.parameters.values())
    if is_method and params:
        params = params[1:]  # self / cls
    out = [f"{label}: parameter {p.name!r}" for p in params
           if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.annotation is p.empty]
    if sig.return_annotation is sig.empty:
        out.append(f"{label}: return")
    return out


def _class_members(cls: type, root: str) -> list[tuple[str, object, bool]]:
    """(qualified label, function, is_method) for what `cls` exposes, as its MRO resolves each name, keeping
    the names whose defining class belongs to `root` (so overrides win and torch's methods are skipped)."""
    seen, out = set(), []
    for klass in cls.__mro__:
        for name, attr in vars(klass).items():
            if name in seen:
                continue
            seen.add(name)
            if not _is_public(name) or not klass.__module__.startswith(root):
                continue
            label = f"{klass.__module__}.{klass.__qualname__}.{name}"
            if isinstance(attr, staticmethod):  # __new__ is one implicitly, and takes cls
                out.append((label, attr.__func__, name == "__new__"))
            elif isinstance(attr, classmethod):
                out.append((label, attr.__func__, True))
            elif isinstance(attr, property):
                for part, fn in (("getter", attr.fget), ("setter", attr.fset), ("deleter", attr.fdel)):
                    if fn is not None:
                        out.append((f"{label} ({part})", fn, True))
            elif inspect.isfunction(attr) or inspect.isfunction(inspect.unwrap(attr)):
                out.append((label, attr, True))
    return out


def unannotated(module: types.ModuleType, root: str) -> list[str]:
    """Every missing annotation in `module`'s public API (functions and classes defined in it)."""
    out = []
    for name, obj in vars(module).items():
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or imported from elsewhere (checked where it is defined)
        if inspect.isclass(obj):
            for label, fn, is_method in _class_members(obj, root):
                out += _missing(fn, label, is_method)
        elif inspect.isfunction(inspect.unwrap(obj)):
            out += _missing(obj, f"{module.__name__}.{name}", False)
    return out


def _bst_modules() -> list[types.ModuleType]:
    names = [bst.torch.ao.__name__] + [m.name for m in pkgutil.walk_packages(bst.torch.ao.__path__, "bst.torch.ao.")]
    return [importlib.import_module(n) for n in sorted(names)]


def test_checker_reports_unannotated_code():
    source = textwrap.dedent('''
        from contextlib import contextmanager

        import torch
        import torch.nn as nn


        def typed(x: int, *args, **kwargs) -> int:
            return x

        def untyped(x, y: int):
            return x

        def no_return(x: int):
            return x

        def _private(x):
            return x

        @contextmanager
        def wrapped(x):
            yield x

        class _Base(nn.Module):
            def inherited(self, x):
                return x

        class Public(_Base):
            def __init__(self, a) -> None:
                super().__init__()

            @torch.no_grad()
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                return x

            @property
            def size(self):
                return 1

            @classmethod
            def make(cls, a):
                return cls(a)

            @staticmethod
            def helper(a) -> int:
                return a

            def _private(self, x):
                return x

        class _Hidden:
            def method(self, x):
                return x
        ''')
    module = types.ModuleType("bst_selfcheck")
    exec(compile(source, "<selfcheck>", "exec"), module.__dict__)
    found = unannotated(module, "bst_selfcheck")
    assert sorted(found) == sorted([
        "bst_selfcheck.untyped: parameter 'x'",
        "bst_selfcheck.untyped: return",
        "bst_selfcheck.no_return: return",
        "bst_selfcheck.wrapped: parameter 'x'",
        "bst_selfcheck.wrapped: return",
        "bst_selfcheck._Base.inherited: parameter 'x'",
        "bst_selfcheck._Base.inherited: return",
        "bst_selfcheck.Public.__init__: parameter 'a'",
        "bst_selfcheck.Public.size (getter): return",
        "bst_selfcheck.Public.make: parameter 'a'",
        "bst_selfcheck.Public.make: return",
        "bst_selfcheck.Public.helper: parameter 'a'",
    ]), found  # nn.Module's own methods (train, to, ...) are not reported


def test_public_api_is_annotated():
    modules = _bst_modules()
    assert len(modules) > 20  # the walk found the library
    missing = sorted({m for module in modules for m in unannotated(module, "bst.")})
    assert not missing, f"{len(missing)} missing annotations in bst's public API:\n" + "\n".join(missing)
