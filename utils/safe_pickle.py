"""A pickle reader for checkpoint files that are data, not code: objects are rebuilt the way torch pickles them.

`torch.save` pickles a module by allocating its class (NEWOBJ, or `copyreg._reconstructor` in older protocols) and
then setting its `__dict__` (BUILD); tensors come back through torch's storage records and `_rebuild_tensor_v2`.
That is all a checkpoint ever needs, so this reader allows exactly that:

  * a global name resolves only through the caller's allowlist (`allowed`: "module.Name" -> object, aliases
    included); nothing is imported on the file's behalf;
  * an allowlisted class is allocated, never called: a file cannot construct a layer with arguments of its own
    (`Linear(32768, 32768)` would allocate gigabytes before anything could be checked);
  * REDUCE calls only the plain-data reconstructors of `RECONSTRUCTORS`, each with its arguments checked (a tensor
    view of a storage record, an OrderedDict, a set, numpy's array and scalar headers, ...), and their output in
    elements is bounded by the size of the pickle;
  * BUILD sets the state of an instance this file allocated, once, from a dict of plain attribute names (never a
    dunder such as `__setstate__`); numpy arrays and dtypes get their own checked state;
  * a persistent id must be torch's storage id.

Anything else raises `pickle.UnpicklingError` with a short reason; the caller turns it into one line for the user.
`pickle_module(allowed)` gives what `torch.load(pickle_module=...)` expects.
"""
from __future__ import annotations

import _compat_pickle
import collections
import pickle
import types

import numpy as np
import torch

_OPS = {name: getattr(pickle, name)[0] for name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX", "BUILD", "INST", "OBJ",
                                                     "BINPERSID", "PERSID", "EXT1", "EXT2", "EXT4")}
ELEMENTS_PER_BYTE = 8  # reconstructors may produce at most this many elements per byte of pickle (plus a floor)


def _refuse(why: str):
    raise pickle.UnpicklingError(why)


def _check(cond, why: str):
    if not cond:
        _refuse(why)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _ints(seq, name: str):
    _check(isinstance(seq, (tuple, list, torch.Size)) and all(_is_int(v) for v in seq),
           f"{name} must be a tuple of integers")
    return tuple(seq)


def _no_hooks(hooks, what: str):
    _check(hooks is None or isinstance(hooks, collections.OrderedDict) and not hooks,
           f"{what} carries backward hooks (a checkpoint stores none)")


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    _check(isinstance(storage, torch.storage.TypedStorage), "a tensor must view a storage record of the file")
    _check(_is_int(offset) and offset >= 0, "tensor offset must be a non-negative integer")
    _ints(size, "tensor size"), _ints(stride, "tensor stride")
    _check(isinstance(requires_grad, bool), "requires_grad must be true or false")
    _no_hooks(hooks, "a tensor")
    _check(metadata is None or isinstance(metadata, dict) and all(isinstance(v, bool) for v in metadata.values()),
           "tensor metadata must be flags")
    return torch._utils._rebuild_tensor_v2(storage, offset, tuple(size), tuple(stride), requires_grad,
                                           collections.OrderedDict(), metadata)


def _rebuild_parameter(data, requires_grad, hooks):
    _check(isinstance(data, torch.Tensor) and type(data) is torch.Tensor, "a parameter must wrap a plain tensor")
    _check(isinstance(requires_grad, bool), "requires_grad must be true or false")
    _no_hooks(hooks, "a parameter")
    return torch.nn.Parameter(data, requires_grad)


