"""Dataset yaml files: validate them, resolve their paths, and fetch or generate missing data.

A dataset yaml (data/coco.yaml, data/shapes.yaml) holds `path`, `train`, `val`, optional `test`, `names` (a list or
an {index: name} dict) and optional `nc`, `annotations` (COCO json of the val split, relative to `path`),
`category_ids` (COCO category id of each class index) and `download`.

`download` is data, never code (upstream YOLOv5 exec()s it; this project does not):
  - `generate:NAME`     run the registered generator NAME (GENERATORS) with the dataset root as output folder;
  - a URL               fetch it and unpack it into the parent of `path` (.zip, .tar, .tar.gz, .tgz): the archive
                        holds the dataset's own folder (coco128.zip holds coco128/...);
  - {url: U, dir: D}    fetch U and unpack it into `path`/D;
  - a list of the above.

A yaml that comes with a dataset is untrusted data, so a download writes only new files and only inside the
dataset's folder `path`: that folder may not lie in the project's code or the Python installation (the project's
datasets/ folder is fine), a URL download needs it new or empty, `dir` stays inside it, and every archive member must
land inside it without replacing a file. Links in tar archives are refused. All of this is checked before a byte is
fetched, or before a byte is unpacked for the archive's members.
"""
from __future__ import annotations

import functools
import os
import site
import sys
import tarfile
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import torch.hub

from utils.general import LOGGER, ROOT, UserError, check_file, yaml_load
from utils.shapes import generate

REQUIRED_KEYS = ("train", "val", "names")
SPLIT_KEYS = ("train", "val", "test")


def _generate_shapes(root: Path):
    generate(root)


def _generate_shapes_val1200(root: Path):
    generate(root, n_val=1200)  # the same 600 train images; val images 1-150 are shapes' val split


GENERATORS = {"shapes": _generate_shapes,  # name -> callable(dataset_root), for `download: generate:NAME`
              "shapes-val1200": _generate_shapes_val1200}


def _names_dict(names, where):
    """names as a list or an {int: str} dict -> {0: str, 1: str, ...} with contiguous keys."""
    if isinstance(names, (list, tuple)):
        out = dict(enumerate(names))
    elif isinstance(names, dict):
        try:
            out = {int(k): v for k, v in names.items()}
        except (TypeError, ValueError):
            raise UserError(f"{where}: 'names' keys must be class indices 0, 1, 2, ..., "
                            f"got {list(names)[:5]}") from None
    else:
        raise UserError(f"{where}: 'names' must be a list or an {{index: name}} dict, got {type(names).__name__}")
    if not out:
        raise UserError(f"{where}: 'names' is empty, list at least one class")
    if sorted(out) != list(range(len(out))):
        raise UserError(f"{where}: 'names' indices must be 0..{len(out) - 1} without gaps, got {sorted(out)}")
    return {k: str(out[k]) for k in sorted(out)}


def _resolve(path: Path, entry):
    """A split entry (str or list of str) -> absolute path string(s) under the dataset root."""
    if isinstance(entry, (list, tuple)):
        return [os.path.normpath(path / str(x)) for x in entry]
    # normalised, not resolved: a split folder that is a link keeps its place, so the label cache is written beside
    # the link (in the dataset's own labels/ folder), never into a shared folder it points to
    return os.path.normpath(path / str(entry))


def _missing(entry):
    return [p for p in (entry if isinstance(entry, list) else [entry]) if not Path(p).exists()]


