"""Numerical verification of exported files, every format: each is run on sample batches and compared with the
PyTorch model. `verify_export(fmt, job, f)` is export.py's one verification step; it picks the checks below by format.

Float exports (`verify_onnx`, `verify_torchscript`): the largest difference must stay within FLOAT_RTOL (HALF_RTOL for
float16) of the largest output magnitude.

QDQ exports of QAT models (`verify_onnx_qdq`, `verify_torchscript_qdq`): the file is the converted model's ONNX form
(bst.convert, `bst.torch.ao.nn.quantized.onnx_form`) and is compared with the PyTorch fake-quant model in eval mode.
With power-of-two scales every product and sum of a conv is exact in float32 (int8 x int8 products on the grid
input_scale * weight_scale, the int32 bias on the same grid), so onnxruntime must reproduce PyTorch bit for bit
whatever its summation order. Linear (non-pow2) scales can differ by float rounding (QuantizeLinear divides by the
scale while torch multiplies by its float32 reciprocal; products are not exact), and a value on a rounding boundary of
the next quantizer then lands one step apart: they get the one-step bound.

OpenVINO IR (`verify_openvino`): float models as verify_onnx, QAT models reported against the one-step bound. Integer
models (`verify_integer`): the raw head outputs of the numpy runner, of bst's integer reference and of PyTorch must be
identical.
"""
from __future__ import annotations

import contextlib
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from bst.torch.ao.nn.quantized.onnx_form import qdq_counts
from bst.torch.ao.quantization import FakeQuantizeBase, fake_quant_enabled, frozen_qparams, output_quantizer
from bst.torch.ao.quantization.integer_runner import IntegerModel
from models.quant import integer_head
from utils.dataloaders import LoadImages, _list_image_files
from utils.dataset_yaml import check_dataset
from utils.general import LOGGER, UserError, colorstr
from utils.graph_forms import openvino_form
from utils.runtimes import onnxruntime_session, openvino_compiled, openvino_xml
from workflow.exporters.common import ExportJob, second_shape
from workflow.exporters.qdq_checks import check_qdq_file, describe_qdq, detect_raw_outputs

FLOAT_RTOL = 1e-4  # float32 export: max |diff| <= FLOAT_RTOL * max |PyTorch output|
HALF_RTOL = 1e-3  # float16 export: about one float16 rounding (eps 9.8e-4) of the largest output
STEP_SLACK = 1e-4  # dequantized values are rounded to float32: two values k steps apart differ by k steps +- ~3e-5


