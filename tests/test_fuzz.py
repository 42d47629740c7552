"""Fuzzing what users hand to train.py / val.py: data yamls, label files and QAT recipes.

Whatever hypothesis generates must end in success or in one UserError (what every CLI prints as one `ERROR:` line
with exit status 2); any other exception is a traceback a user would see, and fails the test. The examples are
derandomized so `make test` is reproducible; YOLOV5_FUZZ_EXAMPLES=N runs N examples per target with fresh random
draws (for a longer search by hand).
"""
import inspect
import os
import tempfile
from copy import deepcopy
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from models.quant import MODES, OBSERVERS, QATConfig, load_recipe, prepare_yolo_qat
from models.quant.recipe import _PROJECT_OBSERVER_ARGS
from models.yolo import DetectionModel
from utils.dataloaders import LoadImagesAndLabels, create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import ROOT, UserError

EXAMPLES = int(os.getenv("YOLOV5_FUZZ_EXAMPLES", "0"))
FUZZ = settings(max_examples=EXAMPLES or 40, derandomize=not EXAMPLES, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
HYP = dict(hsv_h=0.015, hsv_s=0.7, hsv_v=0.4, degrees=5.0, translate=0.1, scale=0.5, shear=2.0, perspective=0.0005,
           flipud=0.5, fliplr=0.5, mosaic=1.0, mixup=0.5, copy_paste=0.0)

# --- building blocks -------------------------------------------------------------------------------------------------

WORDS = ["", "0", "1", "-1", "3", "255", "500", "0.5", "1e9", "nan", "inf", "-inf", "abc", "8/128", "1/0", "2**-4",
         "model.24", "24", "*", "model.*.cv1", "qint8", "quint8", "mse", "minmax", "percentile", "moving_average",
         "track", "search", "float", "quantize", "weight_only", "images/train", "images/val", "labels", "~", "..",
         "/", "é", "\x00", "true", "null", "[a, b]"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(-300, 300), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(WORDS), st.text(max_size=8))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
    st.sampled_from(WORDS) | st.integers(-2, 12), inner, max_size=3), max_leaves=8)


def either(specific):
    """Mostly well-formed entries, sometimes anything at all."""
    return st.one_of(specific, specific, specific, values)


def write_yaml(data, folder, name):
    f = Path(folder) / name
    f.write_text(data if isinstance(data, str) else yaml.safe_dump(data, allow_unicode=True))
    return f


def ends_well(fn, *args, **kwargs):
    """'ok', or 'refused' for a one-line UserError; anything else propagates and fails the example."""
    try:
        fn(*args, **kwargs)
        outcome = "ok"
    except UserError as e:
        assert "\n" not in str(e).strip(), str(e)
        outcome = "refused"
    event(f"{getattr(fn, '__name__', 'step')}: {outcome}")  # shown by pytest --hypothesis-show-statistics
    return outcome


