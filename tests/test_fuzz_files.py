"""Fuzzing the files users hand over: checkpoints (pickle stream and zip layout), ONNX metadata, OpenVINO yamls,
dataset yamls with `download` entries, the integer model's model.json, and image file names.

Each example ends in success or in one UserError line (exit status 2 at the CLIs), never in another exception or a
crash; a checkpoint load never takes much more memory than the valid file's load; a download writes nothing outside
the test's folder. Derandomized and bounded as tests/test_fuzz.py (YOLOV5_FUZZ_EXAMPLES=N searches longer).
"""
import io
import json
import os
import pickle
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_fuzz import ends_well, values
from test_hostile_files import identity_onnx, integer_model

from bst.torch.ao.quantization.integer_runner import IntegerModel
from models.checkpoint import build_checkpoint, save_checkpoint
from models.yolo import DetectionModel
from utils.dataloaders import LoadImages, LoadImagesAndLabels
from utils.dataset_yaml import check_dataset
from utils.general import LOGGER, shown
from workflow.backend import DetectMultiBackend, load_pytorch_model, openvino_metadata

EXAMPLES = int(os.getenv("YOLOV5_FUZZ_EXAMPLES", "0"))


def fuzz(n):
    return settings(max_examples=EXAMPLES or n, derandomize=not EXAMPLES, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(autouse=True)
def untrusted(monkeypatch):
    monkeypatch.delenv("YOLOV5_TRUST_CHECKPOINTS", raising=False)


# --- checkpoints ----------------------------------------------------------------------------------------------------

TINY = {"nc": 2, "depth_multiple": 1.0, "width_multiple": 1.0,
        "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119]],
        "backbone": [[-1, 1, "Conv", [8, 3, 2]], [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "C3", [16, 1]],
                     [-1, 1, "Conv", [16, 3, 2]]],
        "head": [[[2, 3], 1, "Detect", ["nc", "anchors"]]]}


def _status_kb(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key))


def _plain(fn):
    fn()
    return "ok"


def load_peak_mb(fn, outcome_of=ends_well):
    """(outcome_of(fn): ends_well's 'ok' / 'refused' inside an example, the peak resident memory fn added in MB; 0
    where Linux cannot reset the peak)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS from here on
        before = _status_kb("VmRSS:")
    except OSError:
        return outcome_of(fn), 0.0
    outcome = outcome_of(fn)
    return outcome, (_status_kb("VmHWM:") - before) / 1024


def run_loaded(path):
    """What val.py and detect.py do with a checkpoint: load it for inference (fused, eval) and run an image."""
    model = load_pytorch_model(str(path))
    with torch.no_grad():
        out = model(torch.zeros(1, 3, 64, 64))[0]
    assert out.shape[-1] == model.model[-1].no


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A small valid checkpoint (a 4-layer detection model, pickled as train.py saves it): (its zip records, the
    name of data.pkl, the peak MB its load adds)."""
    torch.manual_seed(0)
    model = DetectionModel(TINY)
    model.names = ["a", "b"]
    path = save_checkpoint(build_checkpoint(model.half(), epoch=-1), tmp_path_factory.mktemp("tiny") / "tiny.pt")
    with zipfile.ZipFile(path) as z:
        records = {i.filename: z.read(i.filename) for i in z.infolist()}
    run_loaded(path)  # warm: imports and first-call allocations are not the file's
    outcome, peak = load_peak_mb(lambda: run_loaded(path), _plain)
    assert outcome == "ok"
    return records, next(n for n in records if n.endswith("/data.pkl")), peak


OPCODES = sorted({getattr(pickle, n)[0] for n in dir(pickle) if n.isupper() and isinstance(getattr(pickle, n), bytes)
                  and len(getattr(pickle, n)) == 1})
