"""YOLO-side QAT glue: fusion, functional quantizers, recipes, schedules and checkpoint round trips."""
from copy import deepcopy

import pytest
import torch
import torch.nn as nn
from conftest import ROOT

from bst.torch.ao.nn.quantized import FloatFunctional
from bst.torch.ao.quantization import FakeQuantizeBase, quantizer_parameters, quantizer_state_keys
from models.checkpoint import load_checkpoint, save_checkpoint
from models.common import C3, SPPF, Bottleneck, Concat
from models.quant import (
    QATConfig,
    all_scales_pow2,
    apply_schedule,
    calibrate,
    freeze,
    load_recipe,
    prepare_yolo_qat,
    set_fake_quant,
    set_observers,
)
from models.yolo import DetectionModel
from utils.general import UserError
from utils.torch_utils import ModelEMA, averaged_state_keys, parameter_groups


def small_model(act="relu"):
    torch.manual_seed(0)
    return DetectionModel(ROOT / "models/yolov5n.yaml", nc=4, act=act)


def calibrated(model, n=2):
    batches = [(torch.randint(0, 255, (2, 3, 96, 96), dtype=torch.uint8),) for _ in range(n)]
    calibrate(model, batches, n, torch.device("cpu"))
    return model


def test_bn_folding_flag_keeps_or_removes_bn():
    live = prepare_yolo_qat(small_model(), QATConfig(bn_folding=True, pow2=False))
    folded = prepare_yolo_qat(small_model(), QATConfig(bn_folding=False, pow2=False))
    assert sum(isinstance(m, nn.BatchNorm2d) for m in live.modules()) == 57  # one per Conv block, inside ConvBn
    assert sum(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) == 0


def test_every_add_concat_and_detect_conv_is_quantized():
    model = small_model()
    n_add = sum(isinstance(m, Bottleneck) and m.add for m in model.modules())
    n_cat = sum(isinstance(m, (C3, SPPF, Concat)) for m in model.modules())
    prepare_yolo_qat(model, QATConfig(bn_folding=True, pow2=True))
    adds = [m for m in model.modules() if isinstance(m, Bottleneck) and m.add]
    cats = [m for m in model.modules() if isinstance(m, (C3, SPPF, Concat))]
    assert len(adds) == n_add == 7 and len(cats) == n_cat == 13  # yolov5n: C3 repeats 1+2+3+1 with shortcut
    assert all(isinstance(m.qadd.activation_post_process, FakeQuantizeBase) for m in adds)
    assert all(isinstance(m.qcat.activation_post_process, FakeQuantizeBase) for m in cats)
    for conv in model.model[-1].m:
        assert hasattr(conv, "weight_fake_quant") and isinstance(conv.activation_post_process, FakeQuantizeBase)
    assert isinstance(model.input_quant.activation_post_process, FakeQuantizeBase)


def test_pow2_scales_survive_calibration_training_ema_and_checkpoint(tmp_path):
    model = calibrated(prepare_yolo_qat(small_model(), QATConfig(bn_folding=True, pow2=True)))
    assert all_scales_pow2(model)
    ema = ModelEMA(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    set_observers(model, True)  # observers keep updating during these steps
    for _ in range(2):
        out = model(torch.rand(2, 3, 96, 96))
        sum(o.float().pow(2).mean() for o in out).backward()
        opt.step()
        opt.zero_grad()
        ema.update(model)
    assert all_scales_pow2(model) and all_scales_pow2(ema.ema)
    save_checkpoint({"model": deepcopy(ema.ema).half()}, tmp_path / "q.pt")
    back = load_checkpoint(tmp_path / "q.pt")["model"]
    assert all_scales_pow2(back)
    assert all(m.scale.dtype == torch.float32 for m in back.modules() if isinstance(m, FakeQuantizeBase))


def test_ema_averages_weights_and_copies_quantizer_state():
    """The EMA averages weights and BN statistics but copies every quantizer entry (bst's quantizer_state_keys),
    learnable scales included; those scales get no weight decay."""
    recipe = {"default": {"activation": {"observer": "minmax"}, "learnable": True}}
    model = calibrated(prepare_yolo_qat(small_model(), QATConfig(bn_folding=True, pow2=True, recipe=recipe)))
    learnable = quantizer_parameters(model)
    keys = quantizer_state_keys(model)
    assert learnable and any(k.endswith("log2_scale") for k in keys) and not keys & averaged_state_keys(model)
    decay, no_decay, _ = parameter_groups(model)
    assert all(any(p is q for q in no_decay) for p in learnable) and not any(p is q for q in decay for p in learnable)

    ema = ModelEMA(model, updates=10 ** 6)  # decay 0.9999
    before = deepcopy(ema.ema.state_dict())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update(model)
    now, live = ema.ema.state_dict(), model.state_dict()
    for k in keys:
        assert torch.equal(now[k], live[k]), k
    w = "model.0.conv.weight"
    torch.testing.assert_close(now[w], before[w] * 0.9999 + live[w] * 0.0001, rtol=1e-5, atol=1e-6)
    assert not torch.equal(now[w], live[w])


def test_schedule_freezes_bn_and_observers():
    model = calibrated(prepare_yolo_qat(small_model(), QATConfig(bn_folding=True, pow2=True)))
    apply_schedule(model, epoch=1, freeze_bn_epoch=1, disable_observer_epoch=1)
    model.train()
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running_" in k or k.endswith(".scale")}
    model(torch.rand(2, 3, 96, 96) * 3)  # a very different input range
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in stats.items())
    apply_schedule(model, epoch=0, freeze_bn_epoch=1, disable_observer_epoch=1)
    with torch.no_grad():  # the first conv's outputs grow 4x: with observers on, their scale follows
        model.model[0].conv.weight.mul_(4)
    for _ in range(5):
        model(torch.rand(2, 3, 96, 96))
    first = "model.0.conv.activation_post_process.scale"
    assert model.state_dict()[first] == 4 * stats[first], "observers on: the activation scale must follow the range"