def write_images(folder, n=4):
    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h, w = [(64, 96), (80, 64), (48, 48), (100, 70)][i % 4]
        cv2.imwrite(str(folder / "images" / f"{i}.jpg"), rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
    return folder / "images"


def load_every_item(ds):
    """What the loaders of train.py and val.py do with a dataset: every sample (augmented ones by (index, seed)
    pairs, as the training sampler gives them), and a collated batch."""
    items = [ds[(i, i) if ds.augment else i] for i in range(len(ds))]
    LoadImagesAndLabels.collate_fn(items)


# --- label files ----------------------------------------------------------------------------------------------------

NUMBER = st.sampled_from(["0", "1", "2", "3", "-1", "0.5", "0.25", "1.0", "1.5", "-0.1", "1e-9", "1e9", "nan", "inf",
                          "0x1", "abc", "0.5,", "½"])
label_line = st.one_of(st.lists(NUMBER, min_size=0, max_size=12).map(" ".join),
                       st.tuples(st.sampled_from(["0", "1", "2", "5", "-1"]),
                                 *[st.floats(-0.2, 1.2, allow_nan=False)] * 4).map(
                           lambda t: " ".join([t[0], *(f"{x:.4f}" for x in t[1:])])),
                       st.text(max_size=20))
label_file = st.one_of(st.none(), st.lists(label_line, max_size=6).map("\n".join),
                       st.binary(max_size=40))


@FUZZ
@given(labels=st.lists(label_file, min_size=4, max_size=4), augment=st.booleans(), rect=st.booleans())
def test_label_files_load_or_are_refused_in_one_line(labels, augment, rect):
    with tempfile.TemporaryDirectory() as tmp:
        images = write_images(Path(tmp))
        (Path(tmp) / "labels").mkdir()
        for i, text in enumerate(labels):
            f = Path(tmp) / "labels" / f"{i}.txt"
            if isinstance(text, bytes):
                f.write_bytes(text)
            elif text is not None:
                f.write_text(text, encoding="utf-8", errors="surrogatepass")
        ds = []
        outcome = ends_well(lambda: ds.append(LoadImagesAndLabels(str(images), img_size=64, batch_size=2,
                                                                  augment=augment, hyp=HYP, rect=rect, nc=3)))
        if outcome == "ok":
            load_every_item(ds[0])
            for lb in ds[0].labels:  # what survived is what training can use
                assert lb.shape[1] == 5 and np.isfinite(lb).all() and ((lb[:, 0] >= 0) & (lb[:, 0] < 3)).all()
                assert ((lb[:, 1:] >= 0) & (lb[:, 1:] <= 1)).all()


# --- data yamls -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dataset_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz_data")
    images = write_images(root)
    (root / "labels").mkdir()
    for i in range(4):
        (root / "labels" / f"{i}.txt").write_text(f"{i % 3} 0.5 0.5 0.3 0.4\n")
    (root / "list.txt").write_text("images/0.jpg\n./images/1.jpg\nimages/missing.jpg\n")
    return root, images


good_split = st.sampled_from(["images", "list.txt", "images/0.jpg", ["images", "list.txt"]])
split = st.one_of(good_split, st.sampled_from(["nothere", "", "ROOT", "labels/0.txt", ["images", ""], {}]))
names = st.one_of(st.lists(st.sampled_from(["a", "b", "c", "", "é"]), min_size=1, max_size=3),
                  st.dictionaries(st.integers(-1, 3), st.sampled_from(["a", "b", "c"]), max_size=3))
FIELDS = {"path": st.sampled_from(["ROOT", "ROOT/sub", "", "relative/nowhere", "ROOT/images/0.jpg"]),
          "train": split, "val": split, "test": split, "nc": st.integers(-1, 5), "names": names,
          "category_ids": st.lists(st.integers(0, 90) | st.sampled_from(["a", "1.5", True]), max_size=3),
          "annotations": st.sampled_from(["ann.json", "list.txt", "nothere.json"]),
          "download": st.sampled_from([None, 0, "", [], {}, "nope.sh", {"dir": "x"}, ["bad entry"]]),
          "extra": values}
# a usable yaml with up to three fields changed, each to a plausible or to an arbitrary value
data_yaml = st.builds(lambda base, changes: {**base, **changes},
                      st.fixed_dictionaries({"path": st.just("ROOT"), "train": good_split, "val": good_split,
                                             "names": st.just(["a", "b", "c"])}),
                      st.lists(st.sampled_from(sorted(FIELDS)), max_size=3, unique=True).flatmap(
                          lambda keys: st.fixed_dictionaries({k: either(FIELDS[k]) for k in keys})))


def _rooted(v, root):
    if isinstance(v, str):
        return v.replace("ROOT", str(root))
    if isinstance(v, list):
        return [_rooted(x, root) for x in v]
    return v


@FUZZ
@given(spec=st.one_of(data_yaml, data_yaml, data_yaml, values, st.text(max_size=30)))
def test_data_yamls_load_or_are_refused_in_one_line(dataset_root, spec):
    root, _ = dataset_root
    spec = {k: _rooted(v, root) for k, v in spec.items()} if isinstance(spec, dict) else spec
    with tempfile.TemporaryDirectory() as tmp:
        f = write_yaml(spec, tmp, "data.yaml")
        data = []
        if ends_well(lambda: data.append(check_dataset(f))) == "ok":
            d = data[0]
            ends_well(lambda: load_every_item(create_dataloader(d["val"], 64, 2, 32, augment=True, hyp=HYP, workers=0,
                                                                nc=d["nc"])[1]))


# --- recipes ---------------------------------------------------------------------------------------------------------

OPTIONS = sorted({p for o in OBSERVERS.values() for p in inspect.signature(o).parameters} - _PROJECT_OBSERVER_ARGS)
number = st.one_of(st.integers(-5, 300), st.floats(-2, 200), st.sampled_from([0, 1, 50, 99.9, 100, 150, float("nan")]))
observer = st.fixed_dictionaries({"observer": either(st.sampled_from(sorted(OBSERVERS)))}).flatmap(
    lambda d: st.dictionaries(st.sampled_from(OPTIONS), either(number) | st.sampled_from(["track", "search"]),
                              max_size=2).map(lambda o: {**d, **o}))
fixed = st.fixed_dictionaries({"fixed": either(st.fixed_dictionaries(
    {"scale": either(st.sampled_from(["8/128", "1/16", "0.0625", "3/128", "1/0", "abc", "nan", 0, -1, 0.5, 2])),
     "zero_point": either(st.sampled_from([0, 128, 255, 500, -1, "abc"]))},
    optional={"dtype": either(st.sampled_from(["qint8", "quint8", "int4"]))}))})
activation = either(st.one_of(observer, fixed))
rule = st.fixed_dictionaries({"match": either(st.sampled_from([24, "24", "model.24", "model.24.m.*", "model.0.conv",
                                                               "model.99", "nomatch*", 0]))},
                             optional={"mode": either(st.sampled_from(MODES)), "activation": activation,
                                       "learnable": either(st.booleans())})
recipe = st.fixed_dictionaries({}, optional={
    "description": values,
    "default": either(st.fixed_dictionaries({}, optional={"activation": activation,
                                                          "learnable": either(st.booleans())})),
    "rules": either(st.lists(rule, max_size=3)),
    "concat": either(st.fixed_dictionaries({}, optional={"share_input_scales": either(st.booleans())}))})


@pytest.fixture(scope="module")
def float_model():
    torch.manual_seed(0)
    return DetectionModel(ROOT / "models/yolov5n.yaml", nc=3, act="relu").train()


@FUZZ
@given(spec=st.one_of(recipe, recipe, recipe, values), pow2=st.booleans(), bn_folding=st.booleans())
def test_recipes_prepare_or_are_refused_in_one_line(float_model, spec, pow2, bn_folding):
    """A recipe the schema accepts must also prepare, calibrate and train a step; one it refuses is one line."""
    with tempfile.TemporaryDirectory() as tmp:
        f = write_yaml(spec, tmp, "recipe.yaml")
        if ends_well(load_recipe, f) == "ok":
            model = []
            config = QATConfig(bn_folding=bn_folding, pow2=pow2, recipe=f)
            if ends_well(lambda: model.append(prepare_yolo_qat(deepcopy(float_model), config))) == "ok":
                m = model[0]
                x = torch.rand(2, 3, 64, 64)
                m(x)  # observers on: calibration
                out = m(x)
                assert all(torch.isfinite(o).all() for o in out)
                sum(o.sum() for o in out).backward()
