"""Images and videos by any file name the OS allows.

OpenCV's Python binding turns a `str` argument into UTF-8 and does not check that it can: a file name that is not
valid UTF-8 (Python hands it over with surrogate escapes, e.g. 'bad\\udcff.jpg' for the bytes b'bad\\xff.jpg') makes
cv2.imread, cv2.imwrite, cv2.VideoCapture and even cv2.putText crash the process with a segmentation fault. So files
are read and written here through Python's own file I/O (np.fromfile + cv2.imdecode, cv2.imencode + write: the same
decoders and encoders, EXIF rotation included, the same pixels), a video is opened through a link with a plain name,
and any text that may hold such a name is escaped (`shown`) before OpenCV draws or shows it.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import cv2
import numpy as np

from utils.general import shown


def is_utf8(path) -> bool:
    """Whether OpenCV can take this path as it is (its name is valid UTF-8)."""
    try:
        str(path).encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def imread(path, flags=cv2.IMREAD_COLOR):
    """cv2.imread for any file name: the decoded image, or None when the file cannot be read or decoded."""
    try:
        data = np.fromfile(os.fspath(path), dtype=np.uint8)
    except (OSError, ValueError):
        return None
    if not data.size:
        return None
    try:
        return cv2.imdecode(data, flags)
    except cv2.error:
        return None


def imwrite(path, im, params=()) -> bool:
    """cv2.imwrite for any file name (the encoder is chosen by the suffix, as cv2.imwrite does); False when the
    image cannot be encoded or the file cannot be written."""
    suffix = os.path.splitext(os.fspath(path))[1]
    try:
        ok, buf = cv2.imencode(suffix if is_utf8(suffix) else ".jpg", im, list(params))
    except cv2.error:
        return False
    if not ok:
        return False
    try:
        buf.tofile(os.fspath(path))
    except OSError:
        return False
    return True


class Cv2Paths:
    """Paths OpenCV can open: a name that is not UTF-8 gets a link with a plain name in a private temporary folder
    (removed with this object), pointing at the file."""

    def __init__(self):
        self._tmp = None
        self._n = 0

    def __call__(self, path) -> str:
        path = os.fspath(path)
        if is_utf8(path):
            return path
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="yolov5_links_")
        self._n += 1
        link = Path(self._tmp.name) / f"file{self._n}{os.path.splitext(shown(path))[1]}"
        os.symlink(os.path.abspath(path), link)
        return str(link)

    def writable(self, path) -> str:
        """Where OpenCV can write the file `path` (videos): its folder as __call__ gives it, its name escaped
        (`shown`) where it is not UTF-8."""
        folder, name = os.path.split(os.fspath(path))
        return os.path.join(self(folder or "."), shown(name))
