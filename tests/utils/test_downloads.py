"""A dataset yaml's `download` writes only new files, only inside the dataset's own folder.

The three hostile yamls found by probing (an absolute `dir`, a `dir` with `..`, a `path` inside the code tree with a
plain URL) each carry an archive that would replace utils/general.py; they must be refused before anything is
fetched and leave every file of the project unchanged. Legitimate downloads (upstream's coco128 and coco layouts,
`generate:`) still work.
"""
import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT

from utils import dataset_yaml
from utils.dataset_yaml import check_dataset
from utils.general import UserError

PAYLOAD = b"raise SystemExit('code from a dataset archive ran')\n"


def tree_digest():
    """A digest of every file of the project's code (what a hostile download must not touch)."""
    h = hashlib.sha256()
    for p in sorted(ROOT.rglob("*.py")):
        if p.relative_to(ROOT).parts[0] not in (".venv", "datasets", "runs"):
            h.update(str(p).encode() + p.read_bytes())
    return h.hexdigest()


def zip_with(path, members: dict):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def write_yaml(path, data):
    path.write_text(yaml.safe_dump(data))
    return path


def jpg_bytes():
    import cv2
    import numpy as np

    return cv2.imencode(".jpg", np.zeros((32, 32, 3), np.uint8))[1].tobytes()


@pytest.fixture
def fetched(monkeypatch):
    """Record every URL the downloader is asked for (file:// URLs still go through torch.hub)."""
    calls = []
    real = dataset_yaml.torch.hub.download_url_to_file

    def recording(url, dst, *args, **kwargs):
        calls.append(url)
        return real(url, dst, *args, **kwargs)

    monkeypatch.setattr(dataset_yaml.torch.hub, "download_url_to_file", recording)
    return calls


@pytest.mark.parametrize("case", ["absolute dir", "dir with ..", "path in the code tree"])
def test_hostile_download_destinations_are_refused_before_fetching(tmp_path, fetched, case):
    before = tree_digest()
    archive = zip_with(tmp_path / "x.zip", {"general.py": PAYLOAD, "utils/general.py": PAYLOAD})
    data = {"train": "images", "val": "images", "names": ["a"]}
    if case == "absolute dir":
        data.update(path=str(tmp_path / "ds"), download={"url": archive.as_uri(), "dir": str(ROOT / "utils")})
    elif case == "dir with ..":
        rel = Path("..") / ".." / ROOT.relative_to(ROOT.anchor) / "utils"
        data.update(path=str(tmp_path / "ds"), download={"url": archive.as_uri(), "dir": "../" * 12 + str(rel)})
    else:
        data.update(path=str(ROOT / "utils" / "x"), download=archive.as_uri())
    with pytest.raises(UserError) as e:
        check_dataset(write_yaml(tmp_path / "evil.yaml", data))
    assert "\n" not in str(e.value) and "evil.yaml" in str(e.value)
    assert fetched == [] and tree_digest() == before
    assert not (ROOT / "utils" / "x").exists()


@pytest.mark.parametrize("path", ["", ".", "utils", "..", "/", "~"])
def test_dataset_folders_around_or_inside_the_project_are_refused(tmp_path, fetched, path):
    data = {"path": str(Path(path).expanduser()) if path else "", "train": "t", "val": "no-such-val",
            "names": ["a"], "download": (tmp_path / "x.zip").as_uri()}
    with pytest.raises(UserError, match="where a download may not write|not empty"):
        check_dataset(data)
    assert fetched == []


def test_archive_members_must_land_in_the_dataset_folder_as_new_files(tmp_path, fetched):
    before = tree_digest()
    # a plain URL unpacks into the parent of path: members outside path's own folder are refused
    archive = zip_with(tmp_path / "ds.zip", {"ds/images/a.jpg": jpg_bytes(), "other/evil.py": PAYLOAD})
    root = tmp_path / "datasets" / "ds"
    with pytest.raises(UserError, match="other/evil.py would land outside the dataset folder"):
        check_dataset({"path": str(root), "train": "images", "val": "images", "names": ["a"],
                       "download": archive.as_uri()})
    assert not (tmp_path / "datasets" / "other").exists() and not (root / "images").exists()
    assert len(fetched) == 1 and tree_digest() == before
    assert not list(root.glob(".*.part"))  # the temporary download is gone