def _ordered_dict(*args):
    _check(len(args) == 0 or len(args) == 1 and isinstance(args[0], (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 2 for p in args[0]), "OrderedDict takes a list of pairs")
    return collections.OrderedDict(*args)


def _collection(kind):
    def make(*args):
        _check(len(args) == 0 or len(args) == 1 and isinstance(args[0], (list, tuple, set, frozenset)),
               f"{kind.__name__} takes one list")
        return kind(*args)
    return make


def _slice(*args):
    _check(1 <= len(args) <= 3 and all(a is None or _is_int(a) for a in args), "slice takes up to 3 integers")
    return slice(*args)


def _size(dims):
    return torch.Size(_ints(dims, "torch.Size"))


def _device(kind, index=None):
    _check(isinstance(kind, str) and len(kind) < 32 and (index is None or _is_int(index)), "device takes a name")
    return torch.device(kind) if index is None else torch.device(kind, index)


def _np_reconstruct(cls, shape, typecode):
    # numpy pickles an array as an empty header (_reconstruct(ndarray, (0,), b'b')) and its data in BUILD's state
    _check(cls is np.ndarray and tuple(shape) == (0,) and isinstance(typecode, (bytes, str)) and len(typecode) == 1,
           "a numpy array header must be empty (its data comes with its state)")
    return np.ndarray.__new__(np.ndarray, (0,), np.uint8)


def _np_scalar(dtype, data=None):
    _check(isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(data, bytes)
           and len(data) == dtype.itemsize, "a numpy scalar needs a numeric dtype and its bytes")
    return np.frombuffer(data, dtype=dtype)[0]


def _np_dtype(code, align=False, copy=False):
    _check(isinstance(code, str) and len(code) <= 8 and isinstance(align, bool) and isinstance(copy, bool),
           "a numpy dtype is named by a short type code")
    dtype = np.dtype(code)
    _check(not dtype.hasobject, "numpy object arrays are not data")
    return dtype


def _latin1_bytes(text, encoding="latin1"):
    # protocol 2 spells a bytes object as _codecs.encode(text, 'latin1')
    _check(isinstance(text, str) and encoding in ("latin1", "latin-1"), "_codecs.encode only rebuilds latin1 bytes")
    return text.encode("latin1")


def _multiarray_names(name):
    return [f"numpy.core.multiarray.{name}", f"numpy._core.multiarray.{name}"]


RECONSTRUCTORS = {  # global name -> checked stand-in; REDUCE may call nothing else
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "collections.OrderedDict": _ordered_dict,
    "builtins.set": _collection(set),
    "builtins.frozenset": _collection(frozenset),
    "builtins.tuple": _collection(tuple),
    "builtins.list": _collection(list),
    "builtins.slice": _slice,
    "_codecs.encode": _latin1_bytes,
    "torch.Size": _size,
    "torch.device": _device,
    "numpy.dtype": _np_dtype,
    **{n: _np_reconstruct for n in _multiarray_names("_reconstruct")},
    **{n: _np_scalar for n in _multiarray_names("scalar")},
}
_ALLOCATE = "copyreg._reconstructor"  # protocol 0/1 spelling of "allocate this class": (cls, object, None)
VALUES = {  # globals a checkpoint may name as values (never called)
    "builtins.object": object,  # the base argument of copyreg._reconstructor
    "numpy.ndarray": np.ndarray,
    **{f"torch.{n}": getattr(torch, n) for n in dir(torch) if isinstance(getattr(torch, n, None), torch.dtype)},
    **{f"torch.{n}": getattr(torch, n) for n in ("per_tensor_affine", "per_channel_affine", "per_tensor_symmetric",
                                                  "per_channel_symmetric")},
}


class _Reconstructor:
    """What find_class returns for a reconstructor name: REDUCE calls it, nothing else can."""

    def __init__(self, name, fn):
        self.name, self.fn = name, fn


class RestrictedUnpickler(pickle._Unpickler):
    """pickle's reader with the rules of the module docstring. `allowed`: "module.Name" -> class or value."""

    allowed: dict = {}
    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file, *args, **kwargs):
        super().__init__(file, *args, **kwargs)
        try:
            size = len(file.getbuffer())
        except AttributeError:
            size = 1 << 20
        self._budget = ELEMENTS_PER_BYTE * size + 4096
        self._built = set()
        self._allocated = set()

    def find_class(self, module, name):
        if self.proto < 3 and self.fix_imports:  # protocol 2 files spell builtins as __builtin__
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        key = f"{module}.{name}"
        if key in self.allowed:
            return self.allowed[key]
        if key in RECONSTRUCTORS:
            return _Reconstructor(key, RECONSTRUCTORS[key])
        if key in VALUES:
            return VALUES[key]
        if key == _ALLOCATE:
            return _Reconstructor(key, None)
        _refuse(f"it names {key}, which is not on the checkpoint allowlist")

    def _classes(self):
        return {v for v in self.allowed.values() if isinstance(v, type)}

    def _allocate(self, cls, args, how):
        _check(isinstance(cls, type) and cls in self._classes(),
               f"{how} of {getattr(cls, '__name__', type(cls).__name__)}, which is not an allowlisted class")
        _check(not args, f"{how} of {cls.__name__} with arguments (a checkpoint allocates classes, never constructs "
                         f"them)")
        obj = object.__new__(cls)
        self._allocated.add(id(obj))
        return obj

    def load_reduce(self):
        args = self.stack.pop()
        func = self.stack[-1]
        _check(isinstance(args, tuple), "REDUCE arguments must be a tuple")
        if isinstance(func, type):
            _refuse(f"it calls {func.__module__}.{func.__qualname__}(...): a checkpoint never constructs a class, "
                    f"torch allocates modules and sets their state")
        _check(isinstance(func, _Reconstructor), f"it calls {func!r}, which is not a data reconstructor")
        if func.name == _ALLOCATE:
            _check(len(args) == 3 and args[1] is object and args[2] is None, "copyreg._reconstructor with state")
            self.stack[-1] = self._allocate(args[0], (), "allocation")
            return
        self._budget -= sum(len(a) if isinstance(a, (list, tuple, set, frozenset, bytes, str)) else 1 for a in args)
        _check(self._budget >= 0, "its reconstructors produce far more data than the file holds")
        self.stack[-1] = func.fn(*args)

    def load_newobj(self):
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._allocate(cls, args, "NEWOBJ"))

    def load_newobj_ex(self):
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self.stack.pop()
        self.append(self._allocate(cls, tuple(args) + tuple(kwargs or ()), "NEWOBJ_EX"))

    def load_build(self):
        state = self.stack.pop()
        inst = self.stack[-1]
        if isinstance(inst, np.ndarray):
            return _build_array(inst, state)
        if isinstance(inst, np.dtype):
            _check(isinstance(state, tuple) and len(state) <= 9 and all(
                s is None or isinstance(s, (int, str, bytes)) for s in state), "numpy dtype state must be plain")
            return inst.__setstate__(state)
        _check(id(inst) in self._allocated or type(inst) is collections.OrderedDict,  # a state_dict's _metadata
               f"BUILD of a {type(inst).__name__} the file did not allocate")
        _check(id(inst) not in self._built, f"a second BUILD of a {type(inst).__name__}")
        self._built.add(id(inst))
        _check(isinstance(state, dict) and all(isinstance(k, str) and not k.startswith("__") for k in state),
               f"the state of a {type(inst).__name__} must be a dict of attribute names")
        setstate = getattr(type(inst), "__setstate__", None)  # nn.Module's merges the dict and fills new defaults
        if setstate is not None:
            setstate(inst, state)
        else:
            inst.__dict__.update(state)

    def load_binpersid(self):
        pid = self.stack.pop()
        _check_storage_id(pid)
        self.append(self.persistent_load(pid))

    def _refuse_opcode(self):
        _refuse("it uses a pickle opcode a checkpoint never needs (INST, OBJ, EXT or a text persistent id)")

    dispatch[_OPS["REDUCE"]] = load_reduce
    dispatch[_OPS["NEWOBJ"]] = load_newobj
    dispatch[_OPS["NEWOBJ_EX"]] = load_newobj_ex
    dispatch[_OPS["BUILD"]] = load_build
    dispatch[_OPS["BINPERSID"]] = load_binpersid
    for _name in ("INST", "OBJ", "PERSID", "EXT1", "EXT2", "EXT4"):
        dispatch[_OPS[_name]] = _refuse_opcode


