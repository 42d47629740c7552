"""Deployment latency on CPU: the float model in PyTorch and in onnxruntime, batch 1, measured side by side.

    python benchmarks/export_speed.py [--weights ../shared/reference/yolov5n_silu.pt] [--sizes 320 640]
                                      [--runs 20] [--threads 1] [--qdq model_320.onnx model_640.onnx] [--ort-qdq]

For each image size the checkpoint is exported with export.py (which checks the file against PyTorch), then the
PyTorch model and the onnxruntime session run in interleaved rounds (one call each per round, so load from other
processes hits both alike); the table shows medians and the ratio to PyTorch.

int8: `qdq_row(onnx_path, ...)` below is the place for the int8 QDQ model. It times the file in onnxruntime and
inspects the graph onnxruntime actually runs (SessionOptions.optimized_model_filepath) for integer kernels
(QLinearConv / ConvInteger ...), so the report says whether int8 kernels ran instead of assuming it. `--qdq FILE`
adds a row per file (its input shape picks the size). `--ort-qdq` adds a stand-in until export.py writes QDQ files
of QAT checkpoints: the float file statically quantized by onnxruntime's own tool (QDQ format, per-channel weights,
calibrated on a few noise images): it shows what onnxruntime does with a QDQ YOLOv5 graph, not our QAT accuracy.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import export  # noqa: E402
from models.backend import load_pytorch_model  # noqa: E402
from utils.general import LOGGER  # noqa: E402

INT8_KERNELS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QLinearAdd", "QLinearConcat",
                "QLinearSigmoid", "QLinearMul", "QGemm", "DynamicQuantizeLinear")
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")


def ort_session(onnx_path, threads, optimized_model_filepath=None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # no notice about hardware-specific layouts in the saved optimized graph
    # idle onnxruntime threads spin by default, which would steal the CPU from the PyTorch calls interleaved with them
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if optimized_model_filepath:
        so.optimized_model_filepath = str(optimized_model_filepath)
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])


def kernels_run(onnx_path, threads=1) -> dict:
    """The op types of the graph onnxruntime runs after its optimizations (QDQ pairs around a Conv fused into
    QLinearConv, etc.), read back from SessionOptions.optimized_model_filepath.

    Returns {"ops": Counter, "int8": {op: n}, "float_convs": n, "qdq_left": n (Q/DQ nodes still executed),
    "int8_ran": bool}.
    """
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        ort_session(onnx_path, threads, optimized_model_filepath=opt)
        ops = Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)
    int8 = {k: ops[k] for k in INT8_KERNELS if ops[k]}
    return {"ops": ops, "int8": int8, "float_convs": sum(ops[k] for k in FLOAT_CONVS),
            "qdq_left": ops["QuantizeLinear"] + ops["DequantizeLinear"], "int8_ran": bool(int8)}


def interleaved_ms(fns: dict, runs: int, warmup: int = 3) -> dict:
    """Median milliseconds per call of each function, calling them in turn `runs` times after `warmup` rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(runs):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def onnx_input_shape(onnx_path):
    import onnx

    dims = onnx.load(str(onnx_path), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    return [d.dim_value or None for d in dims]


# ---------------------------------------------------------------------------------------------------------------------
# int8 QDQ model: the place for export.py's QDQ files of QAT checkpoints
# ---------------------------------------------------------------------------------------------------------------------

def qdq_row(onnx_path, threads=1, label="int8 QDQ (onnxruntime)") -> dict:
    """How onnxruntime runs an int8 QDQ file: the kernels it really executes and a callable for timing.

    Returns {"label", "run": callable running one batch-1 inference on the file's input shape, "kernels": kernels_run}.
    """
    session = ort_session(onnx_path, threads)
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return {"label": label, "run": lambda: session.run(None, {inp.name: x}), "kernels": kernels_run(onnx_path, threads)}


def ort_static_qdq(float_onnx, out_path, size, n_calib=4):
    """Stand-in int8 model: onnxruntime's static quantization of the float file (QDQ, per-channel int8 weights,
    uint8 activations), calibrated on seeded noise. Not a QAT model: only the int8 kernels and speed mean anything."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Noise(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.batches = iter([{export.INPUT_NAME: rng.random((1, 3, size, size), dtype=np.float32)}
                                 for _ in range(n_calib)])

        def get_next(self):
            return next(self.batches, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # its advice to run its pre-processing script first
    try:
        quantize_static(str(float_onnx), str(out_path), Noise(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    finally:
        root.setLevel(level)
    return Path(out_path)


def _kernel_note(k: dict) -> str:
    if k["int8_ran"]:
        int8 = ", ".join(f"{n} {op}" for op, n in k["int8"].items())
        return f"int8 kernels ran: {int8}; float convs left {k['float_convs']}, Q/DQ nodes left {k['qdq_left']}"
    return (f"NO int8 kernels: onnxruntime runs {k['float_convs']} float convs and {k['qdq_left']} Q/DQ nodes "
            f"(fake-quant in float)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(ROOT.parent / "shared/reference/yolov5n_silu.pt"), help="float .pt")
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640], help="square image sizes")
    p.add_argument("--runs", type=int, default=20, help="timed rounds per size")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for both PyTorch and onnxruntime (on a busy machine more than 1 mostly measures "
                        "PyTorch's OpenMP threads waiting for each other)")
    p.add_argument("--qdq", nargs="*", default=[], help="int8 QDQ .onnx files (batch 1, one of --sizes)")
    p.add_argument("--ort-qdq", action="store_true", help="add onnxruntime's static QDQ quantization as a stand-in")
    opt = p.parse_args(argv)
    torch.set_num_threads(opt.threads)

    qdq_by_size = {}
    for f in opt.qdq:
        shape = onnx_input_shape(f)
        if len(shape) != 4 or shape[0] not in (1, None) or shape[2] != shape[3] or shape[3] not in opt.sizes:
            raise SystemExit(f"--qdq {f}: input shape {shape} is not batch 1 at one of --sizes {opt.sizes}")
        qdq_by_size.setdefault(shape[3], []).append(f)

    rows, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / Path(opt.weights).name
        shutil.copy(opt.weights, pt)  # export.py writes beside the weights
        model = load_pytorch_model(pt)
        export.prepare_for_export(model)
        for size in opt.sizes:
            sub = Path(tmp) / str(size)
            sub.mkdir()
            shutil.copy(pt, sub / pt.name)
            (onnx_file,) = export.run(weights=sub / pt.name, imgsz=(size, size), include=["onnx"])
            im = export.sample_batch((1, 3, size, size))
            x = im.numpy()
            session = ort_session(onnx_file, opt.threads)
            fns = {"PyTorch fp32": lambda: model(im), "onnxruntime fp32": lambda: session.run(None, {"images": x})}
            extra = [qdq_row(f, opt.threads, f"int8 QDQ {Path(f).name}") for f in qdq_by_size.get(size, [])]
            if opt.ort_qdq:
                q = ort_static_qdq(onnx_file, sub / "ort_static_qdq.onnx", size)
                extra.append(qdq_row(q, opt.threads, "int8 QDQ (onnxruntime static quantization, stand-in)"))
            for r in extra:
                fns[r["label"]] = r["run"]
                notes.append(f"{size}: {r['label']}: {_kernel_note(r['kernels'])}")
            with torch.no_grad():
                ms = interleaved_ms(fns, opt.runs)
            base = ms["PyTorch fp32"]
            rows += [(size, k, v, base / v) for k, v in ms.items()]

    import onnxruntime as ort

    LOGGER.info(f"\nCPU latency, batch 1, {opt.threads} thread(s), median of {opt.runs} interleaved rounds "
                f"(torch {torch.__version__}, onnxruntime {ort.__version__}, {Path(opt.weights).name})")
    LOGGER.info(f"{'size':>6} {'runtime':<58} {'ms':>9} {'speed vs PyTorch':>17}")
    for size, k, v, ratio in rows:
        LOGGER.info(f"{size:>6} {k:<58} {v:>9.2f} {ratio:>16.2f}x")
    if not opt.qdq and not opt.ort_qdq:
        LOGGER.info("int8 QDQ: no file given (--qdq FILE once export.py writes QDQ files of QAT checkpoints)")
    for n in notes:
        LOGGER.info(n)
    return rows


if __name__ == "__main__":
    main()
