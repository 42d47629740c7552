"""Deployment latency on CPU: the float model in PyTorch and onnxruntime, and an int8 QDQ export of a pow2 QAT model
in onnxruntime, batch 1, measured side by side.

    python benchmarks/export_speed.py [--weights ../shared/reference/yolov5n_silu.pt] [--sizes 320 640]
                                      [--qat-weights ../shared/reference/yolov5n_relu.pt] [--qat-recipe R.yaml]
                                      [--runs 20] [--threads 1] [--qdq model_320.onnx model_640.onnx]

For each image size the float checkpoint is exported with export.py (which checks the file against PyTorch), then
the runtimes are called in interleaved rounds (one call each per round, so load from other processes hits all alike);
the table shows medians and the ratio to PyTorch fp32.

int8: `--qat-weights` (a float checkpoint; default the ReLU reference model, as the seed quantizes ReLU models) is
prepared for QAT here (bn_folding, pow2, default recipe), calibrated on a few shapes val images (seeded noise when the
dataset is absent), saved as a checkpoint and exported by export.py at each size: a real QDQ file of a QAT model,
verified against the PyTorch fake-quant model. It is timed in onnxruntime twice: with onnxruntime's defaults (its
QDQ -> int8 kernel fusions) and as written (those rewrites off, as DetectMultiBackend runs it for val.py). For each,
the graph onnxruntime actually runs (SessionOptions.optimized_model_filepath) is inspected for integer kernels
(QLinearConv / ConvInteger ...), so the report says whether int8 kernels ran instead of assuming it. `--qdq FILE`
adds a row per given QDQ file (its input shape picks the size); `--no-qat` skips the QAT model.
"""
from __future__ import annotations

import argparse
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

import export
from models.backend import (
    ORT_QDQ_REWRITES,
    load_pytorch_model,
)
from models.checkpoint import save_checkpoint
from models.quant import calibrate, prepare_yolo_qat
from utils.dataloaders import LoadImages
from utils.general import LOGGER

INT8_KERNELS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QLinearAdd", "QLinearConcat",
                "QLinearSigmoid", "QLinearMul", "QGemm", "DynamicQuantizeLinear")
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")


def ort_session(onnx_path, threads, optimized_model_filepath=None, as_written=False):
    """onnxruntime CPU session with all graph optimizations; as_written=True turns off the rewrites that change a QDQ
    graph's numbers (models.backend.ORT_QDQ_REWRITES, as DetectMultiBackend does for QDQ files)."""
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
    return ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"],
                                disabled_optimizers=list(ORT_QDQ_REWRITES) if as_written else [])


def kernels_run(onnx_path, threads=1, as_written=False) -> dict:
    """The op types of the graph onnxruntime runs after its optimizations (QDQ pairs around a Conv fused into
    QLinearConv, etc.), read back from SessionOptions.optimized_model_filepath.

    Returns {"ops": Counter, "int8": {op: n}, "float_convs": n, "qdq_left": n (Q/DQ nodes still executed),
    "int8_ran": bool}.
    """
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        ort_session(onnx_path, threads, optimized_model_filepath=opt, as_written=as_written)
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
# int8 QDQ model: a pow2 QAT model exported by export.py
# ---------------------------------------------------------------------------------------------------------------------

def qat_checkpoint(float_weights, out_path, size=320, n_batches=2, batch_size=2, recipe=None):
    """A QAT checkpoint made here: the float model of `float_weights` prepared for QAT (BN live with simulated
    folding, power-of-two scales, `recipe` or the default one), calibrated on `n_batches` batches of shapes val
    images at `size` (seeded noise when the dataset is absent), saved to `out_path`. Returns out_path."""
    model = load_pytorch_model(float_weights, fuse=False).float().train()
    prepare_yolo_qat(model, bn_folding=True, pow2=True, recipe=recipe)
    files = sorted((ROOT / "datasets/shapes/images/val").glob("*.jpg"))[:n_batches * batch_size]
    if len(files) == n_batches * batch_size:
        images = np.stack([im for _, im, *_ in LoadImages([str(f) for f in files], img_size=size, auto=False)])
        images = torch.from_numpy(images)
    else:
        g = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (n_batches * batch_size, 3, size, size), dtype=torch.uint8, generator=g)
    batches = [(images[i:i + batch_size],) for i in range(0, len(images), batch_size)]
    calibrate(model, batches, n_batches, torch.device("cpu"))
    save_checkpoint({"model": model.eval(), "ema": None, "epoch": -1, "best_fitness": None}, out_path)
    return Path(out_path)


