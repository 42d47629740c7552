"""Small shared helpers: logging, user errors, paths, yaml, and (below) box geometry and NMS.

Kept deliberately small: anything with a concern of its own lives in its own module.
"""
from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl  # POSIX; elsewhere run folders are not locked
except ImportError:
    fcntl = None

import subprocess

import numpy as np
import torch
import torchvision
import yaml

ROOT = Path(__file__).resolve().parents[1]  # repository root
LOGGER = logging.getLogger("yolov5")
# this process's place in a torchrun (DDP) run, read once here; -1 / 1 outside DDP
RANK = int(os.getenv("RANK", -1))
LOCAL_RANK = int(os.getenv("LOCAL_RANK", -1))
WORLD_SIZE = int(os.getenv("WORLD_SIZE", 1))


def shown(text) -> str:
    """`text` as it can be printed, logged or drawn: a file name that is not valid UTF-8 (Python keeps its bytes as
    surrogate escapes, '\udcff') shows those bytes escaped ('\xff'); everything else is unchanged."""
    text = str(text)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file name produces
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


class _ShownFilter(logging.Filter):
    """Every record of the project's logger with file names that are not UTF-8 shown escaped, for every handler
    (printing such a name fails, and so does sending it to another process, as pytest-xdist does with logs)."""

    def filter(self, record):
        msg = record.getMessage()
        safe = shown(msg)
        if safe != msg:
            record.msg, record.args = safe, ()
        return True


class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is when a record is logged (a redirect_stdout, a capture), not to the stream
    that was current at import."""

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


if not LOGGER.handlers:
    _h = _StdoutHandler()
    _h.setFormatter(logging.Formatter("%(message)s"))
    LOGGER.addHandler(_h)
    LOGGER.setLevel(logging.INFO if RANK in (-1, 0) else logging.WARNING)
    LOGGER.propagate = False
if not any(isinstance(f, _ShownFilter) for f in LOGGER.filters):
    LOGGER.addFilter(_ShownFilter())


class UserError(Exception):
    """An error the user caused and can fix (bad path, bad yaml, bad flag). CLIs print it as one line."""


def run_cli(main, *args, **kwargs):
    """Run a CLI entry point; a UserError ends in one clear line on stderr and exit status 2."""
    try:
        return main(*args, **kwargs)
    except UserError as e:
        print(f"ERROR: {shown(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("Interrupted.", file=sys.stderr)
        raise SystemExit(130) from None


_COLORS = {
    "black": "\033[30m", "red": "\033[31m", "green": "\033[32m", "yellow": "\033[33m", "blue": "\033[34m",
    "magenta": "\033[35m", "cyan": "\033[36m", "white": "\033[37m", "bold": "\033[1m", "underline": "\033[4m",
    "end": "\033[0m",
}


def colorstr(*args):
    """colorstr('blue', 'bold', 'text') -> text wrapped in ANSI codes (plain when NO_COLOR is set)."""
    *styles, text = args if len(args) > 1 else ("blue", "bold", args[0])
    if os.getenv("NO_COLOR"):
        return str(text)
    return "".join(_COLORS[s] for s in styles) + f"{text}" + _COLORS["end"]


def increment_path(path, exist_ok=False, sep="", mkdir=False):
    """runs/train/exp -> runs/train/exp2, exp3, ... unless exist_ok."""
    path = Path(path)
    if path.exists() and not exist_ok:
        path, suffix = (path.with_suffix(""), path.suffix) if path.is_file() else (path, "")
        n = 2
        while Path(f"{path}{sep}{n}{suffix}").exists():
            n += 1
        path = Path(f"{path}{sep}{n}{suffix}")
    if mkdir:
        path.mkdir(parents=True, exist_ok=True)
    return path


def git_info(path=ROOT) -> dict | None:
    """{'remote', 'branch', 'commit'} of the git checkout at `path` (what upstream records in checkpoints), or None
    outside a checkout or without git."""
    def git(*args):
        r = subprocess.run(["git", "-C", str(path), *args], capture_output=True, text=True, timeout=10)
        return r.stdout.strip() if r.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
        if not commit:
            return None
        return {"remote": git("config", "--get", "remote.origin.url"),
                "branch": git("rev-parse", "--abbrev-ref", "HEAD"), "commit": commit}
    except (OSError, subprocess.SubprocessError):
        return None


def has_display() -> bool:
    """False on Linux without an X11 or Wayland display (a server, a container): no window can open there."""
    return not sys.platform.startswith("linux") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def make_run_folder(folder) -> Path:
    """Create a run folder (and parents) and make sure files can be written in it, before any work is done; a
    folder that cannot be created or written is one UserError naming it."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as e:
        raise UserError(f"{folder}: cannot write the run folder ({e.strerror or e}); choose a writable --project") \
            from None
    return folder