def _check_storage_id(pid):
    _check(isinstance(pid, tuple) and len(pid) == 5 and pid[0] in ("storage", b"storage"),
           "a persistent id must be torch's ('storage', type, key, location, numel)")
    _, kind, key, location, numel = pid
    _check(isinstance(kind, torch.serialization.StorageType) or kind is torch.UntypedStorage,
           "a storage id must name a storage type")
    _check(isinstance(key, str) and key.isalnum() and isinstance(location, str) and len(location) < 32,
           "a storage id must name a record and a device")
    _check(_is_int(numel) and numel >= 0, "a storage size must be a non-negative integer")


def _build_array(inst, state):
    _check(isinstance(state, tuple) and len(state) == 5, "a numpy array's state is (version, shape, dtype, fortran, "
                                                         "data)")
    version, shape, dtype, fortran, data = state
    _ints(shape, "numpy array shape")
    _check(isinstance(dtype, np.dtype) and not dtype.hasobject and isinstance(fortran, bool), "numpy array dtype")
    n = int(np.prod(shape, dtype=np.int64)) if len(shape) else 1
    _check(all(s >= 0 for s in shape) and isinstance(data, bytes) and len(data) == n * dtype.itemsize,
           "numpy array data does not match its shape")
    inst.__setstate__(state)


def pickle_module(allowed: dict) -> types.SimpleNamespace:
    """What torch.load(pickle_module=...) needs: an Unpickler class bound to `allowed` and `load`."""
    unpickler = type("CheckpointUnpickler", (RestrictedUnpickler,), {"allowed": dict(allowed)})

    def load(file, **kwargs):
        return unpickler(file, **kwargs).load()

    return types.SimpleNamespace(__name__="safe_pickle", Unpickler=unpickler, load=load)


def object_name(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', obj))}"


__all__ = ["RestrictedUnpickler", "RECONSTRUCTORS", "VALUES", "pickle_module", "object_name"]