position = st.floats(0, 1, exclude_max=True)
pickle_edit = st.one_of(
    st.tuples(st.just("flip"), position, st.integers(1, 255)),
    st.tuples(st.just("truncate"), position),
    st.tuples(st.just("insert"), position, st.lists(st.sampled_from(OPCODES), min_size=1, max_size=3).map(bytes),
              st.binary(max_size=6)),
    st.tuples(st.just("delete"), position, st.integers(1, 16)),
    # a small integer (BININT1: sizes, strides, numels, counts, indices) made large, zero or negative
    st.tuples(st.just("bigint"), position, st.sampled_from([0, -1, 255, 1 << 16, 1 << 24, (1 << 31) - 1])),
)
zip_edit = st.one_of(
    st.tuples(st.just("swap"), st.integers(0, 99), st.integers(0, 99)),
    st.tuples(st.just("drop"), st.integers(0, 99)),
    st.tuples(st.just("rename"), st.integers(0, 99), st.sampled_from(["data/999", "../evil", "data.pkl", "x/y/z"])),
    st.tuples(st.just("resize"), st.integers(0, 99), st.sampled_from([0, 1, 3, 1 << 16])),
)
file_edit = st.one_of(st.tuples(st.just("file flip"), position, st.integers(1, 255)),
                      st.tuples(st.just("file truncate"), position))


def _edit_pickle(data: bytes, edit) -> bytes:
    kind, at = edit[0], int(edit[1] * len(data))
    if kind == "flip" and data:
        return data[:at] + bytes([data[at] ^ edit[2]]) + data[at + 1:]
    if kind == "truncate":
        return data[:at]
    if kind == "insert":
        return data[:at] + edit[2] + edit[3] + data[at:]
    if kind == "bigint":
        at = data.find(pickle.BININT1, at)
        return data if at < 0 else data[:at] + pickle.BININT + edit[2].to_bytes(4, "little", signed=True) + \
            data[at + 2:]
    return data[:at] + data[at + edit[2]:] if kind == "delete" else data