def test_recipes_exclude_and_fix_the_detect_convs():
    model = prepare_yolo_qat(small_model(), QATConfig(pow2=True, recipe={"rules": [{"match": "24", "mode": "float"}]}))
    detect = model.model[24]
    assert all(type(c) is nn.Conv2d for c in detect.m)
    assert not any(isinstance(m, FakeQuantizeBase) for m in detect.modules())
    fixed = {"rules": [{"match": "model.24.m.*", "activation": {"fixed": {"scale": "8/128", "zero_point": 0}}}]}
    model = calibrated(prepare_yolo_qat(small_model(), QATConfig(pow2=True, recipe=fixed)))
    for c in model.model[24].m:
        assert c.activation_post_process.scale.item() == 0.0625
        assert c.activation_post_process.quant_min == -128
    with pytest.raises(UserError, match="names no module"):
        prepare_yolo_qat(small_model(), QATConfig(recipe={"rules": [{"match": "model.99", "mode": "float"}]}))
    with pytest.raises(UserError, match="observer 'bogus' unknown"):
        load_recipe({"rules": [{"match": "0", "activation": {"observer": "bogus"}}]})
    for bad in ({"observer": "minmax", "training_update": "track"}, {"observer": "mse", "training_update": "often"}):
        with pytest.raises(UserError, match="training_update .* mse and mse_histogram observers take track"):
            load_recipe({"default": {"activation": bad}})


BAD_RECIPES = [  # (recipe, the message must say)
    ([{"match": "0"}], "recipe: must be a mapping .* got a list"),
    ({"default": {"activation": {"fixed": {"scale": "abc", "zero_point": 0}}}}, "fixed scale 'abc' must be a positive"),
    ({"default": {"activation": {"fixed": {"scale": 0, "zero_point": 0}}}}, "fixed scale 0 must be a positive"),
    ({"default": {"activation": {"fixed": {"scale": -1, "zero_point": 0}}}}, "fixed scale -1 must be a positive"),
    ({"default": {"activation": {"fixed": {"scale": "1/0", "zero_point": 0}}}}, "fixed scale '1/0' must be"),
    ({"default": {"activation": {"fixed": {"scale": "nan", "zero_point": 0}}}}, "fixed scale 'nan' must be"),
    ({"default": {"activation": {"fixed": {"scale": 0.0625, "zero_point": "abc"}}}}, "zero_point 'abc' must be an int"),
    ({"default": {"activation": {"fixed": {"scale": 0.0625, "zero_point": 500}}}}, "zero_point 500 must be an integer"),
    ({"default": {"activation": {"fixed": {"scale": 0.0625}}}}, "fixed activation needs scale and zero_point"),
    ({"default": {"activation": {"observer": "mse_histogram", "bins": 3}}}, "mse_histogram observer: bins=3 must be"),
    ({"default": {"activation": {"observer": "mse_histogram", "num_samples": 64}}}, "num_samples"),
    ({"default": {"activation": {"observer": "percentile", "percentile": 150}}},
     r"percentile observer: percentile=150 must be in \(50, 100\]"),
    ({"default": {"activation": {"observer": "percentile", "percentile": "high"}}},
     "option percentile 'high' must be a number"),
    ({"default": {"activation": {"observer": "mse", "bins": 3}}},
     r"unknown key\(s\) \['bins'\]; allowed: .*num_samples"),
    ({"default": {"activation": {"observer": "minmax", "pow2": True}}}, r"unknown key\(s\) \['pow2'\]"),
    ({"default": {"activation": {"observer": "mse", "fixed": {"scale": 1, "zero_point": 0}}}}, "activation must be"),
    ({"default": {"learnable": "yes"}}, "learnable 'yes' must be true or false"),
    ({"default": [1]}, "default must be a mapping"),
    ({"rules": {"match": "0"}}, "rules must be a list"),
    ({"rules": [{"match": "0", "color": "red"}]}, r"rule 0: unknown key\(s\) \['color'\]"),
    ({"rules": [{"match": ["0"]}]}, "match .* must be a model index"),
    ({"concat": {"share_input_scales": "sometimes"}}, "share_input_scales 'sometimes' must be true or false"),
    ({"concat": ["share_input_scales"]}, "concat must be a mapping"),
]