@contextlib.contextmanager
def quiet_tracing():
    """Hide the tracer's notes on Python-side shape checks (the shapes are fixed by design unless --dynamic) and
    torch.jit's deprecation notices; the exported file is verified numerically instead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        yield


def sample_batch(shape, data=None, seed=0, device="cpu", dtype=torch.float32) -> torch.Tensor:
    """The batch the exports are checked on: (bs, 3, h, w) in [0, 1].

    With a dataset yaml, the first bs images of its val split letterboxed to (h, w); else seeded uniform noise.
    """
    bs, _, h, w = shape
    if data is None:
        g = torch.Generator().manual_seed(seed)
        return torch.rand(tuple(shape), generator=g).to(device=device, dtype=dtype)
    d = check_dataset(data)
    files = _list_image_files(d["val"], prefix=f"{data}: val: ")
    images = [im for _, im, *_ in LoadImages(files[:bs], img_size=(h, w), auto=False)]
    while len(images) < bs:  # fewer val images than the batch: repeat them
        images.append(images[len(images) % max(len(images), 1)])
    im = torch.from_numpy(np.stack(images)).to(device=device, dtype=dtype) / 255
    return im


def compare_outputs(ref, out, rtol=FLOAT_RTOL, atol=0.0) -> dict:
    """How far `out` is from `ref` (same shape). Passes when max |out - ref| <= atol + rtol * max |ref|.

    Returns max_abs_diff, ref_max_abs, relative (max_abs_diff / ref_max_abs), share_differ (fraction of elements that
    differ at all), share_over (fraction above the tolerance), tolerance (the absolute bound), rtol, atol, ok.
    The QDQ export passes atol = one step of the output quantizer and rtol = 0.
    """
    ref = np.asarray(ref, dtype=np.float64)
    out = np.asarray(out, dtype=np.float64)
    if ref.shape != out.shape:
        raise ValueError(f"out: shape {out.shape} differs from the reference shape {ref.shape}")
    diff = np.abs(out - ref)
    finite = bool(np.isfinite(out).all())
    ref_max = float(np.abs(ref).max()) if ref.size else 0.0
    max_diff = float(diff.max()) if diff.size else 0.0
    tol = atol + rtol * ref_max
    return {"max_abs_diff": max_diff, "ref_max_abs": ref_max, "relative": max_diff / ref_max if ref_max else max_diff,
            "share_differ": float((diff > 0).mean()) if diff.size else 0.0,
            "share_over": float((diff > tol).mean()) if diff.size else 0.0,
            "tolerance": tol, "rtol": rtol, "atol": atol, "ok": finite and max_diff <= tol}


def first_output(y):
    return y[0] if isinstance(y, (list, tuple)) else y


def _report(result: dict, what: str, path, check: bool, prefix: str) -> dict:
    line = (f"{prefix} {what} vs PyTorch on {result['shape']}: max |diff| {result['max_abs_diff']:.3g} = "
            f"{result['relative']:.2e} of max |output| {result['ref_max_abs']:.4g} (tolerance {result['rtol']:g} "
            f"relative + {result['atol']:g}), {100 * result['share_differ']:.1f}% of outputs differ")
    LOGGER.info(line)
    if check and not result["ok"]:
        raise UserError(f"{path}: the exported model disagrees with PyTorch (max |diff| {result['max_abs_diff']:.3g}, "
                        f"{result['relative']:.2e} of the largest output, allowed {result['rtol']:g} relative + "
                        f"{result['atol']:g}); the file is left for inspection, do not deploy it")
    return result


@torch.no_grad()
def verify_onnx(model, onnx_path, im, rtol=FLOAT_RTOL, atol=0.0, check=True, prefix=colorstr("ONNX:")) -> dict:
    """Run `onnx_path` in onnxruntime (CPU) on `im` and compare with `model(im)` (see compare_outputs).

    The input is cast to the file's input type (float16 exports). With check=True a failure raises UserError.
    Returns compare_outputs' dict plus `shape` and `output` (the onnxruntime result).
    """
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime's own exception types (InvalidGraph, Fail, ...)
        raise UserError(f"{onnx_path}: onnxruntime {ort.__version__} cannot load the exported file "
                        f"({str(e).strip().splitlines()[0][:200]})") from None
    inp = session.get_inputs()[0]
    np_dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
    out = session.run(None, {inp.name: im.detach().cpu().numpy().astype(np_dtype)})[0]
    ref = first_output(model(im)).float().cpu().numpy()
    result = compare_outputs(ref, out.astype(np.float32), rtol=rtol, atol=atol)
    result.update(shape=tuple(im.shape), output=out)
    return _report(result, "onnxruntime", onnx_path, check, prefix)


@torch.no_grad()
def verify_torchscript(model, ts_path, im, rtol=FLOAT_RTOL, atol=0.0, check=True,
                       prefix=colorstr("TorchScript:")) -> dict:
    """Load `ts_path` with torch.jit.load and compare its output on `im` with `model(im)`, as verify_onnx."""
    with quiet_tracing():
        ts = torch.jit.load(str(ts_path), map_location=im.device).eval()
    out = first_output(ts(im)).float().cpu().numpy()
    ref = first_output(model(im)).float().cpu().numpy()
    result = compare_outputs(ref, out, rtol=rtol, atol=atol)
    result.update(shape=tuple(im.shape), output=out)
    return _report(result, "torch.jit", ts_path, check, prefix)


# --- verification of QDQ files ------------------------------------------------------------------------------------
# The gate is the raw Detect head outputs (the 1x1 convs' outputs before the sigmoid). A model whose every scale is a
# power of two must be reproduced exactly (0 differing raw outputs, see above). Otherwise each element of
# onnxruntime's result must be within one step of the output quantizer of that Detect conv (onnxruntime's int8
# kernels quantize the float bias to int32 and requantize in their own order, and folded BN rounds differently, so a
# value on a rounding boundary lands one step apart; a wrong scale, weight or missing node is off by many steps). A
# Detect conv without an output quantizer (recipe mode float / weight_only) gets the bound one step of its input
# quantizer implies: step_in * sum |w| per output channel.
# The decoded output (xywh in pixels, objectness and class scores) is checked against the bound that one raw step
# implies through the decoding: sigmoid' <= 1/4, so scores move by <= step/4; xy = (2 sigmoid - 0.5 + grid) * stride
# by <= stride * step / 2 pixels; wh = (2 sigmoid)^2 * anchor by <= 8 * max(sigmoid^2 (1 - sigmoid)) * anchor * step
# = 32/27 * anchor * step pixels; plus float32 rounding (FLOAT_RTOL of the largest value of that kind).

@torch.no_grad()
def qdq_reference(model, im) -> dict:
    """The fake-quant model's outputs on `im` and the one-step tolerances described above.

    Returns {"decoded": array (bs, N, no), "raw": [array (bs, na, ny, nx, no) per level], "raw_tol": [array
    broadcastable to raw], "decoded_tol": array like decoded, "steps": [Detect output step, (smallest, largest)
    step of a per-channel output quantizer, or None per level]}."""
    detect = model.model[-1]
    produced, head_in = {}, {}

    def record(mod, _, out):
        produced[id(out)] = (out, mod)

    def head_input(i):
        def pre(_, args):
            head_in[i] = args[0]
        return pre

    exact = model.qat_config.pow2
    hooks = [m.register_forward_hook(record) for m in model.modules() if isinstance(m, FakeQuantizeBase)]
    hooks += [conv.register_forward_pre_hook(head_input(i)) for i, conv in enumerate(detect.m)]
    export_flag = detect.export
    detect.export = False
    try:
        decoded, raw = model(im)
    finally:
        detect.export = export_flag
        for h in hooks:
            h.remove()
    raw = [r.float().cpu().numpy() for r in raw]
    decoded = decoded.float().cpu().numpy()
    na, no = detect.na, detect.no
    raw_tol, steps, dec_tol = [], [], []
    for i, conv in enumerate(detect.m):
        out_q = output_quantizer(conv)
        if fake_quant_enabled(out_q):
            scale = frozen_qparams(out_q)[0].float().cpu().numpy()
            tol = np.broadcast_to(scale.reshape(-1), (na * no,)).reshape(na, no) * (1 + STEP_SLACK)
            step = float(scale) if scale.ndim == 0 else (float(scale.min()), float(scale.max()))
        else:
            step = None
            src = produced.get(id(head_in[i]))
            fq = getattr(conv, "weight_fake_quant", None)
            w = fq(conv.weight) if fake_quant_enabled(fq) else conv.weight
            if src is not None and fake_quant_enabled(src[1]) and not src[1].is_per_channel:
                l1 = w.detach().abs().sum(dim=(1, 2, 3)).float().cpu().numpy()
                tol = (float(frozen_qparams(src[1])[0]) * l1).reshape(na, no) + FLOAT_RTOL * np.abs(raw[i]).max()
            else:  # nothing quantized right before the head: the float promise
                tol = np.full((na, no), FLOAT_RTOL * np.abs(raw[i]).max())
        steps.append(step)
        raw_tol.append(tol.reshape(1, na, 1, 1, no))
        lipschitz = np.full((na, no), 0.25)
        lipschitz[:, :2] = float(detect.stride[i]) / 2
        lipschitz[:, 2:4] = 32 / 27 * (detect.anchors[i] * detect.stride[i]).float().cpu().numpy()
        ny, nx = raw[i].shape[2:4]
        dec_tol.append(np.broadcast_to((lipschitz * tol)[:, None, :], (na, ny * nx, no)).reshape(1, na * ny * nx, no))
    dec_tol = np.concatenate(dec_tol, 1)
    slack = np.empty(no)
    slack[:4] = FLOAT_RTOL * np.abs(decoded[..., :4]).max()
    slack[4:] = FLOAT_RTOL
    return {"decoded": decoded, "raw": raw, "raw_tol": raw_tol, "decoded_tol": dec_tol + slack, "steps": steps,
            "exact": exact}


# Where scales are not powers of two, onnxruntime and PyTorch sum in different orders, so a value on a rounding
# boundary can land one step apart in an early layer, and that flip moves its neighbours downstream by a few steps
# (on an AMD EPYC with AVX-512: 1% of a small model's raw outputs, up to 3 steps). Up to FLIP_STEPS steps on at most
# FLIP_SHARE of the outputs are accepted there; a wrong scale, weight or node moves most outputs by many steps.
FLIP_STEPS, FLIP_SHARE = 4.0, 0.02


def _within(ref, out, tol, exact=False) -> dict:
    """How far `out` is from `ref` relative to `tol`; ok: identical (exact), or within tol apart from rounding flips
    (FLIP_STEPS, FLIP_SHARE)."""
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    worst = float((diff / tol).max()) if diff.size else 0.0
    ok = (diff == 0).all() if exact else worst <= FLIP_STEPS and float((diff > tol).mean()) <= FLIP_SHARE
    return {"max_abs_diff": float(diff.max()), "share_differ": float((diff > 0).mean()),
            "share_over": float((diff > tol).mean()), "worst_ratio": float((diff / tol).max()),
            "ok": bool(np.isfinite(out).all() and ok)}


def _describe_steps(steps):
    def one(s):
        if s is None:
            return "float"
        if isinstance(s, tuple):  # one step per channel: (smallest, largest)
            return f"{one(s[0])}..{one(s[1])} per channel"
        k = np.log2(s)
        return f"2^{int(k)}" if k == int(k) else f"{s:.3g}"
    return ", ".join(one(s) for s in steps)


def odd_zero_points(proto) -> tuple[int, int]:
    """(odd, all): how many QuantizeLinear nodes of `proto` have an odd zero point, of how many."""
    consts = {i.name: i for i in proto.graph.initializer}
    zero_points = [onnx.numpy_helper.to_array(consts[n.input[2]]) for n in proto.graph.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in consts]
    return sum(int(z.astype(np.int64).ravel()[0]) % 2 for z in zero_points), len(zero_points)


def raw_output_probe(onnx_path):
    """(serialized graph, names): the ONNX file with Detect's raw outputs (the Sigmoid inputs) as extra outputs."""
    proto = onnx.load(str(onnx_path))
    names = detect_raw_outputs(proto)
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return proto.SerializeToString(), names