def check_dataset(data, autodownload=True) -> dict:
    """Load and validate a dataset yaml (a file name or a dict); make its paths absolute; fetch missing data.

    Returns a new dict with `names` as {int: str}, `nc`, `path` (absolute Path), absolute `train`/`val`/`test`
    (str or list of str) and, when given, absolute `annotations`. Every problem is a UserError naming the file.
    """
    if isinstance(data, (str, Path)):
        file = check_file(data)
        where = str(file)
        data = yaml_load(file)
        if not isinstance(data, dict):
            raise UserError(f"{where}: a dataset yaml must be a mapping with train, val and names")
        yaml_file = Path(file).resolve()
    elif isinstance(data, dict):
        where, yaml_file = "dataset dict", None
        data = dict(data)
    else:
        raise UserError(f"data={data!r}: expected a dataset yaml file or dict")

    for k in REQUIRED_KEYS:
        if not data.get(k):
            raise UserError(f"{where}: missing key '{k}', a dataset yaml needs {', '.join(REQUIRED_KEYS)}")
    for k in SPLIT_KEYS:
        v = data.get(k)
        if v and not (isinstance(v, str) or isinstance(v, list) and all(isinstance(x, str) and x for x in v)):
            raise UserError(f"{where}: {k} {v!r} must be a folder, a .txt list or an image (relative to 'path'), or "
                            f"a list of those")
    data["names"] = _names_dict(data["names"], where)
    nc = len(data["names"])
    if data.get("nc") is not None and (isinstance(data["nc"], bool) or not isinstance(data["nc"], int)):
        raise UserError(f"{where}: nc {data['nc']!r} must be an integer (the number of classes in 'names')")
    if data.get("nc") is not None and int(data["nc"]) != nc:
        raise UserError(f"{where}: nc={data['nc']} but 'names' lists {nc} classes; fix one of them or drop nc")
    data["nc"] = nc
    if data.get("category_ids") is not None:
        ids = data["category_ids"]
        if (not isinstance(ids, (list, tuple)) or len(ids) != nc
                or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)):
            raise UserError(f"{where}: 'category_ids' must be a list of {nc} integer ids (one per class)")
        data["category_ids"] = list(ids)

    path = Path(str(data.get("path") or ""))
    if not path.is_absolute():
        path = (ROOT / path).resolve()  # upstream resolves a relative root against the repository root
    data["path"] = path
    for k in SPLIT_KEYS:
        if data.get(k):
            data[k] = _resolve(path, data[k])
        else:
            data[k] = None
    if data.get("annotations"):
        data["annotations"] = str((path / str(data["annotations"])).resolve())
    if yaml_file is not None:
        data["yaml_file"] = str(yaml_file)

    missing = _missing(data["val"])
    if missing:
        dl = data.get("download")
        if dl and autodownload:
            LOGGER.info(f"Dataset not found at {missing[0]}, fetching it as 'download' in {where} says...")
            run_download(dl, path, where)
            missing = _missing(data["val"])
        if missing:
            how = (f"its 'download' step ({dl}) did not produce it" if dl and autodownload else
                   "autodownload is off" if dl else "the yaml has no 'download' step")
            raise UserError(f"{where}: val path {missing[0]} not found ({how}); put the dataset there or fix 'path'")
    return data


def run_download(spec, root: Path, where="dataset yaml"):
    """Carry out a `download` entry (see the module docstring) for the dataset rooted at `root`. Every entry of a
    list, and where each one would write, is checked before the first one runs, so a bad entry never leaves half a
    dataset behind and nothing is fetched for a refused one."""
    items = spec if isinstance(spec, list) else [spec]
    root = check_download_root(root, where)
    steps = [_download_step(item, root, where) for item in items]
    fetches = [s for s in steps if s.func is _fetch_and_unpack]
    if fetches and root.exists() and any(root.iterdir()):
        raise UserError(f"{where}: dataset folder {root} exists and is not empty, but a download only fills a new "
                        f"folder (it never writes among files already there); empty or remove it, or put the "
                        f"missing files there by hand")
    for step in steps:
        step()


def protected_folders() -> list:
    """Where a dataset may never be written: the project's tree (its datasets/ folder aside) and the Python
    installation running it (site-packages holds .pth files that run at start-up)."""
    places = [ROOT, Path(sys.prefix), Path(sys.base_prefix), Path(sys.exec_prefix)]
    places += [Path(p) for p in site.getsitepackages() + [site.getusersitepackages()]]
    return [p.resolve() for p in places]


def check_download_root(root: Path, where: str) -> Path:
    """The resolved dataset folder a download may write into, or a UserError: it must not lie in the project's code
    or the Python installation, nor contain them."""
    root = Path(root).resolve()
    allowed_inside = (ROOT / "datasets").resolve()
    for place in protected_folders():
        inside = root.is_relative_to(place) and not (place == ROOT.resolve() and root.is_relative_to(allowed_inside)
                                                      and root != allowed_inside)
        if inside or place.is_relative_to(root):
            raise UserError(f"{where}: 'path' {root} lies {'in' if inside else 'around'} {place}, where a download "
                            f"may not write; put the dataset in a folder of its own (for example ../datasets/NAME or "
                            f"datasets/NAME)")
    return root


