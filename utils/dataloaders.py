"""Datasets and loaders: images for detect.py (LoadImages), images + labels for train/val (LoadImagesAndLabels).

Dataset layout as upstream YOLOv5: every image under an `images` folder has its label file at the same place
under the sibling `labels` folder, with a .txt suffix (img2label_paths). A label row is `cls xc yc w h`, normalised
to [0, 1]; a row `cls x1 y1 x2 y2 ...` (a polygon of at least 3 points) is read as its enclosing box.

Every image/label pair is verified once and the result cached in a `.cache` file beside the labels folder, keyed
by a hash of the file names, sizes and modification times. Bad data is never used and never fatal: the image is
left out with a warning naming the file and the reason, and counted in the scan summary.
"""
from __future__ import annotations

import glob
import hashlib
import math
import os
import random
import threading
import urllib.parse
import urllib.request
from contextlib import contextmanager
from multiprocessing.pool import ThreadPool
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler, distributed
from tqdm import tqdm

from utils.augmentations import PAD_VALUE, augment_hsv, letterbox, mixup, random_perspective
from utils.general import LOCAL_RANK, LOGGER, RANK, WORLD_SIZE, UserError, xywhn2xyxy, xyxy2xywhn
from utils.imageio import Cv2Paths, imread, is_utf8
from utils.torch_utils import torch_distributed_zero_first

IMG_FORMATS = ("bmp", "dng", "jpeg", "jpg", "mpo", "png", "tif", "tiff", "webp", "pfm")
VID_FORMATS = ("asf", "avi", "gif", "m4v", "mkv", "mov", "mp4", "mpeg", "mpg", "ts", "wmv")
NUM_THREADS = min(8, max(1, (os.cpu_count() or 1) - 1))
PIN_MEMORY = str(os.getenv("PIN_MEMORY", "true")).lower() == "true"
CACHE_VERSION = "yolov5-qat-1"  # bump when the cache content or the verification rules change
COORD_TOL = 1e-3  # normalised coordinates may exceed [0, 1] by this much (rounding); they are then clipped
HYP_KEYS = ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective", "flipud", "fliplr",
            "mosaic", "mixup")
ORIENTATION_TAG = 0x0112  # EXIF orientation; values 5-8 mean the stored image is rotated by 90 degrees


def _suffix(f):
    return os.path.splitext(str(f))[1][1:].lower()


def read_list(path) -> str | None:
    """The text of a list file (a .txt of image paths, a .streams file) with file names that are not UTF-8 kept as
    the OS has them (surrogate escapes, as os.listdir gives them); None for a binary file (a NUL byte, which no path
    holds)."""
    data = Path(path).read_bytes()
    if b"\x00" in data:
        return None
    return data.decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def img2label_paths(img_paths):
    """Label file of each image: the last `images` folder of its path becomes `labels`, the suffix `.txt`."""
    out = []
    for f in img_paths:
        parts = list(Path(f).parts)
        for i in range(len(parts) - 2, -1, -1):
            if parts[i] == "images":
                parts[i] = "labels"
                break
        out.append(str(Path(*parts).with_suffix(".txt")))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Inference input
# ----------------------------------------------------------------------------------------------------------------------

class LoadImages:
    """Images and videos for detect.py: a file, a folder, a glob, a .txt list of files, or a list of those.

    Iterating yields (path, im, im0, vid_cap, s): `im` letterboxed CHW RGB uint8 (contiguous), `im0` the original
    BGR image, `vid_cap` the cv2.VideoCapture of a video (else None), `s` a log prefix. Unreadable images are
    skipped with a warning.
    """

    def __init__(self, path, img_size=640, stride=32, auto=True, vid_stride=1):
        if isinstance(path, (str, Path)) and _suffix(path) == "txt":
            src = Path(path)
            if not src.is_file():
                raise UserError(f"{path}: file not found")
            text = read_list(src)
            if text is None:
                raise UserError(f"{path}: not a text file; a .txt list holds one image or video path per line")
            path = [ln.strip() for ln in text.splitlines() if ln.strip()]
        files = []
        for p in path if isinstance(path, (list, tuple)) else [path]:
            p = str(Path(p).expanduser().absolute())
            if any(c in p for c in "*?["):
                files.extend(sorted(glob.glob(p, recursive=True)))
            elif os.path.isdir(p):
                files.extend(sorted(glob.glob(os.path.join(p, "*.*"))))
            elif os.path.isfile(p):
                files.append(p)
            else:
                raise UserError(f"{p}: does not exist, give an image, a video, a folder, a glob or a .txt list")
        images = [f for f in files if _suffix(f) in IMG_FORMATS]
        videos = [f for f in files if _suffix(f) in VID_FORMATS]
        self.files = images + videos
        self.nf = len(self.files)
        self.video_flag = [False] * len(images) + [True] * len(videos)
        if not self.nf:
            raise UserError(f"{path}: no images or videos found; supported formats are images {IMG_FORMATS} "
                            f"and videos {VID_FORMATS}")
        self.img_size, self.stride, self.auto = img_size, stride, auto
        self.vid_stride = max(1, int(vid_stride))
        self.mode = "image"
        self.cap, self.frame, self.frames = None, 0, 0
        self.count = 0
        self.cv2_paths = Cv2Paths()  # videos whose names OpenCV cannot take are opened through a plain-named link

    def _open_video(self, path):
        self.frame = 0
        self.cap = cv2.VideoCapture(self.cv2_paths(path))
        if not self.cap.isOpened():
            self.cap = None
            return False
        self.frames = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) / self.vid_stride)
        return True

    def __iter__(self):
        self.count = 0
        self.cap = None
        return self

    def __next__(self):
        while self.count < self.nf:
            path = self.files[self.count]
            if self.video_flag[self.count]:
                self.mode = "video"
                if self.cap is None and not self._open_video(path):
                    LOGGER.warning(f"WARNING: {path}: cannot open video, skipped")
                    self.count += 1
                    continue
                ok = all(self.cap.grab() for _ in range(self.vid_stride))
                ok, im0 = self.cap.retrieve() if ok else (False, None)
                if not ok:  # end of this video
                    self.cap.release()
                    self.cap = None
                    self.count += 1
                    continue
                self.frame += 1
                s = f"video {self.count + 1}/{self.nf} ({self.frame}/{self.frames}) {path}: "
                cap = self.cap
            else:
                self.mode = "image"
                self.count += 1
                im0 = imread(path)
                if im0 is None:
                    LOGGER.warning(f"WARNING: {path}: cannot read image, skipped")
                    continue
                s = f"image {self.count}/{self.nf} {path}: "
                cap = None
            im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
            im = np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
            return path, im, im0, cap, s
        raise StopIteration

    def __len__(self):
        return self.nf


