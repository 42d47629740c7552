"""QAT checkpoints survive refactoring: a QAT model is saved as its float architecture, its QAT settings and its
state_dict (models/checkpoint.py), loads back bit for bit, still loads when a bst class is renamed, and checkpoints
that pickle the QAT modules whole (tests/data/qat_checkpoint_format1.pt, written by the code before the format
existed; tests/data/make_qat_checkpoint_format1.py) load and compute as they did."""
import zipfile
from copy import deepcopy

import pytest
import torch
from conftest import ROOT

import bst.torch.ao.quantization as bq
import bst.torch.ao.quantization.fake_quantize as fq_module
import val
from models.checkpoint import QAT_FORMAT, load_checkpoint, safe_globals, save_checkpoint
from models.quant import (
    QATConfig,
    QuantizedActivation,
    float_model,
    freeze,
    is_quantized,
    prepare_yolo_qat,
    set_fake_quant,
)
from models.yolo import DetectionModel
from utils.dataset_yaml import check_dataset
from utils.general import UserError, yaml_save

FORMAT1 = ROOT / "tests" / "data" / "qat_checkpoint_format1.pt"


def _eval_output(model, x):
    m = freeze(deepcopy(model).eval())
    with torch.no_grad():
        return m(x)[0]


def _computes_as_saved(model, format1):
    """The model's output on the saved input is the saved output. Everything up to the Detect quantizers is
    integer arithmetic and must match exactly; the sigmoid and box decoding after them run in float, whose
    vectorised kernels round the last bit differently on other CPUs (2 of 3024 values, 2 ulp, between an AVX2 and an
    AVX-512 machine), so 1e-6 relative is allowed: one quantization step of any tensor moves outputs by far more."""
    torch.testing.assert_close(_eval_output(model, format1["expected"]["input"]), format1["expected"]["output"],
                               rtol=1e-6, atol=0)
    return True


@pytest.fixture(scope="module")
def format1():
    return load_checkpoint(FORMAT1)


def test_format1_checkpoint_loads_and_computes_as_saved(format1):
    model = format1["model"]
    assert is_quantized(model) and model.qat_config.pow2 and model.model[0].conv.freeze_bn
    assert format1["qat"]["config"] == model.qat_config and format1["qat"]["schedule"] == {}
    assert _computes_as_saved(model, format1)


def test_qat_model_saved_as_float_part_settings_and_state_dict(format1, tmp_path):
    path = save_checkpoint({**format1, "ema": deepcopy(format1["model"])}, tmp_path / "v3.pt")
    assert is_quantized(format1["model"])  # the caller's dict and model are left as they were

    raw = torch.load(path, weights_only=False)  # what a tool that knows nothing of QAT sees
    assert raw["qat"]["format"] == QAT_FORMAT == 3 and raw["qat"]["config"]["bn_folding"] \
        and raw["qat"]["config"]["pow2"]  # the settings once, for model and EMA
    assert raw["qat"]["config"] == format1["model"].qat_config.record() and raw["qat"]["schedule"] == {}
    for key in ("model", "ema"):
        assert type(raw[key]) is DetectionModel
        assert not [type(m).__module__ for m in raw[key].modules() if type(m).__module__.startswith("bst")]
        state = raw["qat_state"][key]
        assert set(state) == {"state_dict", "attributes", "training"}
        assert state["attributes"]["model.0.conv"] == {"freeze_bn": True}

    back = load_checkpoint(path)
    assert "qat_state" not in back
    for key in ("model", "ema"):
        before, after = format1["model"].state_dict(), back[key].state_dict()
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert back[key].model[0].conv.freeze_bn and not back[key].model[1].conv.freeze_bn
        assert back[key].qat_config == format1["model"].qat_config and back[key].training == format1["model"].training
        assert _computes_as_saved(back[key], format1)


def test_the_float_part_runs_as_the_qat_model_without_fake_quantization(format1):
    qat = freeze(deepcopy(format1["model"]).eval())
    set_fake_quant(qat, False)
    f = float_model(format1["model"]).eval()
    x = format1["expected"]["input"]
    with torch.no_grad():
        diff = (f(x)[0] - qat(x)[0]).abs().max().item()
    assert diff < 1e-4
    f.fuse()  # upstream's inference path: Conv+BN folded
    with torch.no_grad():
        assert (f(x)[0] - qat(x)[0]).abs().max().item() < 1e-4


