"""qat_report.py: structure dump, flow diagram, activation report (exact statistics on known data, and the
CLI on a float checkpoint), sensitivity recipes and ranking, one-line errors."""
import csv
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, reference, shapes_subset

import bst.torch.ao.quantization as bq
import qat_report as qr
from models.quant import QATConfig, load_recipe
from utils.general import UserError

ENV = {**os.environ, "NO_COLOR": "1", "OMP_NUM_THREADS": "1"}
FAST = ["--img", "64", "--batch-size", "4", "--workers", "0"]
POW2 = QATConfig(pow2=True)  # the settings of the sensitivity checks


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return shapes_subset(tmp_path_factory.mktemp("report_shapes"), 8, 6)


@pytest.fixture(scope="module")
def float_model():
    return qr.load_float_model(reference("yolov5n_relu.pt"))


def _main(*args):
    return qr.main(qr.parse_opt([str(a) for a in args]))


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _is_pow2(x: float) -> bool:
    return x > 0 and math.frexp(x)[0] == 0.5


def test_structure_yolov5m_with_the_seed_flags(tmp_path):
    out = _main("--task", "structure", "--cfg", "models/yolov5m.yaml", "--act", "relu", "--nc", "80",
                "--bn-folding", "--pow2-scale", "--out", tmp_path / "m.txt")
    text = out.read_text()
    for s in ("ConvBnReLU2d", "FloatFunctional", "FakeQuantize", "QuantStub", "pow2=True", "bn_folding=True",
              "yolov5m.yaml, act=relu, nc=80", "--bn-folding --pow2-scale"):
        assert s in text, s
    assert "pow2=False" not in text
    # every Conv block is a ConvBnReLU2d with its own weight quantizer; the 3 Detect convs are plain QAT convs
    assert text.count("(weight_fake_quant)") == text.count(": ConvBnReLU2d(") + 3
    assert text.count(": ConvBnReLU2d(") == 79  # yolov5m.yaml: 79 Conv blocks

    # without --bn-folding BN is folded first (ConvReLU2d), without --pow2-scale scales are linear
    text = _main("--task", "structure", "--cfg", "yolov5n.yaml", "--out", tmp_path / "n.txt").read_text()
    assert "ConvReLU2d" in text and "ConvBnReLU2d" not in text and "BatchNorm2d" not in text
    assert "pow2=True" not in text and "pow2=False" in text