@contextmanager
def claim_run_folder(folder):
    """``with claim_run_folder(save_dir):`` one training run per run folder. Creates the folder, takes an exclusive
    lock on its ``.lock`` file (released when the run ends, also when it is killed) and then removes the temporary
    files that killed saves left behind (``weights/.*.tmp``, ``*.tmp``): while the lock is held no other run can be
    writing them. A folder that another live run holds, or that cannot be written, is one UserError."""
    folder = make_run_folder(folder)
    try:
        f = open(folder / ".lock", "a+")
    except OSError as e:
        raise UserError(f"{folder}: cannot write the run folder ({e.strerror}); choose a writable --project") from None
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                pid = f.read().strip() or "?"
                raise UserError(f"{folder}: another training run (pid {pid}) is using this run folder; wait for it to "
                                f"finish, or give this run another --name") from None
        f.seek(0)
        f.truncate()
        f.write(f"{os.getpid()}\n")
        f.flush()
        for orphan in [*(folder / "weights").glob(".*.tmp"), *folder.glob("*.tmp")]:
            orphan.unlink(missing_ok=True)
        yield folder
    finally:
        f.close()  # closing the file releases the lock


def make_divisible(x, divisor):
    """Smallest multiple of divisor that is >= x."""
    divisor = int(divisor.max()) if hasattr(divisor, "max") else int(divisor)
    return math.ceil(x / divisor) * divisor


MAX_IMGSZ = 8192  # --imgsz above this is refused: one 3-channel image of 8192 x 8192 already takes 200 MB


def check_imgsz_flag(sizes, flag="--imgsz"):
    """--imgsz given as one size or (height, width): each a whole number from 1 to MAX_IMGSZ, checked before any work
    (a larger one fails deep in OpenCV with an allocation error, or exhausts memory). UserError otherwise."""
    sizes = [sizes] if isinstance(sizes, int) else list(sizes)
    given = " ".join(map(str, sizes[:1] if len(set(sizes)) == 1 else sizes))
    if not 1 <= len(sizes) <= 2 or not all(isinstance(v, int) and v >= 1 for v in sizes):
        raise UserError(f"{flag} {given}: give one size or height and width, each >= 1")
    if max(sizes) > MAX_IMGSZ:
        h, w = (sizes * 2)[:2]
        raise UserError(f"{flag} {given}: each size must be at most {MAX_IMGSZ} pixels (a {h}x{w} image takes "
                        f"{3 * h * w / 1e9:.1f} GB before the model sees it; YOLOv5 models are trained at 320-1280)")


def check_img_size(imgsz, s=32, floor=0):
    """Round image size(s) up to a multiple of stride s, warning when it changes."""
    if isinstance(imgsz, int):
        new = max(make_divisible(imgsz, s), floor)
    else:
        imgsz = list(imgsz)
        new = [max(make_divisible(x, s), floor) for x in imgsz]
    if new != imgsz:
        LOGGER.warning(f"WARNING: --img-size {imgsz} must be a multiple of max stride {s}, updating to {new}")
    return new


def yaml_load(file):
    """Load a yaml file; a missing or malformed file is a UserError naming it."""
    file = Path(file)
    if not file.is_file():
        raise UserError(f"{file}: file not found")
    try:
        with open(file, errors="ignore") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise UserError(f"{file}: not valid YAML ({str(e).splitlines()[0]})") from None
    return data if data is not None else {}


def yaml_save(file, data):
    with open(file, "w") as f:
        yaml.safe_dump({k: str(v) if isinstance(v, Path) else v for k, v in data.items()}, f, sort_keys=False)


def check_file(file, search_dirs=("data", "models", "data/hyps", "data/quant")):
    """Resolve a user-given file: as given, else relative to the repo root or its data/models folders."""
    file = str(file)
    if not file or Path(file).is_file():
        return file
    for d in ("",) + tuple(search_dirs):
        cand = ROOT / d / file
        if cand.is_file():
            return str(cand)
    raise UserError(f"{file}: file not found (looked here and under {', '.join(search_dirs)})")


def print_args(args: dict, name=""):
    LOGGER.info(colorstr(f"{name}: " if name else "") + ", ".join(f"{k}={v}" for k, v in args.items()))