def _raw_by_shape(raw_out, ref, path):
    by_shape = {r.shape: r for r in raw_out}
    if len(raw_out) != len(ref["raw"]) or any(r.shape not in by_shape for r in ref["raw"]):
        raise UserError(f"{path}: cannot find Detect's {len(ref['raw'])} raw outputs (Sigmoid inputs) in the "
                        f"graph (found shapes {[r.shape for r in raw_out]})")
    return by_shape


def _run_qdq_file(onnx_path, probe, names, x, as_written):
    """onnxruntime's decoded output of the file itself and the raw head outputs of `probe` (the same graph with those
    tensors as extra outputs; a second session, so the first is exactly what users run)."""
    session = onnxruntime_session(onnx_path, as_written=as_written)
    out = session.run(None, {session.get_inputs()[0].name: x})[0]
    probe_session = onnxruntime_session(probe, as_written=as_written)
    raw = probe_session.run(names, {probe_session.get_inputs()[0].name: x}) if names else []
    return out, raw


@torch.no_grad()
def verify_onnx_qdq(model, onnx_path, im, check=True, prefix=colorstr("ONNX:")) -> dict:
    """Run a QDQ file in onnxruntime (CPU) on `im` and compare it with the PyTorch fake-quant `model` (see the comment
    above): raw head outputs within one output step, decoded output within the bound one step implies.

    Two runs: the graph as written (onnxruntime without the rewrites that change QDQ numbers:
    utils.runtimes.ORT_QDQ_REWRITES) is the check, a failure raises UserError with check=True; onnxruntime with its
    defaults (int8 kernels, weights in utils.graph_forms.onnxruntime_kernel_form, as DetectMultiBackend runs them when
    they agree) is reported, with a warning when it is off by more than one step.

    Returns {"raw": [_within per level], "decoded": _within, "ok", "output" (decoded), "raw_output" (per level),
    "raw_share_differ", "int8_kernels": the same keys for the default run, "steps", "shape"}."""
    import onnxruntime as ort

    ref = qdq_reference(model, im)
    x = im.detach().float().cpu().numpy()
    probe, names = raw_output_probe(onnx_path)
    n_raw = sum(r.size for r in ref["raw"])
    runs = {}
    for as_written in (True, False):
        try:
            out, raw_out = _run_qdq_file(str(onnx_path), probe, names, x, as_written)
        except Exception as e:  # onnxruntime's own exception types
            raise UserError(f"{onnx_path}: onnxruntime {ort.__version__} cannot run the exported file "
                            f"({str(e).strip().splitlines()[0][:200]})") from None
        by_shape = _raw_by_shape(raw_out, ref, onnx_path)
        # exact where a power-of-two model quantizes the head's output (a float Detect conv is float arithmetic);
        # onnxruntime's int8 kernels are reported, never required to be exact
        exact = [ref["exact"] and as_written and step is not None for step in ref["steps"]]
        raw = [_within(r, by_shape[r.shape], t, e) for r, t, e in zip(ref["raw"], ref["raw_tol"], exact)]
        decoded = _within(ref["decoded"], out.astype(np.float32), ref["decoded_tol"])
        runs[as_written] = {
            "raw": raw, "decoded": decoded, "output": out, "raw_output": [by_shape[r.shape] for r in ref["raw"]],
            "raw_share_differ": sum(w["share_differ"] * r.size for w, r in zip(raw, ref["raw"])) / n_raw,
            "raw_worst": max(w["worst_ratio"] for w in raw), "ok": all(w["ok"] for w in raw) and decoded["ok"]}
    result = {**runs[True], "int8_kernels": runs[False], "steps": ref["steps"], "shape": tuple(im.shape)}
    for r, how in ((runs[True], "as written"), (runs[False], "int8 kernels")):
        exact = ref["exact"] and r is runs[True] and None not in ref["steps"]
        need = "exact (power-of-two scales)" if exact else (f"within one output step, or {FLIP_STEPS:g} on at most "
                                                            f"{100 * FLIP_SHARE:g}% (rounding flips)")
        if r is runs[False]:
            need = "informative: val.py and detect.py use them where they equal the graph as written"
        LOGGER.info(f"{prefix} onnxruntime ({how}) vs PyTorch fake-quant on {tuple(im.shape)}: raw head outputs "
                    f"{100 * r['raw_share_differ']:.2f}% of {n_raw} differ [required: {need}], worst "
                    f"{r['raw_worst']:.2f} of one output step (steps {_describe_steps(ref['steps'])}); decoded output "
                    f"max |diff| {r['decoded']['max_abs_diff']:.3g}, worst {r['decoded']['worst_ratio']:.2f} of the "
                    f"bound one step implies")
    if not runs[False]["ok"] and runs[True]["ok"]:
        LOGGER.warning(f"WARNING: {onnx_path}: onnxruntime's int8 kernels are off by more than one step "
                       f"({max(runs[False]['raw_worst'], runs[False]['decoded']['worst_ratio']):.3g}x the bound) while "
                       f"the graph as written agrees; val.py and detect.py will run this file as written (float "
                       f"kernels)")
    if check and not result["ok"]:
        worst = max(result["raw_worst"], result["decoded"]["worst_ratio"])
        what = "raw head outputs" if not all(w["ok"] for w in result["raw"]) else "decoded outputs"
        if ref["exact"] and what == "raw head outputs":
            bound = (f"{100 * result['raw_share_differ']:.2f}% of them differ (up to {worst:.3g} output steps) where "
                     f"a power-of-two model must be reproduced exactly")
        else:
            bound = (f"differ by up to {worst:.3g}x the one-quantization-step tolerance on "
                     f"{100 * max(w['share_over'] for w in result['raw']):.2f}% of them")
        raise UserError(f"{onnx_path}: the QDQ export disagrees with the PyTorch fake-quant model: {what} {bound}; the "
                        f"file is left for inspection, do not deploy it")
    return result