def _download_step(item, root: Path, where):
    """The action for one `download` entry (a functools.partial), or a UserError saying why it is not supported.
    A URL is unpacked into `root`'s parent only when the archive holds `root`'s own folder; every member must land
    in `root` (checked in _unpack)."""
    if isinstance(item, dict):
        if "url" not in item or not set(item) <= {"url", "dir"}:
            raise UserError(f"{where}: a 'download' mapping needs 'url' (and optionally 'dir'), got {item}")
        sub = str(item.get("dir") or "")
        dest = (root / sub).resolve()
        if Path(sub).is_absolute() or not dest.is_relative_to(root):
            raise UserError(f"{where}: download dir {sub!r} leaves the dataset folder {root}; 'dir' is a folder "
                            f"inside 'path', such as images")
        return functools.partial(_fetch_and_unpack, _url(item["url"], where), dest, root, where)
    if isinstance(item, str) and item.startswith("generate:"):
        name = item.split(":", 1)[1].strip()
        if name not in GENERATORS:
            raise UserError(f"{where}: download '{item}': no generator named '{name}', "
                            f"known: {', '.join(sorted(GENERATORS))}")
        return functools.partial(GENERATORS[name], root)
    if isinstance(item, str) and urlparse(item).scheme in ("http", "https", "file"):
        return functools.partial(_fetch_and_unpack, item, root.parent, root, where)
    raise UserError(f"{where}: download entry {item!r} is not supported; use a URL, {{url, dir}} or "
                    f"'generate:NAME' (code in a yaml is never run)")


def _url(url, where):
    if not isinstance(url, str) or urlparse(url).scheme not in ("http", "https", "file"):
        raise UserError(f"{where}: download url {url!r} must be an http, https or file URL")
    return url


def _fetch_and_unpack(url: str, dest: Path, root: Path, where: str):
    """Fetch `url` into a temporary file inside `root`, then unpack it into `dest` (a plain file is kept in `dest`
    as downloaded); nothing is written outside `root` and no existing file is replaced."""
    root.mkdir(parents=True, exist_ok=True)
    name = Path(urlparse(url).path).name or "download"
    tmp = root / f".{name}.part"
    LOGGER.info(f"Downloading {url} to {root}...")
    try:
        torch.hub.download_url_to_file(url, str(tmp), progress=True)
    except Exception as e:  # network errors come in many types
        tmp.unlink(missing_ok=True)
        raise UserError(f"{where}: could not download {url} ({type(e).__name__}: {e}); "
                        f"check the network or fetch it by hand into {dest}") from None
    try:
        _unpack(tmp, name, dest, root, where)
    finally:
        tmp.unlink(missing_ok=True)


def _unpack(file: Path, name: str, dest: Path, root: Path, where: str):
    lower = name.lower()
    try:
        if lower.endswith(".zip"):
            with zipfile.ZipFile(file) as z:
                members = [m for m in z.namelist() if not m.endswith("/")]
                _check_members(members, dest, root, name)
                LOGGER.info(f"Unzipping {name} into {dest}...")
                z.extractall(dest, members=[m for m in z.namelist() if _lands_in(dest / m, root)])
        elif lower.endswith((".tar", ".tar.gz", ".tgz")):
            with tarfile.open(file) as t:
                members = t.getmembers()
                bad = [m.name for m in members if not (m.isfile() or m.isdir())]
                if bad:
                    raise UserError(f"{name}: archive entry {bad[0]} is a link or device; a dataset archive holds "
                                    f"files and folders only; refusing to unpack")
                _check_members([m.name for m in members if m.isfile()], dest, root, name)
                LOGGER.info(f"Unpacking {name} into {dest}...")
                t.extractall(dest, members=[m for m in members if _lands_in(dest / m.name, root)], filter="data")
        else:
            target = dest / name
            _check_members([name], dest, root, name)
            dest.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)  # a plain file: kept as downloaded
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise UserError(f"{where}: {name} is a damaged archive ({e}); run again to fetch it anew") from None


def _lands_in(path: Path, root: Path) -> bool:
    return path.resolve().is_relative_to(root)


def _check_members(members, dest: Path, root: Path, archive: str):
    """Every file of an archive must land inside the dataset folder `root` as a new file."""
    for member in members:
        target = dest / member
        if not _lands_in(target, root):
            raise UserError(f"{archive}: archive entry {member} would land outside the dataset folder {root}; "
                            f"refusing to unpack")
        if target.exists():
            raise UserError(f"{archive}: archive entry {member} would replace {target.resolve()}; a download never "
                            f"overwrites a file; refusing to unpack")