def test_a_download_never_replaces_a_file(tmp_path):
    first = zip_with(tmp_path / "a.zip", {"images/a.jpg": jpg_bytes(), "notes.txt": b"mine"})
    second = zip_with(tmp_path / "b.zip", {"notes.txt": b"theirs"})
    root = tmp_path / "ds"
    with pytest.raises(UserError, match="notes.txt would replace"):
        check_dataset({"path": str(root), "train": "images", "val": "images/val", "names": ["a"],
                       "download": [{"url": first.as_uri()}, {"url": second.as_uri()}]})
    assert (root / "notes.txt").read_bytes() == b"mine"


def test_a_download_only_fills_a_new_or_empty_folder(tmp_path, fetched):
    root = tmp_path / "home"
    root.mkdir()
    (root / "keep.txt").write_text("x")
    archive = zip_with(tmp_path / "x.zip", {".bashrc": PAYLOAD, "images/a.jpg": jpg_bytes()})
    with pytest.raises(UserError, match="exists and is not empty"):
        check_dataset({"path": str(root), "train": "images", "val": "images", "names": ["a"],
                       "download": {"url": archive.as_uri()}})
    assert fetched == [] and not (root / ".bashrc").exists()


def test_tar_links_are_refused(tmp_path):
    buf = tmp_path / "x.tar"
    with tarfile.open(buf, "w") as t:
        info = tarfile.TarInfo("ds/images/link")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc"
        t.addfile(info)
        data = jpg_bytes()
        info = tarfile.TarInfo("ds/images/a.jpg")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    with pytest.raises(UserError, match="is a link or device"):
        check_dataset({"path": str(tmp_path / "d" / "ds"), "train": "images", "val": "images", "names": ["a"],
                       "download": buf.as_uri()})


def test_upstream_coco_layouts_download(tmp_path):
    """coco128: a plain URL whose zip holds coco128/...; coco: a label zip (coco/...) then image zips into images/."""
    img = jpg_bytes()
    coco128 = zip_with(tmp_path / "coco128.zip", {"coco128/images/train2017/a.jpg": img,
                                                  "coco128/labels/train2017/a.txt": b"0 0.5 0.5 0.2 0.2\n"})
    root = tmp_path / "datasets" / "coco128"
    data = check_dataset({"path": str(root), "train": "images/train2017", "val": "images/train2017",
                          "names": ["person"], "download": coco128.as_uri()})
    assert Path(data["val"], "a.jpg").is_file() and not list((tmp_path / "datasets").glob("*.zip"))

    labels = zip_with(tmp_path / "coco2017labels.zip", {"coco/val2017.txt": b"./images/val2017/b.jpg\n",
                                                        "coco/labels/val2017/b.txt": b"0 0.5 0.5 0.2 0.2\n"})
    val = zip_with(tmp_path / "val2017.zip", {"val2017/b.jpg": img})
    root = tmp_path / "datasets" / "coco"
    data = check_dataset({"path": str(root), "train": "val2017.txt", "val": "val2017.txt", "names": ["person"],
                          "download": [labels.as_uri(), {"url": val.as_uri(), "dir": "images"}]})
    assert (root / "images" / "val2017" / "b.jpg").is_file() and Path(data["val"]).is_file()


def test_generators_write_only_inside_their_folder(tmp_path, monkeypatch):
    from utils.shapes import generate

    monkeypatch.setitem(dataset_yaml.GENERATORS, "shapes", lambda root: generate(root, n_train=1, n_val=1))
    root = tmp_path / "sets" / "shapes"
    check_dataset({"path": str(root), "train": "images/train", "val": "images/val", "names": ["a"],
                   "download": "generate:shapes"})
    assert sorted(p.name for p in (tmp_path / "sets").iterdir()) == ["shapes"]
    with pytest.raises(UserError, match="where a download may not write"):
        check_dataset({"path": str(ROOT / "models" / "shapes"), "train": "images/train", "val": "images/val",
                       "names": ["a"], "download": "generate:shapes"})
    assert not (ROOT / "models" / "shapes").exists()