# ---------------------------------------------------------------------------------------------------------------------
# Box geometry. Every helper takes a torch tensor or a numpy array of shape (..., 4) (extra trailing columns of the
# converters are not touched) and returns a new object of the same kind; clip_boxes and scale_boxes work in place.
# xyxy = corners (x1, y1, x2, y2); xywh = centre and size; a trailing n means normalised to [0, 1] by image w, h.
# ---------------------------------------------------------------------------------------------------------------------


def _copy(x):
    return x.clone() if isinstance(x, torch.Tensor) else np.copy(x)


def xyxy2xywh(x):
    """Corners (x1, y1, x2, y2) -> centre and size (x, y, w, h)."""
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / 2
    y[..., 1] = (x[..., 1] + x[..., 3]) / 2
    y[..., 2] = x[..., 2] - x[..., 0]
    y[..., 3] = x[..., 3] - x[..., 1]
    return y


def xywh2xyxy(x):
    """Centre and size (x, y, w, h) -> corners (x1, y1, x2, y2)."""
    y = _copy(x)
    half_w, half_h = x[..., 2] / 2, x[..., 3] / 2
    y[..., 0] = x[..., 0] - half_w
    y[..., 1] = x[..., 1] - half_h
    y[..., 2] = x[..., 0] + half_w
    y[..., 3] = x[..., 1] + half_h
    return y


def xywhn2xyxy(x, w=640, h=640, padw=0, padh=0):
    """Normalised (x, y, w, h) -> pixel corners in an image of size w x h placed at offset (padw, padh)."""
    y = _copy(x)
    half_w, half_h = x[..., 2] / 2, x[..., 3] / 2
    y[..., 0] = w * (x[..., 0] - half_w) + padw
    y[..., 1] = h * (x[..., 1] - half_h) + padh
    y[..., 2] = w * (x[..., 0] + half_w) + padw
    y[..., 3] = h * (x[..., 1] + half_h) + padh
    return y


def xyxy2xywhn(x, w=640, h=640, clip=False, eps=0.0):
    """Pixel corners -> normalised (x, y, w, h). clip=True first clips x in place to the image (minus eps)."""
    if clip:
        clip_boxes(x, (h - eps, w - eps))
    y = _copy(x)
    y[..., 0] = (x[..., 0] + x[..., 2]) / (2 * w)
    y[..., 1] = (x[..., 1] + x[..., 3]) / (2 * h)
    y[..., 2] = (x[..., 2] - x[..., 0]) / w
    y[..., 3] = (x[..., 3] - x[..., 1]) / h
    return y


def xyn2xy(x, w=640, h=640, padw=0, padh=0):
    """Normalised points (..., 2) -> pixel points in an image of size w x h placed at offset (padw, padh)."""
    y = _copy(x)
    y[..., 0] = w * x[..., 0] + padw
    y[..., 1] = h * x[..., 1] + padh
    return y


def clip_boxes(boxes, shape):
    """Clip xyxy boxes in place to an image of shape (h, w, ...)."""
    h, w = shape[0], shape[1]
    if isinstance(boxes, torch.Tensor):
        boxes[..., 0].clamp_(0, w)
        boxes[..., 1].clamp_(0, h)
        boxes[..., 2].clamp_(0, w)
        boxes[..., 3].clamp_(0, h)
    else:
        boxes[..., [0, 2]] = boxes[..., [0, 2]].clip(0, w)
        boxes[..., [1, 3]] = boxes[..., [1, 3]].clip(0, h)
    return boxes


def scale_boxes(img1_shape, boxes, img0_shape, ratio_pad=None):
    """Map xyxy boxes from the letterboxed image (img1_shape: h, w) back to the original (img0_shape), in place.

    Without ratio_pad the letterbox gain and centred padding are recomputed from the two shapes;
    ratio_pad=((gain_h, gain_w), (pad_w, pad_h)) uses the ones the letterbox actually applied (only gain[0] is used,
    as the letterbox keeps the aspect ratio).
    """
    if ratio_pad is None:
        gain = min(img1_shape[0] / img0_shape[0], img1_shape[1] / img0_shape[1])
        pad_w = (img1_shape[1] - img0_shape[1] * gain) / 2
        pad_h = (img1_shape[0] - img0_shape[0] * gain) / 2
    else:
        gain = ratio_pad[0][0]
        pad_w, pad_h = ratio_pad[1][0], ratio_pad[1][1]
    boxes[..., 0] -= pad_w
    boxes[..., 2] -= pad_w
    boxes[..., 1] -= pad_h
    boxes[..., 3] -= pad_h
    boxes[..., :4] /= gain
    return clip_boxes(boxes, img0_shape)


# ---------------------------------------------------------------------------------------------------------------------
# Non-maximum suppression
# ---------------------------------------------------------------------------------------------------------------------