@pytest.mark.parametrize("recipe,message", BAD_RECIPES)
def test_bad_recipe_values_are_one_line_before_any_model_is_touched(recipe, message):
    with pytest.raises(UserError, match=message) as e:
        load_recipe(recipe)
    assert "\n" not in str(e.value)


def test_fixed_scale_must_be_a_power_of_two_with_pow2(tmp_path):
    path = tmp_path / "tenth.yaml"
    path.write_text("rules:\n  - match: model.24.m.*\n    activation: {fixed: {scale: 0.1, zero_point: 0}}\n")
    prepare_yolo_qat(small_model(), QATConfig(pow2=False, recipe=str(path)))  # linear scales: fine
    with pytest.raises(UserError, match="tenth.yaml: rule 0: fixed scale 0.1 is not a power of two"):
        prepare_yolo_qat(small_model(), QATConfig(pow2=True, recipe=str(path)))


@pytest.mark.parametrize("update", ["track", "search"])
def test_default_recipe_observers_on_track_or_search_as_the_recipe_says(update):
    """--qat without --disable-observer-epoch trains with observers on: the MSE calibrators keep the calibrated
    qparams and follow the batch range with one min/max per step, unless the recipe asks for the search."""
    recipe = load_recipe(None)
    if update == "search":
        recipe["default"]["activation"]["training_update"] = "search"
    model = calibrated(prepare_yolo_qat(small_model(), QATConfig(pow2=True, recipe=recipe)), n=3)
    calibrated_scales = {n: m.scale.clone() for n, m in model.named_modules() if isinstance(m, FakeQuantizeBase)}
    apply_schedule(model, 0, -1, -1)  # epoch 0: observers on, fake quantization on
    searches = []
    for m in model.modules():
        if hasattr(m, "_search_qparams"):
            m._search_qparams = (lambda f: lambda: searches.append(1) or f())(m._search_qparams)
    model.train()
    x = torch.randint(0, 255, (2, 3, 96, 96), dtype=torch.uint8).float() / 255
    model(x)  # first step: tracking calibrators fix their reference (one search each)
    first = len(searches)
    model(x)
    calibrators = [m for m in model.modules() if hasattr(m, "training_update")]
    # 141 - 60 weights - input - 3 Detect outputs (per channel)
    assert len(calibrators) == 77 and all(m.training_update == update for m in calibrators)
    assert all(m.tracking == (update == "track") for m in calibrators)
    assert len(searches) - first == (0 if update == "track" else len(calibrators))
    if update == "track":  # tracking starts from the calibrated qparams: same batch range, same scales
        same = sum(torch.equal(m.scale, calibrated_scales[n]) for n, m in model.named_modules()
                   if isinstance(m, FakeQuantizeBase) and hasattr(m.activation_post_process, "training_update"))
        assert same == len(calibrators)


def test_shipped_recipes_load_and_prepare():
    recipes = sorted((ROOT / "data/quant").glob("*.yaml"))
    assert len(recipes) >= 11
    for r in recipes:
        model = prepare_yolo_qat(small_model(), QATConfig(pow2=True, recipe=r))
        assert any(isinstance(m, FakeQuantizeBase) for m in model.modules()), r.name