def _edit_records(records: dict, edit) -> dict:
    names = sorted(n for n in records if "/data/" in n)
    out = dict(records)
    a = names[edit[1] % len(names)]
    if edit[0] == "swap":
        b = names[edit[2] % len(names)]
        out[a], out[b] = records[b], records[a]
    elif edit[0] == "drop":
        del out[a]
    elif edit[0] == "rename":
        out[a.rsplit("/data/", 1)[0] + "/" + edit[2]] = out.pop(a)
    else:
        out[a] = (out[a] * (edit[2] // max(len(out[a]), 1) + 1))[:edit[2]]
    return out


def _write_zip(path, records):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in records.items():
            z.writestr(name, data)
    return path


@fuzz(60)
@given(edits=st.lists(st.one_of(pickle_edit, pickle_edit, zip_edit), min_size=1, max_size=3),
       last=st.one_of(st.none(), file_edit))
def test_mutated_checkpoints_load_or_are_refused_in_one_line(tiny_checkpoint, edits, last):
    records, pkl, valid_peak = tiny_checkpoint
    records = dict(records)
    for edit in edits:
        if edit[0] in ("flip", "truncate", "insert", "delete", "bigint"):
            records[pkl] = _edit_pickle(records[pkl], edit)
        elif pkl in records:
            records = _edit_records(records, edit)
    with tempfile.TemporaryDirectory() as tmp:
        path = _write_zip(Path(tmp) / "m.pt", records)
        if last is not None:
            data = path.read_bytes()
            path.write_bytes(_edit_pickle(data, ("flip" if last[0] == "file flip" else "truncate", *last[1:])))
        outcome, peak = load_peak_mb(lambda: run_loaded(path))
        assert sorted(os.listdir(tmp)) == ["m.pt"]  # a load writes nothing
    assert peak < 2 * valid_peak + 16, (outcome, peak, valid_peak)  # +16 MB: allocator noise of a small load


# --- ONNX metadata and OpenVINO yamls -------------------------------------------------------------------------------

META_TEXT = st.one_of(st.sampled_from(["32", "64", "0", "-32", "1e400", "nan", "abc", "", " 32", "32.0", "2000",
                                       "{0: 'a'}", "['a', 'b']", "{'0': 'a'}", "{0: 1}", "{0: 'a'", "[[[[", "None",
                                       "__import__('os')", "1", "yes", "(" * 200 + ")" * 200, "{" + "0:" * 100]),
                      st.text(max_size=30))


@fuzz(25)
@given(meta=st.dictionaries(st.sampled_from(["stride", "names", "quantized", "pow2", "other"]), META_TEXT,
                            max_size=4))
def test_onnx_metadata_loads_or_is_refused_in_one_line(meta):
    with tempfile.TemporaryDirectory() as tmp:
        f = identity_onnx(Path(tmp) / "m.onnx", meta)
        backend = []
        if ends_well(lambda: backend.append(DetectMultiBackend(str(f)))) == "ok":
            b = backend[0]
            assert 1 <= b.stride <= 1024 and (b.names is None or all(isinstance(n, str) for n in b.names.values()))


@fuzz(60)
@given(meta=st.one_of(st.dictionaries(st.sampled_from(["stride", "names", "quantized", "pow2", "shape", "dynamic",
                                                        "other"]), values | META_TEXT, max_size=5), values,
                      st.text(max_size=40)))
def test_openvino_yamls_load_or_are_refused_in_one_line(meta):
    with tempfile.TemporaryDirectory() as tmp:
        xml = Path(tmp) / "m.xml"
        xml.write_text("<net/>")
        text = meta if isinstance(meta, str) else yaml.safe_dump(meta, allow_unicode=True)
        xml.with_suffix(".yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
        read = []
        if ends_well(lambda: read.append(openvino_metadata(tmp, xml))) == "ok":
            m = read[0]
            assert 1 <= m["stride"] <= 1024 and (m["input_shape"] is None or len(m["input_shape"]) == 4)


# --- dataset yamls with downloads -----------------------------------------------------------------------------------

MEMBER = st.sampled_from(["ds/images/a.jpg", "images/b.jpg", "a.jpg", "../escape.txt", "../../escape.txt",
                          "/tmp/yolov5_fuzz_abs.txt", "ds/../../escape.txt", "ds/images/../../../escape.txt",
                          "ds/data.yaml", "sub/./c.jpg", ".bashrc"])
ARCHIVE = st.tuples(st.sampled_from(["zip", "tar", "txt"]), st.lists(MEMBER, min_size=1, max_size=3, unique=True),
                    st.sampled_from([None, "symlink", "hardlink"]))
PATHS = ["TMP/ds", "TMP/ds", "TMP/other/ds", "TMP", "ROOT", "ROOT/utils", "ROOT/datasets", "PREFIX", "", "/"]
DIRS = st.sampled_from([None, "", "images", "../x", "../../", "/tmp", "ROOT/utils", "a/../../b", "."])


def _archive(folder, spec, n):
    kind, members, link = spec
    path = folder / f"a{n}.{kind}"
    if kind == "zip":
        with zipfile.ZipFile(path, "w") as z:
            for m in members:
                z.writestr(m, b"fuzz")
    elif kind == "tar":
        with tarfile.open(path, "w") as t:
            for m in members:
                info = tarfile.TarInfo(m)
                info.size = 4
                t.addfile(info, io.BytesIO(b"fuzz"))
            if link:
                info = tarfile.TarInfo("ds/images/link")
                info.type, info.linkname = (tarfile.SYMTYPE if link == "symlink" else tarfile.LNKTYPE), "/etc/passwd"
                t.addfile(info)
    else:
        path.write_bytes(b"fuzz")
    return path, members


def _outside_marks(tmp, candidates):
    """Files an archive could have written outside the test folder (every place a member could land)."""
    return [p for p in candidates if not p.is_relative_to(tmp) and p.exists() and p.read_bytes() == b"fuzz"]


@fuzz(40)
@given(path=st.sampled_from(PATHS), downloads=st.lists(st.tuples(ARCHIVE, DIRS, st.booleans()), min_size=1,
                                                       max_size=2), flat=st.booleans())
def test_dataset_downloads_never_write_outside_their_folder(path, downloads, flat):
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp).resolve()
        fill = {"TMP": str(tmp), "ROOT": str(ROOT), "PREFIX": sys.prefix}
        root = path
        for k, v in fill.items():
            root = root.replace(k, v)
        entries, candidates = [], []
        for n, (spec, sub, as_dict) in enumerate(downloads):
            archive, members = _archive(tmp, spec, n)
            sub = None if sub is None else sub.replace("ROOT", str(ROOT))
            entries.append({"url": archive.as_uri(), **({"dir": sub} if sub is not None else {})}
                           if as_dict or sub is not None else archive.as_uri())
            for base in (Path(root or ROOT), Path(root or ROOT).parent, Path(root or ROOT) / (sub or "")):
                candidates += [Path(os.path.normpath(base / m)) for m in members]
        spec = {"path": root, "train": "images", "val": "images", "names": ["a"],
                "download": entries[0] if flat and len(entries) == 1 else entries}
        (tmp / "data.yaml").write_text(yaml.safe_dump(spec))
        before = set(os.listdir(ROOT))
        ends_well(check_dataset, tmp / "data.yaml")
        assert _outside_marks(tmp, candidates) == [] and set(os.listdir(ROOT)) == before
        assert not Path("/tmp/yolov5_fuzz_abs.txt").exists()


# --- the integer model's model.json -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def integer_graph(tmp_path_factory):
    folder, graph = integer_model(tmp_path_factory.mktemp("integer") / "m")
    return folder, graph


def _paths(obj, prefix=()):
    """Every (key path) inside a JSON value."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


JSON_VALUE = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() |
                          st.sampled_from(["t1", "t2", "images", "relu", "half_up", "conv2d", "quantize", ""]),
                          lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner,
                                                                                      max_size=2), max_leaves=5)


@fuzz(60)
@given(picks=st.lists(st.tuples(st.integers(0, 10 ** 6), JSON_VALUE | st.just(KeyError)), min_size=1, max_size=3))
def test_integer_model_json_runs_or_is_refused_in_one_line(integer_graph, picks):
    folder, graph = integer_graph
    graph = json.loads(json.dumps(graph))
    for pick, value in picks:
        paths = [p for p in _paths(graph) if p]
        *parents, last = paths[pick % len(paths)]
        d = graph
        for k in parents:
            d = d[k]
        if value is KeyError:
            del d[last]
        else:
            d[last] = value
    with tempfile.TemporaryDirectory() as tmp:
        for f in ("tensors.npz", "example.npz"):
            (Path(tmp) / f).write_bytes((folder / f).read_bytes())
        (Path(tmp) / "model.json").write_text(json.dumps(graph))
        try:
            model = IntegerModel(tmp)
            with np.load(folder / "example.npz") as ex:
                model.run(ex["images"])
        except ValueError as e:  # what run_integer.py prints as its one ERROR line (exit status 2)
            assert "\n" not in str(e) and str(e).startswith(f"{Path(tmp) / 'model.json'}: "), str(e)


# --- image file names -----------------------------------------------------------------------------------------------

# any bytes but "/" and NUL; not hidden (a leading "."): detect.py's folder glob skips those, as upstream's does
NAME = st.binary(min_size=1, max_size=24).map(lambda b: b.replace(b"/", b"_").replace(b"\x00", b"_")).filter(
    lambda b: not b.startswith(b"."))


@fuzz(20)
@given(names=st.lists(NAME, min_size=1, max_size=3, unique=True), suffix=st.sampled_from([b".jpg", b".PNG",
                                                                                          b".jpeg"]))
def test_any_file_name_is_read_and_shown(names, suffix):
    ok, jpg = cv2.imencode(".jpg", np.full((32, 48, 3), 90, np.uint8))
    with tempfile.TemporaryDirectory() as tmp:
        images, labels = os.path.join(os.fsencode(tmp), b"images"), os.path.join(os.fsencode(tmp), b"labels")
        os.mkdir(images)
        os.mkdir(labels)
        for name in names:
            with open(os.path.join(images, name + suffix), "wb") as f:
                f.write(jpg.tobytes())
            with open(os.path.join(labels, name + b".txt"), "w") as f:
                f.write("0 0.5 0.5 0.5 0.5\n")
        read = [os.fsencode(os.path.basename(p)) for p, *_ in LoadImages(os.fsdecode(images), img_size=32)]
        assert sorted(read) == sorted(n + suffix for n in names)
        for cached in (False, True):
            ds = LoadImagesAndLabels(os.fsdecode(images), img_size=32, batch_size=2, nc=1)
            assert len(ds) == len(names) and all(len(lb) == 1 for lb in ds.labels)
            ds[0]
        for p in ds.im_files:
            shown(p).encode("utf-8")  # printable
            LOGGER.debug(f"read {p}")  # the logger does not fail on it


def test_fuzz_helpers_see_what_they_must():
    """The checks above can fail: a load that allocates much more than it should shows in load_peak_mb, and
    _outside_marks finds a member written outside the test folder."""
    outcome, peak = load_peak_mb(lambda: np.ones(64 * 2 ** 20, np.uint8).sum(), _plain)
    assert outcome == "ok" and (peak == 0 or peak > 60)
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        (Path(b) / "m.txt").write_bytes(b"fuzz")
        assert _outside_marks(Path(a), [Path(b) / "m.txt", Path(a) / "n.txt"]) == [Path(b) / "m.txt"]
