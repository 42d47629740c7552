"""Loading and saving checkpoint files safely (what a checkpoint holds is models/checkpoint.py's business).

Loading: a YOLOv5 checkpoint pickles whole modules, and unpickling can run arbitrary code. `safe_load` reads the
file as data (utils/safe_pickle.py): only the classes of an allowlist given by the caller, allocated and given their
state as torch pickles them, never constructed or called by the file. A file that needs anything else is refused in
one line naming what it asked for. To load a file you trust anyway, pass `trust=True` or set the environment variable
YOLOV5_TRUST_CHECKPOINTS=1.

Saving: written to a temporary file in the same folder and renamed over the target, so a kill during
a save never leaves a truncated checkpoint.
"""
from __future__ import annotations

import os
import pickle
import socket
import tempfile
from pathlib import Path

import torch

from utils.general import LOGGER, ROOT, UserError
from utils.safe_pickle import object_name, pickle_module

TRUST_ENV = "YOLOV5_TRUST_CHECKPOINTS"
RELEASE_URL = "https://github.com/ultralytics/yolov5/releases/download/v7.0/{}"
RELEASE_ASSETS = {f"yolov5{s}{r}.pt" for s in "nsmlx" for r in ("", "6", "-cls", "-seg")}

def attempt_download(file) -> Path:
    """Return the path of a weights file; fetch a missing official release file, else say where to get it."""
    file = Path(str(file).strip().replace("'", ""))
    if file.is_file():
        return file
    for cand in (ROOT / file, ROOT / "weights" / file.name):
        if cand.is_file():
            return cand
    if file.name in RELEASE_ASSETS:
        url = RELEASE_URL.format(file.name)
        dest = file if file.parent != Path(".") else ROOT / "weights" / file.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        LOGGER.info(f"Downloading {url} to {dest}...")
        old = socket.getdefaulttimeout()
        try:
            socket.setdefaulttimeout(20)
            tmp = dest.with_suffix(".part")
            torch.hub.download_url_to_file(url, str(tmp), progress=False)
            os.replace(tmp, dest)
            return dest
        except Exception as e:  # no network, HTTP error, ...
            raise UserError(f"{file}: weights not found and the download from {url} failed ({type(e).__name__}); "
                            f"download it by hand and put it in {ROOT / 'weights'}") from None
        finally:
            socket.setdefaulttimeout(old)
    raise UserError(f"{file}: weights file not found; give the path of a .pt checkpoint "
                    f"(official release files go in {ROOT / 'weights'}, e.g. weights/yolov5s.pt)")


def _trusted(trust) -> bool:
    return bool(trust) or os.getenv(TRUST_ENV, "").lower() in ("1", "true", "yes")


def safe_load(path, allowed, map_location="cpu", trust=False):
    """Load a torch.save checkpoint as data (utils/safe_pickle.py): only the classes and values of `allowed`
    ("module.Name" -> object, or a list of objects) may appear, and classes are allocated, never called. Everything
    is unpickled when trusted. Any problem with the file is one UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with open(path, "rb") as f:
        head = f.read(4)
    if not head.startswith(b"PK\x03\x04") and head[:1] != b"\x80":  # torch's zip format, or its legacy pickle
        raise UserError(f"{path}: not a PyTorch checkpoint (neither torch.save's zip archive nor its legacy format); "
                        f"give a .pt file written by train.py or torch.save")
    if _trusted(trust):
        try:
            return _torch_load(path, map_location, None)
        except pickle.UnpicklingError as e:  # a trusted file is unpickled whole, but damage is still one line
            raise UserError(_corrupt(path, _first_line(e, "unreadable pickle"))) from None
    if not head.startswith(b"PK\x03\x04"):
        raise UserError(f"{path}: written in torch's legacy (pre-1.6) format, which is read only from trusted files; "
                        f"set {TRUST_ENV}=1 if you trust it, or torch.save it again with a current torch")
    if not isinstance(allowed, dict):
        allowed = {object_name(o): o for o in allowed}
    try:
        return _torch_load(path, map_location, pickle_module(allowed))
    except pickle.UnpicklingError as e:
        why = _first_line(e, "unreadable pickle")
        if why.startswith("it "):  # a rule of the safe reader, not damage
            raise UserError(f"{path}: refused to load, {why}; a YOLOv5 checkpoint holds only layers and tensors "
                            f"(if you trust this file, set {TRUST_ENV}=1)") from None
        raise UserError(_corrupt(path, why)) from None


def _first_line(e, default="") -> str:
    return (str(e).splitlines() or [""])[0][:200] or default


def _corrupt(path, why) -> str:
    """The one line for a file that is damaged or no checkpoint at all: which file, what failed, what to give."""
    return (f"{path}: corrupt or not a PyTorch checkpoint ({why}); give a .pt file written by train.py or torch.save "
            f"(a copy damaged in transfer: copy or download it again)")


def _torch_load(path, map_location, module):
    kwargs = {"weights_only": False} if module is None else {"weights_only": False, "pickle_module": module}
    try:
        return torch.load(path, map_location=map_location, **kwargs)
    except pickle.UnpicklingError:
        raise
    except MemoryError:
        raise UserError(f"{path}: corrupt checkpoint (it asks for more memory than this machine has)") from None
    except Exception as e:  # a damaged file fails in many ways inside torch and pickle: one line for all of them
        kind = type(e).__name__ if type(e).__module__ == "builtins" else f"{type(e).__module__}.{type(e).__name__}"
        raise UserError(_corrupt(path, f"{kind}: {_first_line(e, kind)[:120]}")) from None


def _umask() -> int:
    """The process umask, read without changing it where Linux shows it (os.umask sets it, racing other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_save(obj, path):
    """torch.save to a temporary file beside `path`, fsync, then atomically rename over `path`."""
    path = Path(path)
    check_checkpoint_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise UserError(f"{path}: cannot write the checkpoint ({e.strerror or e})") from None
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            torch.save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint gets the mode of every other run file
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # disk full, a folder in the way...: the previous file, if any, is untouched
        _unlink_quietly(tmp)
        if isinstance(e, RuntimeError):  # torch's zip writer reports a failed write as "enforce fail ...": a write
            if writer is None or writer.error is None:  # error underneath is the user's; anything else is a bug
                raise
            e = writer.error
        kept = "; the previous one is kept" if path.is_file() else ""
        raise UserError(f"{path}: cannot write the checkpoint ({e.strerror or e}){kept}; free space there or "
                        f"write somewhere else") from None
    except BaseException:
        _unlink_quietly(tmp)
        raise
    return path


class _Writer:
    """A file for torch.save that remembers the OSError of a failed write: torch turns it into a RuntimeError that
    no longer says why (a full disk reads "enforce fail at inline_container.cc ... unexpected pos")."""

    def __init__(self, f):
        self.f, self.error = f, None

    def write(self, data):
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self):
        self.f.flush()

    def fileno(self):
        return self.f.fileno()


def check_checkpoint_path(path):
    """A folder where a checkpoint file is to be written is a UserError (train.py checks before the first epoch)."""
    if Path(path).is_dir():
        raise UserError(f"{path}: is a folder, but a checkpoint file is written there; remove or rename it")


def _unlink_quietly(tmp):
    try:
        os.unlink(tmp)
    except OSError:
        pass