def test_silu_model_quantizes_activation_outputs():
    model = calibrated(prepare_yolo_qat(small_model(act="silu"), QATConfig(bn_folding=True, pow2=True)))
    acts = [m for m in model.modules() if type(m).__name__ == "QuantizedActivation"]
    assert len(acts) == 57 and all(isinstance(a.activation_post_process, FakeQuantizeBase) for a in acts)
    assert all_scales_pow2(model)


def test_qat_forward_close_to_float_after_calibration():
    model = small_model()
    ref = deepcopy(model).eval()
    x = torch.rand(2, 3, 96, 96)
    q = calibrated(prepare_yolo_qat(model, QATConfig(bn_folding=False, pow2=False))).eval()
    with torch.no_grad():
        a, b = ref(x)[0], q(x)[0]
        set_fake_quant(q, False)
        c = q(x)[0]
    assert torch.allclose(a, c, atol=1e-3, rtol=1e-3)  # fake quant off: the folded float model
    assert 0 < (a - b).abs().max() < 0.1 * a.abs().max()  # on: close, not equal


def test_concat_inputs_and_output_share_one_scale():
    from bst.torch.ao.quantization import trace_input_quantizers
    from models.quant import share_concat_scales

    model = calibrated(prepare_yolo_qat(small_model(), QATConfig(bn_folding=True, pow2=True,
                                                                 recipe=ROOT / "data/quant/shared_concat.yaml")))
    assert model.qat_config.recipe["concat"]["share_input_scales"]
    x = torch.rand(1, 3, 96, 96)
    assert share_concat_scales(model, x) >= 1
    inputs = trace_input_quantizers(model, (x,))
    for m in model.modules():
        op = getattr(m, "qcat", None)
        if isinstance(op, FloatFunctional):
            scales = {float(q.scale) for q in inputs[op] if q is not None} | {float(op.activation_post_process.scale)}
            assert len(scales) == 1, (type(m).__name__, scales)
    assert all_scales_pow2(model)


@pytest.mark.parametrize("recipe, order_free", [("data/quant/default.yaml", True),
                                               ("data/quant/detect_minmax.yaml", True),
                                               ("data/quant/mse_sampled.yaml", False)])
def test_detect_output_ranges_and_the_order_of_calibration_batches(recipe, order_free):
    """default.yaml's and detect_minmax.yaml's per-channel Detect ranges are min/max over every calibration batch,
    whatever their order; mse_sampled.yaml's moving average keeps mostly the first batch's range."""
    torch.manual_seed(1)
    x = torch.randn(2, 27, 12, 12)
    batches = [x, 8 * x, 2 * x]  # Detect outputs of three calibration batches (27 channels: 3 anchors x 9)
    scales = []
    for order in (batches, batches[::-1]):
        model = prepare_yolo_qat(small_model(), QATConfig(pow2=True, recipe=ROOT / recipe))
        fq = model.model[-1].m[0].activation_post_process
        set_fake_quant(model, False)
        set_observers(model, True)
        for y in order:
            fq(y)
        freeze(model)
        scales.append(fq.scale.clone())
    assert scales[0].numel() == 27  # one scale per output channel
    assert torch.equal(scales[0], scales[1]) == order_free
    if order_free:  # 8x's range: the smallest power of two with 127 steps covering each channel's largest |value|
        bound = (8 * x).abs().amax(dim=(0, 2, 3))
        assert (scales[0] * 127 >= bound).all() and (scales[0] * 127 < 2 * bound).all()


@pytest.mark.parametrize("recipe, order_free", [(None, True), ("data/quant/mse_sampled.yaml", False)])
def test_default_calibration_is_the_same_for_any_order_and_grouping_of_the_images(recipe, order_free):
    """Every quantizer of a model calibrated with the default recipe gets the same (scale, zero point) from the same
    images in another order and other batches; mse_sampled.yaml's do not."""
    torch.manual_seed(2)
    images = [torch.rand(1, 3, 64, 64) ** (1 + i % 3) for i in range(12)]
    results = []
    for order, batch in ((range(12), 4), (range(11, -1, -1), 3)):
        model = prepare_yolo_qat(small_model(), QATConfig(pow2=True, recipe=recipe and ROOT / recipe))
        set_fake_quant(model, False)
        set_observers(model, True)
        xs = [images[i] for i in order]
        with torch.no_grad():
            for k in range(0, len(xs), batch):
                model(torch.cat(xs[k:k + batch]))
        freeze(model)
        results.append([(q.scale.clone(), q.zero_point.clone()) for name, q in model.named_modules()
                        if isinstance(q, FakeQuantizeBase) and not name.endswith("weight_fake_quant")])
    same = all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(*results))
    assert len(results[0]) > 20 and same == order_free