def test_flow_diagram_png(tmp_path):
    from PIL import Image

    out = _main("--task", "flow", "--out", tmp_path / "flow.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert 20_000 < out.stat().st_size < 500_000
    w, h = Image.open(out).size
    assert w >= 1000 and h >= 800


def test_activation_statistics_are_exact_on_known_data():
    """Two quantizers see the same tensor: a fixed 2**-4 qint8 grid (range [-8, 7.9375]) that saturates the tails
    of N(0, 6), and a pow2 min/max quantizer that covers everything."""
    fixed = bq.FixedQParamsFakeQuantize(observer=bq.FixedQParamsObserver.with_args(
        scale=2 ** -4, zero_point=0, dtype=torch.qint8, qscheme=torch.per_tensor_affine, quant_min=-128,
        quant_max=127))
    minmax = bq.FakeQuantize(observer=bq.MinMaxObserver, dtype=torch.qint8, qscheme=torch.per_tensor_affine,
                             quant_min=-128, quant_max=127, pow2=True)
    model = nn.Sequential(fixed, minmax)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(2, 3, 50, 40, generator=g) * 6 * 255,) for _ in range(3)]  # the report divides by 255
    dirty = batches[0][0].clone()  # non-finite values are skipped, as the observers skip them
    dirty.view(-1)[[5, 77, 900]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    batches.append((dirty,))
    rows, hists = qr.activation_report(model, batches, "cpu", percentile=99.9, bins=64)

    x = torch.cat([b[0].float().flatten() / 255 for b in batches]).double().numpy()
    x = x[np.isfinite(x)]
    n = x.size
    k = math.ceil(0.001 * n)
    srt = np.sort(x)
    assert [r["name"] for r in rows] == ["0", "1"]
    for r in rows:
        assert r["n"] == n and r["min"] == srt[0] and r["max"] == srt[-1]
        assert r["p0.1"] == srt[k - 1] and r["p99.9"] == srt[-k]
        assert hists[r["name"]][0].sum() == n
    f, m = rows
    assert f["scale"] == 2 ** -4 and f["zero_point"] == 0 and (f["range_lo"], f["range_hi"]) == (-8.0, 127 / 16)
    below, above = (x < -128.5 / 16).mean(), (x > 127.5 / 16).mean()
    assert 0.05 < below + above < 0.3
    assert f["clipped_low"] == pytest.approx(below, abs=1e-12) and f["clipped_high"] == pytest.approx(above, abs=1e-12)
    assert _is_pow2(m["scale"]) and m["clipped"] == 0.0
    assert m["range_lo"] <= srt[0] and m["range_hi"] >= srt[-1]


def test_per_channel_quantizer_saturation_counted_channel_by_channel():
    """A per-channel output quantizer (axis 1, as the default recipe gives the Detect convs): each channel's values
    are compared with that channel's own grid; the row gives the coarsest scale, the finest and the channel count."""
    per_channel = bq.FakeQuantize(observer=bq.PerChannelMinMaxObserver, ch_axis=1, dtype=torch.qint8,
                                  qscheme=torch.per_channel_symmetric, quant_min=-128, quant_max=127, pow2=True,
                                  pow2_rounding="round")  # nearest power of two in log2: clips some channels
    g = torch.Generator().manual_seed(0)
    spread = torch.tensor([1.0, 7.0, 40.0]).reshape(1, 3, 1, 1)
    batches = [(torch.randn(2, 3, 30, 20, generator=g) * spread * 255,) for _ in range(3)]
    rows, _ = qr.activation_report(nn.Sequential(per_channel), batches, "cpu", percentile=99.9, bins=32)
    (r,) = rows
    x = torch.cat([b[0] / 255 for b in batches]).double()
    scale = per_channel.scale.double().reshape(1, 3, 1, 1)
    below = (x < -128.5 * scale).sum().item() / x.numel()
    above = (x > 127.5 * scale).sum().item() / x.numel()
    assert below + above > 0  # round mode clips: the count is not trivially zero
    assert r["clipped_low"] == pytest.approx(below, abs=1e-12) and r["clipped_high"] == pytest.approx(above, abs=1e-12)
    assert r["channels"] == 3 and r["scale"] == float(per_channel.scale.max())
    assert r["scale_min"] == float(per_channel.scale.min()) < r["scale"]
    assert (r["range_lo"], r["range_hi"]) == (-128 * r["scale"], 127 * r["scale"])


def test_activations_cli_uses_the_recipe_and_pow2(tiny, tmp_path, float_model):
    recipe = "exp10_pow2_last_fixed.yaml"  # moving-average observers, Detect convs fixed at 8/128
    csv_file = _main("--task", "activations", "--weights", reference("yolov5n_relu.pt"), "--data", tiny, *FAST,
                     "--calib-batches", "2", "--pow2-scale", "--qat-recipe", recipe, "--out", tmp_path / "act",
                     "--notes", tmp_path / "notes")
    rows = _csv(csv_file)
    expected = qr.activation_quantizers(qr.prepared(float_model, POW2, recipe))
    assert len(rows) == len(expected)
    assert {r["name"] for r in rows} == {qr.short_name(n) for n, _ in expected}
    assert rows[0]["layer"] == "input"  # first-call order: the input stub runs first
    for r in rows:
        vals = {k: float(r[k]) for k in ("min", "max", "p0.01", "p99.99", "scale", "range_lo", "range_hi",
                                         "clipped_low", "clipped_high", "clipped")}
        assert all(math.isfinite(v) for v in vals.values()), r
        assert vals["min"] <= vals["p0.01"] <= vals["p99.99"] <= vals["max"], r
        assert 0.0 <= vals["clipped"] <= 1.0 and vals["clipped"] == pytest.approx(vals["clipped_low"] +
                                                                                  vals["clipped_high"])
        assert _is_pow2(vals["scale"]), r
        if r["name"].startswith("model.24.m."):
            assert vals["scale"] == 0.0625 and int(r["zero_point"]) == 0
            assert r["quantizer"] == "FixedQParamsFakeQuantize"
        elif r["layer"] != "input":
            assert r["observer"] == "MovingAverageMinMaxObserver"
    last = tmp_path / "notes" / "last_conv_act.png"
    assert last.is_file() and 10_000 < last.stat().st_size < 500_000
    assert (tmp_path / "act" / "hist" / "layer_24.png").is_file()


def test_layer_recipes_quantize_exactly_the_layer(float_model):
    base = load_recipe(None)
    everything = set(qr.quantizers_per_layer(qr.prepared(float_model, POW2, base)))
    assert 11 not in everything and {0, 24} <= everything  # model.11 is an Upsample: nothing to quantize
    assert set(qr.quantizers_per_layer(qr.prepared(float_model, POW2, qr.layer_recipe(base, 24, "one")))) \
        == {24}
    assert set(qr.quantizers_per_layer(qr.prepared(float_model, POW2, qr.layer_recipe(base, 0, "all-but-one")))) \
        == everything - {0}
    # the recipe's own rule for that layer still applies when it is quantized alone
    fixed = load_recipe("exp10_pow2_last_fixed.yaml")
    q = qr.prepared(float_model, POW2, qr.layer_recipe(fixed, 24, "one"))
    assert isinstance(q.model[24].m[0].activation_post_process, bq.FixedQParamsFakeQuantize)
    assert set(qr.quantizers_per_layer(q)) == {24}


def test_sensitivity_ranks_the_layers(tiny, tmp_path):
    csv_file = _main("--task", "sensitivity", "--weights", reference("yolov5n_relu.pt"), "--data", tiny, *FAST,
                     "--calib-batches", "1", "--pow2-scale", "--layers", "24", "0", "11", "--max-images", "4",
                     "--out", tmp_path / "sens")
    rows = _csv(csv_file)
    assert [int(r["rank"]) for r in rows] == [1, 2]
    assert sorted(int(r["layer"]) for r in rows) == [0, 24]  # 11 (Upsample) skipped
    assert {r["layer"]: int(r["quantizers"]) for r in rows} == {"0": 2, "24": 6}
    maps = [(float(r["mAP50"]), float(r["mAP50-95"]), float(r["drop_vs_float"])) for r in rows]
    assert all(math.isfinite(v) and -1 <= v <= 1 for m in maps for v in m)
    assert maps[0][2] >= maps[1][2]  # ranked by mAP lost
    subset = (tmp_path / "sens" / "val_subset.txt").read_text().split()
    first = [ln for ln in (tiny.parent / "tiny_val.txt").read_text().split()][:4]
    assert subset == first


def test_quantizer_kinds_cover_every_quantizer_once(float_model):
    q = qr.prepared(float_model, POW2)
    kinds = {}
    for name, _ in qr.quantizers(q):
        kinds.setdefault(qr.quantizer_kind(name, 24), []).append(name)
    assert set(kinds) == set(qr.KINDS) - {"activation"}
    assert kinds["input"] == ["input_quant.activation_post_process"]
    assert len(kinds["weights"]) == 60 and all(n.endswith("weight_fake_quant") for n in kinds["weights"])
    assert len(kinds["Detect"]) == 3 and all(".qadd." in n or ".qcat." in n for n in kinds["add/concat"])
    assert sum(map(len, kinds.values())) == len(qr.quantizers(q))


def test_sensitivity_by_kind_turns_each_kind_off_after_one_calibration(tiny, tmp_path):
    csv_file = _main("--task", "sensitivity", "--mode", "kinds", "--weights", reference("yolov5n_relu.pt"), "--data",
                     tiny, *FAST, "--calib-batches", "1", "--pow2-scale", "--max-images", "4", "--out", tmp_path / "k")
    rows = _csv(csv_file)
    assert sorted(r["module"] for r in rows) == sorted(qr.KINDS)
    assert [int(r["rank"]) for r in rows] == [1, 2, 3, 4, 5, 6]
    recovered = [float(r["recovered_vs_all"]) for r in rows]
    assert recovered == sorted(recovered, reverse=True) and all(math.isfinite(v) for v in recovered)
    count = {r["module"]: int(r["quantizers"]) for r in rows}
    assert count["activation"] == count["input"] + count["conv/table"] + count["add/concat"] + count["Detect"]
    summary = (tmp_path / "k" / "sensitivity_summary.yaml").read_text()
    assert "all_quantized_mAP50-95" in summary
    with pytest.raises(UserError, match="--mode kinds"):
        _main("--task", "sensitivity", "--mode", "kinds", "--layers", "0", "--weights", reference("yolov5n_relu.pt"),
              "--data", tiny, *FAST, "--out", tmp_path / "x")


def test_bad_layers_are_a_user_error(tiny, tmp_path):
    with pytest.raises(UserError, match="--layers"):
        _main("--task", "sensitivity", "--weights", reference("yolov5n_relu.pt"), "--data", tiny, *FAST,
              "--layers", "25", "--out", tmp_path / "x")


@pytest.mark.parametrize("args, fragment", [
    (["--task", "histogram"], "--task 'histogram'"),
    (["--task", "activations", "--weights", "no/such/weights.pt"], "no/such/weights.pt"),
])
def test_bad_input_is_one_line_exit_2(args, fragment, tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "qat_report.py"), *args, "--out", str(tmp_path / "o")],
                       cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stdout[-2000:] + r.stderr[-2000:]
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ERROR: ") and fragment in lines[0], r.stderr