NMS_MAX_WH = 7680  # class offset for batched NMS: boxes of different classes never overlap once shifted by this
NMS_MAX_BOXES = 30000  # at most this many highest-confidence candidates per image go into torchvision.ops.nms


def non_max_suppression(prediction, conf_thres=0.25, iou_thres=0.45, classes=None, agnostic=False,
                        multi_label=False, labels=(), max_det=300, nm=0, time_limit=None):
    """Filter raw detections per image.

    prediction: (bs, N, 5 + nc + nm) rows [x, y, w, h, obj, nc class scores, nm mask coefficients], or a tuple/list
    whose first element is that tensor (the eval-mode model returns (pred, raw)).
    Returns a list of bs tensors (n, 6 + nm): [x1, y1, x2, y2, conf, cls, masks...], sorted by conf, conf = obj * cls.

    classes: keep only these class indices. agnostic: suppress across classes. multi_label: a box yields one row per
    class scoring above conf_thres (else only its best class). labels: per image, an (n, 5) tensor [cls, x, y, w, h]
    (pixels) of a-priori boxes added with confidence 1 (autolabelling, val.py --save-hybrid).
    """
    if not 0 <= conf_thres <= 1:
        raise ValueError(f"conf_thres={conf_thres}: must be in [0, 1]")
    if not 0 <= iou_thres <= 1:
        raise ValueError(f"iou_thres={iou_thres}: must be in [0, 1]")
    if isinstance(prediction, (list, tuple)):
        prediction = prediction[0]
    device = prediction.device
    if device.type == "mps":  # torchvision NMS is not implemented on MPS
        prediction = prediction.cpu()

    bs = prediction.shape[0]
    nc = prediction.shape[2] - nm - 5
    mask_start = 5 + nc
    multi_label = multi_label and nc > 1
    t_start = time.time()
    keep_class = None if classes is None else torch.as_tensor(classes, device=prediction.device).view(1, -1)

    output = [torch.zeros((0, 6 + nm), device=device)] * bs
    for bi, x in enumerate(prediction):
        x = x[x[:, 4] > conf_thres]  # objectness candidates

        if labels is not None and len(labels) > bi and len(labels[bi]):
            lb = torch.as_tensor(labels[bi], dtype=x.dtype, device=x.device)
            prior = torch.zeros((len(lb), 5 + nc + nm), dtype=x.dtype, device=x.device)
            prior[:, :4] = lb[:, 1:5]
            prior[:, 4] = 1.0
            prior[torch.arange(len(lb), device=x.device), lb[:, 0].long() + 5] = 1.0
            x = torch.cat((x, prior), 0)
        if not x.shape[0]:
            continue

        scores = x[:, 5:mask_start] * x[:, 4:5]  # conf = obj * cls
        box = xywh2xyxy(x[:, :4])
        masks = x[:, mask_start:]
        if multi_label:
            row, cls = (scores > conf_thres).nonzero(as_tuple=True)
            x = torch.cat((box[row], scores[row, cls, None], cls[:, None].to(x.dtype), masks[row]), 1)
        else:
            conf, cls = scores.max(1, keepdim=True)
            x = torch.cat((box, conf, cls.to(x.dtype), masks), 1)[conf.view(-1) > conf_thres]

        if keep_class is not None:
            x = x[(x[:, 5:6] == keep_class).any(1)]
        if not x.shape[0]:
            continue

        x = x[x[:, 4].argsort(descending=True)[:NMS_MAX_BOXES]]
        offset = 0 if agnostic else x[:, 5:6] * NMS_MAX_WH
        keep = torchvision.ops.nms((x[:, :4] + offset).float(), x[:, 4].float(), iou_thres)[:max_det]
        output[bi] = x[keep].to(device)

        if time_limit is not None and time.time() - t_start > time_limit and bi + 1 < bs:
            LOGGER.warning(f"WARNING: NMS time limit {time_limit:.3f}s exceeded after image {bi + 1} of {bs}: the "
                           f"detections of the other {bs - bi - 1} images of this batch were dropped")
            break
    return output


def coco80_to_coco91_class():
    """COCO category ids (1..90, 10 of them unused) of the 80 contiguous training classes: index i -> id."""
    unused = {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    return [i for i in range(1, 91) if i not in unused]


def intersect_dicts(da, db, exclude=()):
    """Entries of da whose key is in db with a value of the same shape, skipping keys containing any exclude string."""
    return {k: v for k, v in da.items()
            if k in db and not any(e in k for e in exclude) and v.shape == db[k].shape}
