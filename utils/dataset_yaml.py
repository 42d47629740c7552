"""Dataset yaml files: validate them, resolve their paths, and fetch or generate missing data.

A dataset yaml (data/coco.yaml, data/shapes.yaml) holds `path`, `train`, `val`, optional `test`, `names` (a list or
an {index: name} dict) and optional `nc`, `annotations` (COCO json of the val split, relative to `path`),
`category_ids` (COCO category id of each class index) and `download`.

`download` is data, never code (upstream YOLOv5 exec()s it; this project does not):
  - `generate:NAME`     run the registered generator NAME (GENERATORS) with the dataset root as output folder;
  - a URL               fetch it into the parent of `path` and unpack it there (.zip, .tar, .tar.gz, .tgz);
  - {url: U, dir: D}    fetch U and unpack it into `path`/D;
  - a list of the two above.
"""
from __future__ import annotations

import os
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
        return [str((path / str(x)).resolve()) for x in entry]
    return str((path / str(entry)).resolve())


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
    list is checked before the first one runs, so a bad entry never leaves half a dataset behind."""
    items = spec if isinstance(spec, list) else [spec]
    steps = [_download_step(item, root, where) for item in items]
    for step in steps:
        step()


def _download_step(item, root: Path, where):
    """The action for one `download` entry, or a UserError saying why the entry is not supported."""
    if isinstance(item, dict):
        if "url" not in item:
            raise UserError(f"{where}: a 'download' mapping needs 'url' (and optionally 'dir'), got {item}")
        return lambda: _fetch_and_unpack(str(item["url"]), root / str(item.get("dir", "")), where)
    if isinstance(item, str) and item.startswith("generate:"):
        name = item.split(":", 1)[1].strip()
        if name not in GENERATORS:
            raise UserError(f"{where}: download '{item}': no generator named '{name}', "
                            f"known: {', '.join(sorted(GENERATORS))}")
        return lambda: GENERATORS[name](root)
    if isinstance(item, str) and urlparse(item).scheme in ("http", "https", "file"):
        return lambda: _fetch_and_unpack(item, root.parent, where)
    raise UserError(f"{where}: download entry {item!r} is not supported; use a URL, {{url, dir}} or "
                    f"'generate:NAME' (code in a yaml is never run)")


def _fetch_and_unpack(url: str, dest: Path, where: str):
    dest.mkdir(parents=True, exist_ok=True)
    name = Path(urlparse(url).path).name or "download"
    file = dest / name
    if not file.exists():
        LOGGER.info(f"Downloading {url} to {file}...")
        tmp = file.with_name(file.name + ".part")
        try:
            torch.hub.download_url_to_file(url, str(tmp), progress=True)
        except Exception as e:  # network errors come in many types
            tmp.unlink(missing_ok=True)
            raise UserError(f"{where}: could not download {url} ({type(e).__name__}: {e}); "
                            f"check the network or fetch it by hand into {dest}") from None
        os.replace(tmp, file)
    lower = name.lower()
    try:
        if lower.endswith(".zip"):
            LOGGER.info(f"Unzipping {file} into {dest}...")
            with zipfile.ZipFile(file) as z:
                for member in z.namelist():  # refuse entries that would land outside dest
                    if not (dest / member).resolve().is_relative_to(dest.resolve()):
                        raise UserError(f"{file}: archive entry {member} points outside {dest}; refusing to unpack")
                z.extractall(dest)
        elif lower.endswith((".tar", ".tar.gz", ".tgz")):
            LOGGER.info(f"Unpacking {file} into {dest}...")
            with tarfile.open(file) as t:
                t.extractall(dest, filter="data")
        else:
            return  # a plain file: keep it as downloaded
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as e:
        raise UserError(f"{file}: damaged archive ({e}); delete it and run again") from None
    file.unlink()