@torch.no_grad()
def verify_torchscript_qdq(model, ts_path, im, check=True, prefix=colorstr("TorchScript:")) -> dict:
    """The traced export form of a QAT model vs the PyTorch fake-quant model: the decoded output within the bound one
    output step implies (the trace has one output, so the raw head outputs are not compared)."""
    ref = qdq_reference(model, im)
    with quiet_tracing():
        ts = torch.jit.load(str(ts_path), map_location=im.device).eval()
    out = first_output(ts(im)).float().cpu().numpy()
    r = _within(ref["decoded"], out, ref["decoded_tol"])
    r.update(shape=tuple(im.shape), output=out)
    LOGGER.info(f"{prefix} torch.jit vs PyTorch fake-quant on {tuple(im.shape)}: {100 * r['share_differ']:.1f}% of "
                f"outputs differ, max |diff| {r['max_abs_diff']:.3g}, worst {r['worst_ratio']:.2f} of the bound one "
                f"output step implies")
    if check and not r["ok"]:
        raise UserError(f"{ts_path}: the TorchScript export disagrees with the PyTorch fake-quant model (up to "
                        f"{r['worst_ratio']:.3g}x the one-quantization-step bound); do not deploy it")
    return r


@torch.no_grad()
def verify_openvino(model, folder, onnx_path, im, quantized, rtol=FLOAT_RTOL, check=True,
                    prefix=colorstr("OpenVINO:")) -> dict:
    """Run the OpenVINO IR in `folder` (CPU plugin) on `im` and compare it with the PyTorch model.

    Float models: as verify_onnx (FLOAT_RTOL, HALF_RTOL for float16 weights); a failure raises UserError with
    check=True. QAT models: OpenVINO runs the QDQ graph (in utils.graph_forms.openvino_form, as export_openvino
    converts it) with its own int8 kernels. They compute a power-of-two model's integers exactly when every zero
    point is even (a ReLU model's are 0); an odd zero point is rounded after it is added (OpenVINO's FakeQuantize
    rounds (x - low) / step), so a tie lands on the other neighbour (see README). The raw head outputs (read through
    a probe converted from `onnx_path`) and the decoded output are compared with the fake-quant model and reported,
    with a warning beyond one output step that counts the odd zero points; an output that is not finite or missing
    is an error. Returns the comparison with `output` (decoded), `shape` and `odd_zero_points`."""
    import openvino as ov

    x = im.detach().float().cpu().numpy()
    try:
        out = openvino_compiled(openvino_xml(folder), shape=x.shape)(x)[0]
    except RuntimeError as e:
        raise UserError(f"{folder}: OpenVINO {ov.get_version()} cannot run the exported model "
                        f"({str(e).strip().splitlines()[0][:200]})") from None
    if not quantized:
        ref = first_output(model(im)).float().cpu().numpy()
        result = compare_outputs(ref, out.astype(np.float32), rtol=rtol)
        result.update(shape=tuple(im.shape), output=out)
        return _report(result, "OpenVINO", folder, check, prefix)
    ref = qdq_reference(model, im)
    probe, names = raw_output_probe(onnx_path)
    probe = openvino_form(onnx.load_from_string(probe))[0].SerializeToString()  # as export_openvino converts it
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "probe.onnx").write_bytes(probe)
        compiled = openvino_compiled(ov.convert_model(str(Path(d) / "probe.onnx")), shape=x.shape)
        res = compiled(x)
        by_name = {o.any_name: res[o] for o in compiled.outputs}
        raw_out = [by_name[n] for n in names]
    by_shape = _raw_by_shape(raw_out, ref, folder)
    raw = [_within(r, by_shape[r.shape], t) for r, t in zip(ref["raw"], ref["raw_tol"])]
    decoded = _within(ref["decoded"], out.astype(np.float32), ref["decoded_tol"])
    n_raw = sum(r.size for r in ref["raw"])
    share = sum(w["share_differ"] * r.size for w, r in zip(raw, ref["raw"])) / n_raw
    worst = max(w["worst_ratio"] for w in raw)
    odd, total = odd_zero_points(onnx.load(str(onnx_path)))
    result = {"raw": raw, "decoded": decoded, "output": out, "raw_share_differ": share, "raw_worst": worst,
              "ok": all(w["ok"] for w in raw) and decoded["ok"], "shape": tuple(im.shape), "odd_zero_points": odd}
    LOGGER.info(f"{prefix} OpenVINO (int8 kernels) vs PyTorch fake-quant on {tuple(im.shape)}: raw head outputs "
                f"{100 * share:.2f}% of {n_raw} differ, worst {worst:.2f} of one output step [exact where every zero "
                f"point is even: {odd} of {total} are odd]; decoded output max |diff| {decoded['max_abs_diff']:.3g}, "
                f"worst {decoded['worst_ratio']:.2f} of the bound one step implies")
    if not np.isfinite(out).all() or not all(np.isfinite(r).all() for r in raw_out):
        raise UserError(f"{folder}: OpenVINO's output is not finite; the folder is left for inspection, do not deploy "
                        f"it")
    if not result["ok"]:
        why = (f"{odd} of its {total} quantizers have odd zero points, which OpenVINO's FakeQuantize rounds after "
               f"adding" if odd else "with even zero points only, an OpenVINO this project has not seen")
        LOGGER.warning(f"WARNING: {folder}: OpenVINO's int8 kernels are off by up to "
                       f"{max(worst, decoded['worst_ratio']):.3g}x one output step ({why}); the ONNX file computes "
                       f"the model exactly")
    return result