STREAM_SCHEMES = ("rtsp://", "rtmp://", "http://", "https://")


def is_url(source) -> bool:
    return str(source).lower().startswith(STREAM_SCHEMES)


def download_source(url: str, folder: Path) -> str:
    """An image or video file given as an http(s) URL, downloaded into `folder` under its own name; one line when
    it cannot be fetched."""
    name = Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name or "download"
    file = Path(folder) / name
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(file, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (OSError, ValueError) as e:
        raise UserError(f"--source {url}: could not download it ({type(e).__name__}: {e})") from None
    return str(file)


class LoadStreams:
    """Live sources for detect.py: webcam indices ('0'), rtsp/rtmp/http(s) video streams, or a `.streams` file with
    one of those per line. One reader thread per source keeps the newest frame (every vid_stride-th); iterating
    yields the newest frame of every source as one batch, (sources, im, im0s, None, s) with `im` (n, 3, h, w) RGB
    uint8 and `im0s` the BGR frames. Iteration ends when a source ends (a finite video over http, a camera that is
    unplugged)."""

    def __init__(self, sources="0", img_size=640, stride=32, auto=True, vid_stride=1):
        src = Path(str(sources))
        if str(sources).endswith(".streams"):
            if not src.is_file():
                raise UserError(f"--source {sources}: file not found; a .streams file lists one source per line")
            text = read_list(src)
            if text is None:
                raise UserError(f"--source {sources}: not a text file; a .streams file lists one source per line")
            sources = [ln.strip() for ln in text.splitlines() if ln.strip()]
        else:
            sources = [str(sources)]
        if not sources:
            raise UserError(f"--source {src}: lists no source")
        for s in sources:
            if not is_utf8(s):  # OpenCV would crash on it
                raise UserError(f"--source {s}: a stream address or webcam index must be UTF-8 text")
        self.mode = "stream"
        self.img_size, self.stride, self.auto, self.vid_stride = img_size, stride, auto, max(1, int(vid_stride))
        self.sources = sources
        self.imgs, self.fps, self.frames, self.caps, self.threads = [], [], [], [], []
        for i, s in enumerate(sources):
            target = int(s) if s.isnumeric() else s
            level = cv2.utils.logging.getLogLevel()
            cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)  # OpenCV's warnings about a missing
            try:  # device would precede the one line below
                cap = cv2.VideoCapture(target)
                ok, im = cap.read() if cap.isOpened() else (False, None)
            finally:
                cv2.utils.logging.setLogLevel(level)
            if not ok:
                cap.release()
                what = f"webcam {target}" if isinstance(target, int) else f"stream {s}"
                raise UserError(f"--source {s}: cannot open {what} (no such device, or OpenCV cannot read it); "
                                f"give a webcam index that exists, a reachable rtsp/rtmp/http stream, or a file")
            frames = int(cap.get(cv2.CAP_PROP_FRAME_COUNT))
            self.frames.append(frames if frames > 0 else float("inf"))  # a live stream has no end
            fps = cap.get(cv2.CAP_PROP_FPS)
            self.fps.append(fps if math.isfinite(fps) and 0 < fps < 1000 else 30.0)
            self.imgs.append(im)
            self.caps.append(cap)
            LOGGER.info(f"{i + 1}/{len(sources)}: {s}... Success ({self.frames[-1]} frames {im.shape[1]}x"
                        f"{im.shape[0]} at {self.fps[-1]:.2f} FPS)")
            t = threading.Thread(target=self._read, args=(i, cap, s), daemon=True)
            self.threads.append(t)
        for t in self.threads:
            t.start()
        shapes = {letterbox(im, img_size, stride=stride, auto=auto)[0].shape for im in self.imgs}
        self.rect = len(shapes) == 1  # one letterbox shape for all sources: keep their aspect ratio
        if not self.rect:
            LOGGER.warning("WARNING: the sources differ in shape; frames are letterboxed to a square for one batch")
        self.count = 0

    def _read(self, i, cap, source):
        n, last = 0, self.frames[i]
        while cap.isOpened() and n < last:
            n += 1
            if not cap.grab():
                break  # the stream ended or dropped
            if n % self.vid_stride == 0:
                ok, im = cap.retrieve()
                if not ok:
                    LOGGER.warning(f"WARNING: {source}: a frame could not be decoded, skipped")
                    continue
                self.imgs[i] = im
        cap.release()

    def __iter__(self):
        self.count = -1
        return self

    def __next__(self):
        self.count += 1
        if self.count and not all(t.is_alive() for t in self.threads):
            raise StopIteration
        im0 = [x.copy() for x in self.imgs]
        im = np.stack([letterbox(x, self.img_size, stride=self.stride, auto=self.rect and self.auto)[0] for x in im0])
        im = np.ascontiguousarray(im[..., ::-1].transpose((0, 3, 1, 2)))  # BGR HWC -> RGB CHW
        return self.sources, im, im0, None, ""

    def __len__(self):
        return len(self.sources)