def qdq_row(onnx_path, threads=1, label="int8 QDQ (onnxruntime)", as_written=False) -> dict:
    """How onnxruntime runs an int8 QDQ file: the kernels it really executes and a callable for timing.

    Returns {"label", "run": callable running one batch-1 inference on the file's input shape, "kernels": kernels_run}.
    """
    session = ort_session(onnx_path, threads, as_written=as_written)
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    return {"label": label, "run": lambda: session.run(None, {inp.name: x}),
            "kernels": kernels_run(onnx_path, threads, as_written=as_written)}


def _kernel_note(k: dict) -> str:
    if k["int8_ran"]:
        int8 = ", ".join(f"{n} {op}" for op, n in k["int8"].items())
        return f"int8 kernels ran: {int8}; float convs left {k['float_convs']}, Q/DQ nodes left {k['qdq_left']}"
    return (f"NO int8 kernels: onnxruntime runs {k['float_convs']} float convs and {k['qdq_left']} Q/DQ nodes "
            f"(fake-quant in float)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(ROOT.parent / "shared/reference/yolov5n_silu.pt"), help="float .pt")
    p.add_argument("--qat-weights", default=str(ROOT.parent / "shared/reference/yolov5n_relu.pt"),
                   help="float .pt the QAT model is prepared from (pow2, BN folding, calibrated here)")
    p.add_argument("--qat-recipe", default=None, help="QAT recipe yaml (data/quant/*.yaml; default: the default one)")
    p.add_argument("--no-qat", action="store_true", help="skip the QAT model")
    p.add_argument("--sizes", nargs="+", type=int, default=[320, 640], help="square image sizes")
    p.add_argument("--runs", type=int, default=20, help="timed rounds per size")
    p.add_argument("--threads", type=int, default=1,
                   help="threads for both PyTorch and onnxruntime (on a busy machine more than 1 mostly measures "
                        "PyTorch's OpenMP threads waiting for each other)")
    p.add_argument("--qdq", nargs="*", default=[], help="more int8 QDQ .onnx files (batch 1, one of --sizes)")
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
        qat_pt, qat_model = None, None
        if not opt.no_qat:
            qat_pt = qat_checkpoint(opt.qat_weights, Path(tmp) / "qat.pt", size=min(opt.sizes), recipe=opt.qat_recipe)
            qat_model = export.prepare_for_export(load_pytorch_model(qat_pt))
        for size in opt.sizes:
            sub = Path(tmp) / str(size)
            sub.mkdir()
            shutil.copy(pt, sub / pt.name)
            (onnx_file,) = export.run(weights=sub / pt.name, imgsz=(size, size), include=["onnx"])
            im = export.sample_batch((1, 3, size, size))
            x = im.numpy()
            session = ort_session(onnx_file, opt.threads)
            fns = {"PyTorch fp32": lambda: model(im), "onnxruntime fp32": lambda: session.run(None, {"images": x})}
            extra = []
            if qat_pt is not None:
                shutil.copy(qat_pt, sub / qat_pt.name)
                (q_file,) = export.run(weights=sub / qat_pt.name, imgsz=(size, size), include=["onnx"])
                fns["PyTorch QAT fake-quant (fp32 ops)"] = lambda: qat_model(im)
                extra += [qdq_row(q_file, opt.threads, "onnxruntime int8 QDQ of the QAT model, defaults"),
                          qdq_row(q_file, opt.threads, "onnxruntime int8 QDQ of the QAT model, as written",
                                  as_written=True)]
            extra += [qdq_row(f, opt.threads, f"onnxruntime int8 QDQ {Path(f).name}")
                      for f in qdq_by_size.get(size, [])]
            for r in extra:
                fns[r["label"]] = r["run"]
                notes.append(f"{size}: {r['label']}: {_kernel_note(r['kernels'])}")
            with torch.no_grad():
                ms = interleaved_ms(fns, opt.runs)
            base = ms["PyTorch fp32"]
            rows += [(size, k, v, base / v) for k, v in ms.items()]

    import onnxruntime as ort

    qat = "" if opt.no_qat else f", QAT from {Path(opt.qat_weights).name}, recipe {opt.qat_recipe or 'default'}"
    LOGGER.info(f"\nCPU latency, batch 1, {opt.threads} thread(s), median of {opt.runs} interleaved rounds "
                f"(torch {torch.__version__}, onnxruntime {ort.__version__}, float {Path(opt.weights).name}{qat})")
    LOGGER.info(f"{'size':>6} {'runtime':<58} {'ms':>9} {'speed vs PyTorch':>17}")
    for size, k, v, ratio in rows:
        LOGGER.info(f"{size:>6} {k:<58} {v:>9.2f} {ratio:>16.2f}x")
    for n in notes:
        LOGGER.info(n)
    return rows


if __name__ == "__main__":
    main()