@torch.no_grad()
def verify_integer(model, converted, folder, checks, prefix=colorstr("Integer:")) -> dict:
    """The integer model in `folder` (workflow.exporters.integer.export_integer) vs the PyTorch fake-quant `model`, on
    every batch of `checks` and on a second input size: the raw head outputs of the PyTorch model, of bst's integer
    reference (`converted`, the network the folder was recorded from) and of the numpy runner must be identical (0
    differing integers); any difference raises UserError. Returns {"differ", "total", "shapes"}."""
    runner = IntegerModel(folder)
    detect = model.model[-1]
    stride = int(detect.stride.max())
    im = checks[0]
    second = second_shape(im.shape, stride)
    checks = list(checks) + ([] if any(tuple(x.shape) == second for x in checks) else
                             [sample_batch(second, seed=2, device=im.device)])
    differ = total = 0
    for x in checks:
        export_flag, detect.export = detect.export, False
        try:
            raw = model(x)[1]
        finally:
            detect.export = export_flag
        ints = integer_head(converted, x)
        ran = runner.run(x.float().cpu().numpy())
        for r, q, name in zip(raw, ints, runner.graph["outputs"]):
            bs, _, ny, nx = q.int_repr.shape
            ref = q.dequantize().view(bs, detect.na, detect.no, ny, nx).permute(0, 1, 3, 4, 2)
            differ += int((ref.cpu() != r.float().cpu()).sum()) + int((torch.from_numpy(ran[name]) != q.int_repr.cpu())
                                                                     .sum())
            total += r.numel()
    shapes = ", ".join(f"{tuple(x.shape)}" for x in checks)
    nodes = runner.graph["nodes"]
    ops = {}
    for n in nodes:
        ops[n["op"]] = ops.get(n["op"], 0) + 1
    shifts = np.concatenate([runner.arrays[n["shift"]] for n in nodes if n["op"] == "conv2d"])
    LOGGER.info(f"{prefix} {len(nodes)} ops ({', '.join(f'{v} {k}' for k, v in ops.items())}), conv shifts "
                f"{int(shifts.min())}..{int(shifts.max())}; raw head outputs: {differ} of {total} differ between the "
                f"PyTorch model, bst's integer reference and the numpy runner [required: 0] at {shapes}")
    if differ:
        raise UserError(f"{folder}: the integer model differs from the PyTorch model on {differ} of {total} raw "
                        f"outputs")
    return {"differ": differ, "total": total, "shapes": shapes}