class LoadScreenshots:
    """`--source screen` as upstream: `screen [number] [left top width height]`, grabbed with the mss package.
    Yields (source, im, im0, None, s) like LoadImages, one screenshot per iteration, without end."""

    def __init__(self, source, img_size=640, stride=32, auto=True):
        try:
            import mss
        except ImportError:
            raise UserError(f"--source {source}: screen capture needs the mss package (pip install mss)") from None
        parts = str(source).split()[1:]
        try:
            numbers = [int(x) for x in parts]
        except ValueError:
            raise UserError(f"--source {source}: expected 'screen [number] [left top width height]'") from None
        if len(numbers) not in (0, 1, 5):
            raise UserError(f"--source {source}: expected 'screen [number] [left top width height]'")
        screen = numbers[0] if numbers else 0
        try:
            self.sct = mss.mss()
            monitors = self.sct.monitors
        except Exception as e:  # no display, or no permission to read it
            raise UserError(f"--source {source}: cannot capture the screen ({type(e).__name__}: {e})") from None
        if not 0 <= screen < len(monitors):
            raise UserError(f"--source {source}: no screen {screen}; this display has screens 0-{len(monitors) - 1}")
        m = monitors[screen]
        left, top, width, height = numbers[1:] if len(numbers) == 5 else (0, 0, m["width"], m["height"])
        self.monitor = {"left": m["left"] + left, "top": m["top"] + top, "width": width, "height": height}
        self.source, self.img_size, self.stride, self.auto = str(source), img_size, stride, auto
        self.mode, self.frame = "stream", 0

    def __iter__(self):
        return self

    def __next__(self):
        im0 = np.asarray(self.sct.grab(self.monitor))[:, :, :3]  # BGRA -> BGR
        self.frame += 1
        im = letterbox(im0, self.img_size, stride=self.stride, auto=self.auto)[0]
        im = np.ascontiguousarray(im.transpose((2, 0, 1))[::-1])
        m = self.monitor
        return self.source, im, im0, None, f"screen {m['left']},{m['top']} {m['width']}x{m['height']}: "


# ----------------------------------------------------------------------------------------------------------------------
# Verification of one image/label pair
# ----------------------------------------------------------------------------------------------------------------------

def _image_size(im_file):
    """(w, h) as cv2.imread will see it (EXIF rotation applied); raises on an unreadable or truncated image."""
    try:
        return _pil_image_size(im_file)
    except UnidentifiedImageError:  # a format PIL does not know (e.g. .pfm): OpenCV decides
        im = imread(im_file)
        if im is None:
            raise ValueError("not an image, or a format neither PIL nor OpenCV can read") from None
        h, w = im.shape[:2]
        if w < 10 or h < 10:
            raise ValueError(f"image size {w}x{h} is under 10 px") from None
        return w, h


def _pil_image_size(im_file):
    with Image.open(im_file) as im:
        im.verify()
    with Image.open(im_file) as im:  # verify() leaves the object unusable: reopen
        fmt = (im.format or "").lower()
        w, h = im.size
        try:
            orientation = im.getexif().get(ORIENTATION_TAG, 1)
        except Exception:  # a broken EXIF block does not make the pixels unreadable
            orientation = 1
        if fmt in ("jpeg", "jpg", "mpo"):
            with open(im_file, "rb") as f:
                f.seek(-2, 2)
                if f.read() != b"\xff\xd9":  # no end-of-image marker: decode fully to find truncation
                    im.load()
    if fmt not in IMG_FORMATS:
        raise ValueError(f"image format {fmt or 'unknown'} is not one of {IMG_FORMATS}")
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    if w < 10 or h < 10:
        raise ValueError(f"image size {w}x{h} is under 10 px")
    return w, h


def _parse_labels(lb_file):
    """Rows of a label file -> (n, 5) float32 [cls, xc, yc, w, h]; raises ValueError naming the bad line."""
    with open(lb_file, encoding="utf-8-sig") as f:  # -sig: tolerate a byte-order mark
        lines = f.read().splitlines()
    rows = []
    for k, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        try:
            v = [float(x) for x in fields]
        except ValueError:
            raise ValueError(f"{lb_file} line {k}: non-numeric value in {line.strip()!r}") from None
        if not all(math.isfinite(x) for x in v):
            raise ValueError(f"{lb_file} line {k}: non-finite value in {line.strip()!r}")
        cls = v[0]
        if cls < 0 or cls != int(cls):
            raise ValueError(f"{lb_file} line {k}: class {fields[0]} is not a non-negative integer")
        if len(v) == 5:
            xc, yc, w, h = v[1:]
            coords = v[1:]
        elif len(v) >= 7 and len(v) % 2 == 1:  # polygon -> enclosing box
            xs, ys = v[1::2], v[2::2]
            coords = v[1:]
            xc, yc = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
            w, h = max(xs) - min(xs), max(ys) - min(ys)
        else:
            raise ValueError(f"{lb_file} line {k}: {len(v)} columns, expected 5 (cls xc yc w h) "
                             f"or a polygon (cls x1 y1 x2 y2 x3 y3 ...)")
        if w <= 0 or h <= 0:
            raise ValueError(f"{lb_file} line {k}: box width/height must be positive in {line.strip()!r}")
        if min(coords) < -COORD_TOL or max(coords) > 1 + COORD_TOL:
            raise ValueError(f"{lb_file} line {k}: coordinates outside [0, 1] in {line.strip()!r} "
                             f"(labels must be normalised by the image width and height)")
        rows.append((cls, xc, yc, w, h))
    lb = np.array(rows, dtype=np.float32).reshape(-1, 5)
    lb[:, 1:] = lb[:, 1:].clip(0, 1)
    return lb