def test_a_renamed_bst_class_does_not_break_saved_qat_checkpoints(format1, tmp_path, monkeypatch):
    """A refactor renames FakeQuantize (and every reference to it): checkpoints of the current format still load
    and compute the same; a checkpoint that pickles the class by its old name cannot."""
    path = save_checkpoint(format1, tmp_path / "v3.pt")
    cls = fq_module.FakeQuantize
    monkeypatch.delattr(fq_module, "FakeQuantize")
    monkeypatch.setattr(fq_module, "PowerOfTwoFakeQuantize", cls, raising=False)
    cls.__name__ = cls.__qualname__ = "PowerOfTwoFakeQuantize"
    try:
        assert bq.FakeQuantize is cls  # the code that builds quantizers follows the rename
        back = load_checkpoint(path)
        assert _computes_as_saved(back["model"], format1)
        with pytest.raises(UserError, match="qat_checkpoint_format1.pt: "):
            load_checkpoint(FORMAT1)
    finally:
        cls.__name__ = cls.__qualname__ = "FakeQuantize"


def test_bad_qat_state_is_one_clear_error(format1, tmp_path):
    path = save_checkpoint(format1, tmp_path / "v3.pt")
    raw = torch.load(path, weights_only=False)
    raw["qat"]["format"] = 4
    torch.save(raw, tmp_path / "future.pt")
    with pytest.raises(UserError, match=r"future\.pt: QAT checkpoint format 4; this version of yolov5-qat reads "
                                        r"formats 2 and 3"):
        load_checkpoint(tmp_path / "future.pt")
    raw["qat"]["format"] = 3
    del raw["qat_state"]["model"]["state_dict"]["model.0.conv.bn.running_var"]
    torch.save(raw, tmp_path / "cut.pt")
    with pytest.raises(UserError, match=r"cut\.pt: the QAT state does not fit the model rebuilt from its settings"):
        load_checkpoint(tmp_path / "cut.pt")
    raw["qat_state"] = {"weights": {}}
    torch.save(raw, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=r"odd\.pt: corrupt QAT checkpoint"):
        load_checkpoint(tmp_path / "odd.pt")


def as_format2(raw) -> dict:
    """A format-3 checkpoint dict laid out as format 2 wrote it: the settings in each qat_state entry, which says
    its format; the run schedule beside the settings and the recipe's name in ckpt["qat"]."""
    qat = raw.pop("qat")
    for state in raw["qat_state"].values():
        state.update(format=2, qat=deepcopy(qat["config"]))
    raw["qat"] = {**qat["config"], "recipe": qat["config"]["recipe"].get("file", "default"), **qat["schedule"]}
    return raw


def test_settings_that_did_not_exist_yet_take_their_defaults(format1, tmp_path):
    """A QAT model quantized before --rounding / --pow2-rounding existed records neither: it rounds half to even and
    takes the power-of-two exponent by ceil, as all models did then."""
    path = save_checkpoint(format1, tmp_path / "v3.pt")
    raw = as_format2(torch.load(path, weights_only=False))
    for key in ("rounding", "pow2_rounding"):
        del raw["qat_state"]["model"]["qat"][key]
    torch.save(raw, tmp_path / "older.pt")
    model = load_checkpoint(tmp_path / "older.pt")["model"]
    assert model.qat_config.rounding == "half_even" and model.qat_config.pow2_rounding == "ceil"
    assert _computes_as_saved(model, format1)


def test_the_file_stores_each_tensor_once(format1, tmp_path):
    """The float part shares the QAT model's weights, so a format-2 file is about as large as one pickling the QAT
    modules whole."""
    path = save_checkpoint({**format1, "expected": None}, tmp_path / "v3.pt")
    torch.save({**format1, "expected": None}, tmp_path / "whole.pt")
    assert path.stat().st_size < 1.1 * (tmp_path / "whole.pt").stat().st_size