# --- the verification step of export.py: one entry point, every format ---------------------------------------------

def _torchscript_checked(job: ExportJob, f) -> None:
    for x in job.checks:
        if job.quantized:
            verify_torchscript_qdq(job.model, f, x)
        else:
            verify_torchscript(job.model, f, x, rtol=job.rtol)


def _onnx_checked(job: ExportJob, f) -> None:
    """A QAT model's file is first checked as a QDQ graph (workflow.exporters.qdq_checks), then numerically."""
    if job.quantized:
        expected = qdq_counts(job.export_model, (job.im,))
        s = check_qdq_file(onnx.load(str(f)), expected, job.metadata["pow2"], f, simplified=job.simplify)
        LOGGER.info(f"{colorstr('ONNX:')} {describe_qdq(s, job.metadata['pow2'])}")
    for x in job.checks:
        if job.quantized:
            verify_onnx_qdq(job.model, f, x)
        else:
            verify_onnx(job.model, f, x, rtol=job.rtol)


def _openvino_checked(job: ExportJob, f) -> None:
    """Compared through job.openvino_source, the ONNX file the folder was converted from."""
    for x in job.checks:
        verify_openvino(job.model, f, job.openvino_source, x, job.quantized, rtol=job.rtol,
                        prefix=colorstr("OpenVINO:"))


def _integer_checked(job: ExportJob, f) -> None:
    verify_integer(job.model, job.integer_network, f, job.checks)


VERIFIERS = {"torchscript": _torchscript_checked, "onnx": _onnx_checked, "openvino": _openvino_checked,
             "integer": _integer_checked}


def verify_export(fmt: str, job: ExportJob, f) -> None:
    """The one check every file export.py writes passes before it is kept: `f`, written by the exporter of format
    `fmt` (a key of common.FORMATS), is run on every batch of job.checks and compared with job.model: a float model
    within job.rtol, a QAT model as verify_torchscript_qdq, check_qdq_file + verify_onnx_qdq, verify_openvino or
    verify_integer require. A failure raises UserError; the file is left for inspection."""
    VERIFIERS[fmt](job, f)