def verify_image_label(args):
    """Check one image and its label file.

    Returns (im_file, labels or None, (w, h) or None, status, messages) where status is one of
    'found' (labels present), 'missing' (no label file), 'empty' (label file without rows) or 'corrupt'.
    """
    im_file, lb_file, prefix = args
    try:
        shape = _image_size(im_file)
    except Exception as e:
        return im_file, None, None, "corrupt", [f"{prefix}WARNING: ignoring {im_file}: unreadable image ({e})"]
    if not os.path.isfile(lb_file):
        return im_file, np.zeros((0, 5), np.float32), shape, "missing", []
    try:
        lb = _parse_labels(lb_file)
    except (ValueError, UnicodeDecodeError, OSError) as e:
        return im_file, None, None, "corrupt", [f"{prefix}WARNING: ignoring {im_file}: bad label file: {e}"]
    if not len(lb):
        return im_file, lb, shape, "empty", []
    msgs = []
    _, first = np.unique(lb, axis=0, return_index=True)
    if len(first) < len(lb):
        msgs.append(f"{prefix}WARNING: {im_file}: {len(lb) - len(first)} duplicate label rows removed ({lb_file})")
        lb = lb[np.sort(first)]
    return im_file, lb, shape, "found", msgs


def _files_hash(paths):
    """Hash of the file names with their sizes and modification times (a change in any file changes it)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(p))  # a name that is not UTF-8 hashes as the bytes it is
        try:
            st = os.stat(p)
            h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        except OSError:
            h.update(b"-")
    return h.hexdigest()


def _list_image_files(path, prefix):
    """Image files of a dataset given as a folder (recursive), a .txt list, an image file, or a list of those."""
    files = []
    for p in path if isinstance(path, (list, tuple)) else [path]:
        p = Path(p)
        if p.is_dir():
            files += [os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs]
        elif p.is_file() and p.suffix.lower() == ".txt":
            parent = p.resolve().parent
            try:
                text = read_list(p)
                why = "not a text file" if text is None else None
            except OSError as e:
                why = e.strerror or str(e)
            if why:
                raise UserError(f"{prefix}{p}: cannot read this image list ({why}); a .txt list holds one image "
                                f"path per line") from None
            for line in text.splitlines():
                line = line.strip()
                if line:  # relative entries (upstream writes './images/...') are relative to the list's folder
                    files.append(line if os.path.isabs(line) else os.path.normpath(parent / line))
        elif p.is_file():
            files.append(str(p))
        else:
            raise UserError(f"{prefix}{p}: does not exist; check 'path' and the train/val entries of the dataset yaml")
    im_files = sorted(str(f) for f in files if _suffix(f) in IMG_FORMATS)
    if not im_files:
        raise UserError(f"{prefix}{path}: no images found (supported formats: {', '.join(IMG_FORMATS)})")
    return im_files


def _available_ram():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


# ----------------------------------------------------------------------------------------------------------------------
# Training / validation dataset
# ----------------------------------------------------------------------------------------------------------------------

class LoadImagesAndLabels(Dataset):
    """Images and YOLO labels for train.py and val.py.

    __getitem__ returns (image CHW RGB uint8 tensor, labels (n, 6) [0, cls, xc, yc, w, h] normalised to the output
    image, image path, shapes) with shapes = None for a mosaic, else ((h0, w0), ((h / h0, w / w0), (pad_w, pad_h)))
    to map boxes back to the original image. With `nc`, images with a label class outside 0..nc-1 are left out
    and counted as corrupt, like any other bad label.
    """

    def __init__(self, path, img_size=640, batch_size=16, augment=False, hyp=None, rect=False, image_weights=False,
                 cache_images=False, single_cls=False, stride=32, pad=0.0, min_items=0, prefix="", nc=None):
        if cache_images not in (False, None, True, "ram", "disk"):
            raise UserError(f"--cache {cache_images}: expected ram or disk")
        if augment:
            missing = [k for k in HYP_KEYS if not isinstance(hyp, dict) or k not in hyp]
            if missing:
                raise UserError(f"hyp: missing {', '.join(missing)}; augmentation needs all of {', '.join(HYP_KEYS)}")
            if float(hyp.get("copy_paste", 0) or 0) > 0:
                raise UserError(f"hyp copy_paste={hyp['copy_paste']}: copy-paste needs segment masks, which this "
                                f"loader does not read; set copy_paste: 0.0")
        self.img_size = img_size
        self.augment = augment
        self.hyp = hyp
        self.image_weights = image_weights
        self.rect = False if image_weights else rect
        self.mosaic = augment and not self.rect  # 4-image mosaics during training only
        self.mosaic_border = [-img_size // 2, -img_size // 2]
        self.stride = stride
        self.path = path
        self.prefix = prefix

        self.im_files = _list_image_files(path, prefix)
        self.label_files = img2label_paths(self.im_files)
        last = Path(path[-1] if isinstance(path, (list, tuple)) else path)
        list_file = last.is_file() and last.suffix.lower() == ".txt"
        self.cache_path = (last if list_file else Path(self.label_files[0]).parent).with_suffix(".cache")
        files_hash = _files_hash(self.label_files + self.im_files)
        scan = self._load_cache(self.cache_path, files_hash)
        from_cache = scan is not None
        if scan is None:
            scan = self._scan()
            scan["hash"] = files_hash
            self._save_cache(self.cache_path, scan)
        if nc is not None:
            scan = self._drop_unknown_classes(scan, int(nc))
        self._report(scan, from_cache)

        nf, nb, ncorrupt = scan["found"], scan["backgrounds"], scan["corrupt"]
        if nf + nb == 0:
            raise UserError(f"{prefix}{path}: no usable images ({ncorrupt} corrupt, see the warnings above); "
                            f"fix or remove the bad files")
        if augment and nf == 0:
            raise UserError(f"{prefix}{path}: no labels found (looked in {Path(self.label_files[0]).parent}); "
                            f"cannot train without labels")

        self.im_files = list(scan["im_files"])
        self.labels = list(scan["labels"])
        self.shapes = np.asarray(scan["shapes"], dtype=np.float64).reshape(-1, 2)  # (w, h) per image
        if min_items:
            keep = [i for i, lb in enumerate(self.labels) if len(lb) >= min_items]
            LOGGER.info(f"{prefix}{len(self.im_files) - len(keep)}/{len(self.im_files)} images with fewer than "
                        f"{min_items} labels filtered out")
            if not keep:
                raise UserError(f"{prefix}{path}: no image has {min_items} or more labels (min_items)")
            self.im_files = [self.im_files[i] for i in keep]
            self.labels = [self.labels[i] for i in keep]
            self.shapes = self.shapes[keep]
        self.label_files = img2label_paths(self.im_files)
        if single_cls:
            for lb in self.labels:
                lb[:, 0] = 0

        n = len(self.im_files)
        self.n = n
        self.batch = np.arange(n) // batch_size  # batch index of each image
        self.indices = range(n)
        if self.rect:
            self._make_rect_batches(batch_size, img_size, stride, pad)

        self.ims = [None] * n
        self.im_hw0, self.im_hw = [None] * n, [None] * n
        self.npy_files = [Path(f).with_suffix(".npy") for f in self.im_files]
        if cache_images == "disk":
            self._cache_to_disk()
        elif cache_images:
            self._cache_to_ram()

    # --- label cache ---------------------------------------------------------------------------------------------

    def _scan(self):
        found = missing = empty = corrupt = 0
        im_files, labels, shapes, msgs = [], [], [], []
        args = [(f, lb, self.prefix) for f, lb in zip(self.im_files, self.label_files)]
        desc = f"{self.prefix}Scanning {self.cache_path.parent / self.cache_path.stem}..."
        with ThreadPool(NUM_THREADS) as pool:
            bar = tqdm(pool.imap(verify_image_label, args), total=len(args), desc=desc, leave=False,
                       disable=LOCAL_RANK > 0 or len(args) < 200)
            for im_file, lb, shape, status, m in bar:
                msgs += m
                if status == "corrupt":
                    corrupt += 1
                    continue
                found += status == "found"
                missing += status == "missing"
                empty += status == "empty"
                im_files.append(im_file)
                labels.append(lb)
                shapes.append(shape)
        return {"im_files": im_files, "labels": labels, "shapes": shapes, "msgs": msgs, "found": found,
                "backgrounds": missing + empty, "corrupt": corrupt}

    def _drop_unknown_classes(self, scan, nc):
        """Images with a label class outside 0..nc-1 are corrupt for this dataset (the cache does not know nc):
        left out, each with a warning, and counted."""
        keep, msgs = [], []
        for i, (f, lb) in enumerate(zip(scan["im_files"], scan["labels"])):
            bad = lb[(lb[:, 0] >= nc) | (lb[:, 0] < 0), 0] if len(lb) else ()
            if len(bad):
                msgs.append(f"{self.prefix}WARNING: ignoring {f}: label class {int(bad[0])} is not one of the "
                            f"dataset's classes 0-{nc - 1} (nc={nc})")
            else:
                keep.append(i)
        if not msgs:
            return scan
        dropped = len(msgs)
        return {**scan, "im_files": [scan["im_files"][i] for i in keep], "labels": [scan["labels"][i] for i in keep],
                "shapes": [scan["shapes"][i] for i in keep], "msgs": scan["msgs"] + msgs,
                "found": scan["found"] - dropped, "corrupt": scan["corrupt"] + dropped}

    def _save_cache(self, path, scan):
        counts = np.array([len(lb) for lb in scan["labels"]], dtype=np.int64)
        all_labels = np.concatenate(scan["labels"], 0) if scan["labels"] else np.zeros((0, 5), np.float32)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "wb") as f:
                np.savez(f, version=np.array(CACHE_VERSION), hash=np.array(scan["hash"]),
                         im_files=np.array(scan["im_files"], dtype=str),
                         shapes=np.array(scan["shapes"], dtype=np.int64).reshape(-1, 2),
                         counts=counts, labels=all_labels.astype(np.float32),
                         msgs=np.array(scan["msgs"], dtype=str),
                         stats=np.array([scan["found"], scan["backgrounds"], scan["corrupt"]], dtype=np.int64))
            os.replace(tmp, path)
            LOGGER.info(f"{self.prefix}New cache created: {path}")
        except OSError as e:
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            LOGGER.warning(f"{self.prefix}WARNING: cache {path} not written ({e}); the labels will be scanned again "
                           f"next time")

    @staticmethod
    def _load_cache(path, files_hash):
        """The cached scan if it exists, has this version and matches the current files; else None."""
        try:
            with np.load(path, allow_pickle=False) as z:
                if str(z["version"]) != CACHE_VERSION or str(z["hash"]) != files_hash:
                    return None
                counts = z["counts"]
                labels = np.split(z["labels"], np.cumsum(counts)[:-1]) if len(counts) else []
                found, backgrounds, corrupt = (int(x) for x in z["stats"])
                return {"im_files": [str(x) for x in z["im_files"]], "labels": [lb.copy() for lb in labels],
                        "shapes": z["shapes"].tolist(), "msgs": [str(m) for m in z["msgs"]], "found": found,
                        "backgrounds": backgrounds, "corrupt": corrupt}
        except Exception:  # absent, unreadable, or from another version: rebuild
            return None

    def _report(self, scan, from_cache):
        if LOCAL_RANK > 0:
            return
        for m in scan["msgs"]:
            LOGGER.warning(m)
        where = self.cache_path.parent / self.cache_path.stem
        LOGGER.info(f"{self.prefix}Scanning {where}{' (cached)' if from_cache else ''}... {scan['found']} images, "
                    f"{scan['backgrounds']} backgrounds, {scan['corrupt']} corrupt")

    # --- rectangular batches and image caching ----------------------------------------------------------------

    def _make_rect_batches(self, batch_size, img_size, stride, pad):
        """Sort images by aspect ratio and give each batch the smallest stride-multiple shape that fits it."""
        aspect = self.shapes[:, 1] / self.shapes[:, 0]  # h / w
        order = aspect.argsort()
        self.im_files = [self.im_files[i] for i in order]
        self.label_files = [self.label_files[i] for i in order]
        self.labels = [self.labels[i] for i in order]
        self.shapes = self.shapes[order]
        aspect = aspect[order]
        nb = int(self.batch[-1]) + 1
        rel = np.ones((nb, 2))  # (h, w) relative to img_size
        for b in range(nb):
            ar = aspect[self.batch == b]
            if ar.max() < 1:  # all landscape: full width, height of the tallest
                rel[b] = (ar.max(), 1)
            elif ar.min() > 1:  # all portrait: full height, width of the widest
                rel[b] = (1, 1 / ar.min())
        self.batch_shapes = (np.ceil(rel * img_size / stride + pad).astype(int) * stride)

    def _cache_to_ram(self):
        n = self.n
        sample = random.Random(0).sample(range(n), min(n, 30))
        est = sum(self.load_image(i)[0].nbytes for i in sample) / len(sample) * n
        avail = _available_ram()
        if avail is not None and est * 1.1 > avail:
            LOGGER.warning(f"{self.prefix}WARNING: --cache ram needs ~{est / 1e9:.1f} GB but {avail / 1e9:.1f} GB "
                           f"are free; not caching images")
            return
        total = 0
        with ThreadPool(NUM_THREADS) as pool:
            for i, (im, hw0, hw) in enumerate(pool.imap(self.load_image, range(n))):
                self.ims[i], self.im_hw0[i], self.im_hw[i] = im, hw0, hw
                total += im.nbytes
        LOGGER.info(f"{self.prefix}Cached {n} images in RAM ({total / 1e9:.2f} GB)")

    def _cache_to_disk(self):
        def save(i):
            f = self.npy_files[i]
            if f.exists():
                return f.stat().st_size
            im = self._read(i)
            tmp = f.with_name(f"{f.stem}.{os.getpid()}.tmp.npy")
            np.save(tmp, im)
            os.replace(tmp, f)
            return f.stat().st_size

        try:
            with ThreadPool(NUM_THREADS) as pool:
                total = sum(pool.imap(save, range(self.n)))
        except OSError as e:
            raise UserError(f"{self.prefix}--cache disk: cannot write .npy files beside the images ({e}); "
                            f"use --cache ram or make the image folders writable") from None
        LOGGER.info(f"{self.prefix}Cached {self.n} images on disk as .npy ({total / 1e9:.2f} GB)")

    # --- loading ------------------------------------------------------------------------------------------------

    def _read(self, i):
        """Original BGR image i (from its .npy when cached on disk)."""
        f, npy = self.im_files[i], self.npy_files[i]
        if npy.exists():
            return np.load(npy, allow_pickle=False)
        im = imread(f)
        if im is None:  # a format only PIL reads
            try:
                with Image.open(f) as pil:
                    im = np.ascontiguousarray(np.asarray(pil.convert("RGB"))[..., ::-1])
            except Exception:
                im = None
        if im is None:
            raise UserError(f"{f}: cannot read image (changed after the dataset scan?); delete {self.cache_path} "
                            f"and run again")
        return im

    def load_image(self, i):
        """Image i resized so its long side is img_size: (im, (h0, w0), (h, w))."""
        if self.ims[i] is not None:
            return self.ims[i], self.im_hw0[i], self.im_hw[i]
        im = self._read(i)
        h0, w0 = im.shape[:2]
        r = self.img_size / max(h0, w0)
        if r != 1:
            interp = cv2.INTER_LINEAR if (self.augment or r > 1) else cv2.INTER_AREA  # AREA: best for shrinking
            # ceil, as upstream v7.0: with int() a 245x269 image at 256 would come out one pixel short, and every
            # prediction on it would differ from upstream's
            im = cv2.resize(im, (math.ceil(w0 * r), math.ceil(h0 * r)), interpolation=interp)
        return im, (h0, w0), im.shape[:2]

    def load_mosaic(self, index):
        """Four images around a random centre on a 2s x 2s canvas, then random_perspective down to s x s."""
        s = self.img_size
        yc, xc = (int(random.uniform(-b, 2 * s + b)) for b in self.mosaic_border)
        ids = [index] + random.choices(self.indices, k=3)
        random.shuffle(ids)
        canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, dtype=np.uint8)
        all_labels = []
        for q, i in enumerate(ids):  # quadrants: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right
            img, _, (h, w) = self.load_image(i)
            x0 = xc if q in (1, 3) else xc - w  # tile origin on the canvas; its inner corner touches (xc, yc)
            y0 = yc if q in (2, 3) else yc - h
            cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, 2 * s), min(y0 + h, 2 * s)
            canvas[cy1:cy2, cx1:cx2] = img[cy1 - y0:cy2 - y0, cx1 - x0:cx2 - x0]
            lb = self.labels[i].copy()
            if len(lb):
                lb[:, 1:] = xywhn2xyxy(lb[:, 1:], w, h, padw=x0, padh=y0)
            all_labels.append(lb)
        labels = np.concatenate(all_labels, 0)
        np.clip(labels[:, 1:], 0, 2 * s, out=labels[:, 1:])
        hyp = self.hyp
        return random_perspective(canvas, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                  scale=hyp["scale"], shear=hyp["shear"], perspective=hyp["perspective"],
                                  border=self.mosaic_border)

    def __len__(self):
        return len(self.im_files)

    def __getitem__(self, index):
        if isinstance(index, tuple):  # (index, seed) from EpochSampler: this sample's augmentation draws are fixed
            index, seed = index
            with seeded_random(seed):
                return self._get(index)
        return self._get(index)

    def _get(self, index):
        index = self.indices[index]  # identity, or a draw by image weights
        hyp = self.hyp
        if self.mosaic and random.random() < hyp["mosaic"]:
            img, labels = self.load_mosaic(index)
            shapes = None
            if random.random() < hyp["mixup"]:
                img, labels = mixup(img, labels, *self.load_mosaic(random.randint(0, self.n - 1)))
        else:
            img, (h0, w0), (h, w) = self.load_image(index)
            shape = self.batch_shapes[self.batch[index]] if self.rect else self.img_size
            img, ratio, pad = letterbox(img, shape, auto=False, scaleup=self.augment)
            shapes = (h0, w0), ((h / h0, w / w0), pad)  # to map predictions back to the original image
            labels = self.labels[index].copy()
            if len(labels):
                labels[:, 1:] = xywhn2xyxy(labels[:, 1:], ratio[0] * w, ratio[1] * h, padw=pad[0], padh=pad[1])
            if self.augment:
                img, labels = random_perspective(img, labels, degrees=hyp["degrees"], translate=hyp["translate"],
                                                 scale=hyp["scale"], shear=hyp["shear"],
                                                 perspective=hyp["perspective"])

        nl = len(labels)
        if nl:
            labels[:, 1:5] = xyxy2xywhn(labels[:, 1:5], w=img.shape[1], h=img.shape[0], clip=True, eps=1e-3)

        if self.augment:
            augment_hsv(img, hgain=hyp["hsv_h"], sgain=hyp["hsv_s"], vgain=hyp["hsv_v"])
            if random.random() < hyp["flipud"]:
                img = np.flipud(img)
                if nl:
                    labels[:, 2] = 1 - labels[:, 2]
            if random.random() < hyp["fliplr"]:
                img = np.fliplr(img)
                if nl:
                    labels[:, 1] = 1 - labels[:, 1]

        labels_out = torch.zeros((nl, 6))
        if nl:
            labels_out[:, 1:] = torch.from_numpy(np.asarray(labels, dtype=np.float32))
        img = np.ascontiguousarray(img.transpose((2, 0, 1))[::-1])  # HWC BGR -> CHW RGB
        return torch.from_numpy(img), labels_out, self.im_files[index], shapes

    # --- batching -----------------------------------------------------------------------------------------------

    @staticmethod
    def collate_fn(batch):
        """-> (images (B, 3, H, W) uint8, targets (N, 6) with the image's batch index in column 0, paths, shapes)."""
        ims, labels, paths, shapes = zip(*batch)
        for i, lb in enumerate(labels):
            lb[:, 0] = i
        return torch.stack(ims, 0), torch.cat(labels, 0), paths, shapes

    @staticmethod
    def collate_fn4(batch):
        """--quad: every 4 images become one image of twice the size, either a 2x2 tile or the first upscaled."""
        ims, labels, paths, shapes = zip(*batch)
        n = len(shapes) // 4
        out_ims, out_labels = [], []
        half = torch.tensor([[1, 1, 0.5, 0.5, 0.5, 0.5]])
        down = torch.tensor([[0, 0, 0, 1.0, 0, 0]])  # +1 in normalised y: tile in the lower half
        right = torch.tensor([[0, 0, 1.0, 0, 0, 0]])  # +1 in normalised x: tile in the right half
        for k in range(n):
            i = 4 * k
            if random.random() < 0.5:
                im = F.interpolate(ims[i][None].float(), scale_factor=2.0, mode="bilinear", align_corners=False)
                out_ims.append(im[0].to(ims[i].dtype))
                out_labels.append(labels[i])
            else:
                left_col = torch.cat((ims[i], ims[i + 1]), 1)  # i on top of i + 1
                right_col = torch.cat((ims[i + 2], ims[i + 3]), 1)
                out_ims.append(torch.cat((left_col, right_col), 2))
                out_labels.append(torch.cat((labels[i], labels[i + 1] + down, labels[i + 2] + right,
                                             labels[i + 3] + down + right), 0) * half)
        for k, lb in enumerate(out_labels):
            lb[:, 0] = k
        return torch.stack(out_ims, 0), torch.cat(out_labels, 0), paths[:n], shapes[:n]


# ----------------------------------------------------------------------------------------------------------------------
# Loaders
# ----------------------------------------------------------------------------------------------------------------------

class InfiniteDataLoader(DataLoader):
    """A DataLoader whose worker processes live for the whole run instead of being restarted every epoch.

    Workers are kept with persistent_workers; the sampler is still iterated afresh each epoch in the main process,
    so DistributedSampler.set_epoch() reshuffles as it should.
    """

    def __init__(self, *args, **kwargs):
        if kwargs.get("num_workers", 0) > 0:
            kwargs.setdefault("persistent_workers", True)
        super().__init__(*args, **kwargs)


def sample_seed(*keys: int) -> int:
    """A 32-bit seed that depends on every key (seed, epoch, index), and on nothing else."""
    return int(np.random.SeedSequence([int(k) % 2 ** 32 for k in keys]).generate_state(1)[0])


@contextmanager
def seeded_random(seed: int):
    """`random` and `np.random` seeded with `seed` inside the block, and as they were afterwards (in the main
    process, with --workers 0, the training loop's own draws must not depend on the samples loaded)."""
    state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)