FORMAT2 = ROOT / "tests" / "data" / "qat_checkpoint_format2.pt"


@pytest.fixture(scope="module")
def format2():
    return load_checkpoint(FORMAT2)


def test_format2_checkpoint_loads_with_its_settings_and_computes_as_saved(format2):
    """tests/data/qat_checkpoint_format2.pt (tests/data/make_qat_checkpoint_format2.py, the code of the last commit
    writing format 2): a PTQ of the shipped ReLU parent with every setting away from its default."""
    model = format2["model"]
    assert is_quantized(model) and model.model[0].conv.freeze_bn and not model.model[1].conv.freeze_bn
    q = model.qat_config
    assert (q.bn_folding, q.pow2, q.pow2_rounding, q.rounding) == (True, True, "round", "half_up")
    assert q.recipe["file"] == "default.yaml" and q.recipe["rules"][0]["activation"]["per_channel"]
    assert {m.rounding for m in model.modules() if isinstance(m, bq.FakeQuantizeBase)} == {"half_up"}
    assert format2["qat"] == {"config": q, "schedule": {"calib_batches": 2, "ptq": True}}
    assert _computes_as_saved(model, format2)


def test_format2_checkpoint_validates_to_the_saved_map(format2, tmp_path):
    """val.py of the file gives what it gave when it was written (P, R, mAP50, mAP50-95 on the first 32 val images;
    the float decoding after the last quantizer may round the last bit differently on another CPU)."""
    expected = format2["expected"]["val"]
    full = check_dataset("data/shapes.yaml")
    images = sorted(p for p in (ROOT / full["val"]).iterdir() if p.suffix == ".jpg")[:expected["images"]]
    (tmp_path / "val.txt").write_text("".join(f"{p}\n" for p in images))
    yaml_save(tmp_path / "sub.yaml", {"path": str(tmp_path), "train": "val.txt", "val": "val.txt",
                                      "names": list(full["names"].values())})
    results = val.run(data=tmp_path / "sub.yaml", weights=str(FORMAT2), imgsz=expected["imgsz"],
                      batch_size=expected["batch_size"], half=False, plots=False, workers=0, project=tmp_path)[0]
    assert results[:4] == pytest.approx(expected["results"], abs=1e-4)


def test_a_moved_class_loads_under_the_name_older_files_hold(tmp_path, monkeypatch):
    """A SiLU QAT model pickled whole (as before format 2) holds models.quant.QuantizedActivation, the class's name
    before models/quant.py became a package; the allowlist maps that name to the class."""
    model = prepare_yolo_qat(DetectionModel(ROOT / "models" / "yolov5n.yaml", nc=3, act="silu").train(),
                             QATConfig(pow2=True), verbose=False)
    model.qat = model.__dict__.pop("qat_config").record()  # format 1 kept the settings in model.qat
    monkeypatch.setattr(QuantizedActivation, "__module__", "models.quant")
    torch.save({"epoch": -1, "model": model, "ema": None, "qat": None}, tmp_path / "old.pt")
    monkeypatch.undo()
    with zipfile.ZipFile(tmp_path / "old.pt") as z:
        assert b"models.quant\nQuantizedActivation" in z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    assert "models.quant.QuantizedActivation" in safe_globals()
    back = load_checkpoint(tmp_path / "old.pt")["model"]
    assert back.qat_config.pow2 and "qat" not in back.__dict__
    assert sum(type(m) is QuantizedActivation for m in back.modules()) == sum(
        type(m) is QuantizedActivation for m in model.modules()) > 0


def test_format2_checkpoint_saved_again_is_format3_with_the_same_model(format2, tmp_path):
    path = save_checkpoint(format2, tmp_path / "v3.pt")
    raw = torch.load(path, weights_only=False)
    assert raw["qat"]["format"] == 3 and raw["qat"]["schedule"] == {"calib_batches": 2, "ptq": True}
    back = load_checkpoint(path)
    assert back["qat"] == format2["qat"] and back["model"].qat_config == format2["model"].qat_config
    assert _computes_as_saved(back["model"], format2)