class EpochSampler(Sampler):
    """The training sampler: the order of an epoch and every sample's augmentation draws are functions of
    (seed, epoch, index) alone. It yields (index, seed) pairs that LoadImagesAndLabels understands.

    So an epoch sees the same images with the same augmentations whatever the number of workers, and a run resumed
    at epoch k (set_epoch(k)) trains on exactly the batches an uninterrupted run would have. Each iteration moves on
    to the next epoch by itself; train.py also sets it. Under DDP the order is DistributedSampler's share of it.
    """

    def __init__(self, dataset, shuffle=True, seed=0, distributed_sampler=None):
        self.n, self.shuffle, self.seed, self.epoch = len(dataset), shuffle, seed, 0
        self.inner = distributed_sampler

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def __len__(self):
        return len(self.inner) if self.inner is not None else self.n

    def __iter__(self):
        epoch = self.epoch
        self.epoch += 1
        if self.inner is not None:
            self.inner.set_epoch(epoch)
            order = list(self.inner)
        elif self.shuffle:
            g = torch.Generator()
            g.manual_seed(sample_seed(self.seed, epoch))
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = range(self.n)
        for i in order:
            yield i, sample_seed(self.seed, epoch, i)


def seed_worker(worker_id):
    """Seed `random` and numpy in each worker from torch's per-worker seed (augmentations draw from them)."""
    seed = torch.initial_seed() % 2 ** 32
    np.random.seed(seed)
    random.seed(seed)


def create_dataloader(path, imgsz, batch_size, stride, single_cls=False, hyp=None, augment=False, cache=False,
                      pad=0.0, rect=False, rank=-1, workers=8, image_weights=False, quad=False, prefix="",
                      shuffle=False, seed=0, min_items=0, nc=None):
    """Build (loader, dataset). Rank 0 scans the labels (and writes the cache) before the other DDP ranks."""
    if rect and shuffle:
        LOGGER.warning("WARNING: --rect is incompatible with DataLoader shuffle, setting shuffle=False")
        shuffle = False
    with torch_distributed_zero_first(rank):
        dataset = LoadImagesAndLabels(path, imgsz, batch_size, augment=augment, hyp=hyp, rect=rect,
                                      image_weights=image_weights, cache_images=cache, single_cls=single_cls,
                                      stride=int(stride), pad=pad, min_items=min_items, prefix=prefix, nc=nc)
    batch_size = min(batch_size, len(dataset))
    nw = min((os.cpu_count() or 1) // max(WORLD_SIZE, 1), batch_size if batch_size > 1 else 0, workers)
    sampler = None if rank == -1 else distributed.DistributedSampler(dataset, shuffle=shuffle, seed=seed)
    if augment:  # training: order and augmentations by (seed, epoch, index), see EpochSampler
        sampler = EpochSampler(dataset, shuffle=shuffle, seed=seed, distributed_sampler=sampler)
    # image weights change dataset.indices between epochs: workers must be re-created to see them
    loader_cls = DataLoader if image_weights else InfiniteDataLoader
    generator = torch.Generator()
    generator.manual_seed(seed * 1000 + max(RANK, 0))
    loader = loader_cls(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, num_workers=nw,
                        sampler=sampler, pin_memory=PIN_MEMORY and torch.cuda.is_available(),
                        collate_fn=LoadImagesAndLabels.collate_fn4 if quad else LoadImagesAndLabels.collate_fn,
                        worker_init_fn=seed_worker, generator=generator)
    return loader, dataset
