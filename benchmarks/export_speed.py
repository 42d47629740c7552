"""Deployment latency on CPU, int8 against float in each runtime: a float YOLOv5 model in PyTorch, onnxruntime and
OpenVINO, and a power-of-two QAT model of the same architecture exported by export.py (ONNX QDQ, OpenVINO IR) in
onnxruntime and OpenVINO, measured side by side in one run.

    python benchmarks/export_speed.py [--weights ../shared/reference/yolov5n_relu.pt] [--sizes 320 640]
                                      [--batch-sizes 1 8] [--threads 1 2] [--runs 10] [--qat-recipe R.yaml]

The QAT model is `--weights` prepared for QAT here (BN folding, power-of-two scales, the default recipe or
--qat-recipe) and calibrated on a few shapes val images (seeded noise when the dataset is absent): a real QAT model,
whose accuracy does not matter for latency. For each size and batch size both checkpoints are exported by export.py
at that fixed shape (--include onnx openvino, each file checked against PyTorch), then for each thread count the
runtimes are called in interleaved rounds (one call each per round, so load from other processes hits all alike).
The table shows medians, the speed relative to PyTorch fp32 and, for int8 rows, relative to the fp32 model in the
same runtime. What ran in int8 is read from the runtimes, not assumed: onnxruntime's optimized graph
(SessionOptions.optimized_model_filepath: QLinearConv ... nodes) and OpenVINO's runtime model (the precision each
Convolution ran in). onnxruntime gets the QDQ file as DetectMultiBackend gives it (utils.runtimes.onnxruntime_session:
int8 weights as stored on a CPU with VNNI, else as uint8 + 128, so that its int8 kernels are exact); the header says
which.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
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
from models.checkpoint import save_checkpoint
from models.quant import QATConfig, calibrate, prepare_yolo_qat
from utils.cpuinfo import cpu_flags
from utils.dataloaders import LoadImages
from utils.general import LOGGER
from utils.runtimes import int8_weight_form, onnxruntime_session, openvino_compiled, openvino_run, openvino_xml
from workflow.backend import load_pytorch_model

INT8_KERNELS = ("QLinearConv", "ConvInteger", "QLinearMatMul", "MatMulInteger", "QLinearAdd", "QLinearConcat",
                "QLinearSigmoid", "QLinearMul", "QGemm", "DynamicQuantizeLinear")
FLOAT_CONVS = ("Conv", "FusedConv", "NchwcConv")
CPU_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16")


def kernels_run(onnx_path, threads=1, as_written=False) -> dict:
    """The op types of the graph onnxruntime runs after its optimizations (QDQ pairs around a Conv fused into
    QLinearConv, etc.), read back from SessionOptions.optimized_model_filepath.

    Returns {"ops": Counter, "int8": {op: n}, "float_convs": n, "qdq_left": n (Q/DQ nodes still executed),
    "int8_ran": bool}.
    """
    import onnx

    with tempfile.TemporaryDirectory() as d:
        opt = Path(d) / "optimized.onnx"
        onnxruntime_session(onnx_path, threads=threads, as_written=as_written, optimized_model_filepath=opt)
        ops = Counter(n.op_type for n in onnx.load(str(opt), load_external_data=False).graph.node)
    int8 = {k: ops[k] for k in INT8_KERNELS if ops[k]}
    return {"ops": ops, "int8": int8, "float_convs": sum(ops[k] for k in FLOAT_CONVS),
            "qdq_left": ops["QuantizeLinear"] + ops["DequantizeLinear"], "int8_ran": bool(int8)}


def openvino_conv_precisions(compiled) -> Counter:
    """How many convolutions OpenVINO's CPU plugin runs in each precision (u8/i8: int8 kernels), from its runtime
    model."""
    found = Counter()
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if info["layerType"].astype(str) == "Convolution":
            found[info["runtimePrecision"].astype(str)] += 1
    return found


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


# ---------------------------------------------------------------------------------------------------------------------
# int8 QDQ model: a pow2 QAT model exported by export.py
# ---------------------------------------------------------------------------------------------------------------------

def qat_checkpoint(float_weights, out_path, size=320, n_batches=2, batch_size=2, recipe=None):
    """A QAT checkpoint made here: the float model of `float_weights` prepared for QAT (BN live with simulated
    folding, power-of-two scales, `recipe` or the default one), calibrated on `n_batches` batches of shapes val
    images at `size` (seeded noise when the dataset is absent), saved to `out_path`. Returns out_path."""
    model = load_pytorch_model(float_weights, fuse=False).float().train()
    prepare_yolo_qat(model, QATConfig(bn_folding=True, pow2=True, recipe=recipe))
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


def _kernel_note(k: dict) -> str:
    if k["int8_ran"]:
        int8 = ", ".join(f"{n} {op}" for op, n in k["int8"].items())
        return f"int8 kernels ran: {int8}; float convs left {k['float_convs']}, Q/DQ nodes left {k['qdq_left']}"
    return (f"NO int8 kernels: onnxruntime runs {k['float_convs']} float convs and {k['qdq_left']} Q/DQ nodes "
            f"(fake-quant in float)")


def exports(weights, folder, size, batch):
    """export.py of `weights` (copied into `folder`) at (batch, 3, size, size): (onnx path, OpenVINO folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    pt = folder / Path(weights).name
    shutil.copy(weights, pt)
    level = LOGGER.level
    LOGGER.setLevel("WARNING")  # the table is the output; export.py's warnings still show
    try:
        onnx_file, ov_folder = export.run(weights=pt, imgsz=(size, size), batch_size=batch,
                                          include=["onnx", "openvino"])
    finally:
        LOGGER.setLevel(level)
    return onnx_file, ov_folder


def ort_profile(onnx_path, x, threads, runs=10, **session_kw) -> dict:
    """Milliseconds per run by op type of the graph onnxruntime runs (after its optimizations), from its profiler
    (SessionOptions.enable_profiling), over `runs` runs after 3 warmup runs: {op type: ms}, largest first; "(run)"
    is the whole run."""
    with tempfile.TemporaryDirectory() as d:
        session = onnxruntime_session(onnx_path, threads=threads, spinning=False, profile_prefix=Path(d) / "profile",
                                      **session_kw)
        feed = {session.get_inputs()[0].name: x}
        for _ in range(3 + runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    timed = sorted((e for e in events if e.get("cat") == "Session" and e["name"] == "model_run"),
                   key=lambda e: e["ts"])[-runs:]
    per_op = Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= timed[0]["ts"]:
            per_op[e["args"]["op_name"]] += e["dur"] / runs / 1e3
    return {"(run)": sum(e["dur"] for e in timed) / runs / 1e3, **dict(per_op.most_common())}


def ov_profile(xml, x, threads, runs=10) -> dict:
    """Milliseconds per run by node type and precision of the graph OpenVINO's CPU plugin runs (its per-node
    counters), over `runs` runs after 3 warmup runs: {"Convolution i8": ms, ...}, largest first; "(run)" is the sum
    over all nodes."""
    request = openvino_compiled(xml, threads=threads, profile=True).create_infer_request()
    for _ in range(3):
        openvino_run(request, x)
    per_node = Counter()
    for _ in range(runs):
        openvino_run(request, x)
        for node in request.get_profiling_info():
            ms = node.real_time.total_seconds() * 1e3 / runs
            if ms > 0:
                per_node[f"{node.node_type} {node.exec_type.rsplit('_', 1)[-1].lower()}"] += ms
    return {"(run)": sum(per_node.values()), **dict(per_node.most_common())}


def _openvino_call(compiled):
    """A function running `compiled` through one InferRequest (which holds on to `compiled`)."""
    request = compiled.create_infer_request()
    return lambda x, compiled=compiled: openvino_run(request, x)


def measure(model, files, size, batch, threads, runs):
    """Median ms of each runtime at one (size, batch, threads); returns (times, notes, profiles)."""
    torch.set_num_threads(threads)
    im = export.sample_batch((batch, 3, size, size))
    x = im.numpy()
    (f32_onnx, f32_ov), (q_onnx, q_ov) = files
    ort_f32 = onnxruntime_session(f32_onnx, threads=threads, spinning=False)
    ort_q = onnxruntime_session(q_onnx, threads=threads, spinning=False)
    ort_q_file = onnxruntime_session(q_onnx, threads=threads, spinning=False, space_to_depth=False)
    ov_q_model = openvino_compiled(openvino_xml(q_ov), threads=threads)
    ov_f32, ov_q = _openvino_call(openvino_compiled(openvino_xml(f32_ov), threads=threads)), _openvino_call(ov_q_model)
    fns = {"PyTorch fp32": lambda: model(im),
           "onnxruntime fp32": lambda: ort_f32.run(None, {"images": x}),
           "onnxruntime int8": lambda: ort_q.run(None, {"images": x}),
           "onnxruntime int8*": lambda: ort_q_file.run(None, {"images": x}),
           "OpenVINO fp32": lambda: ov_f32(x),
           "OpenVINO int8": lambda: ov_q(x)}
    with torch.no_grad():
        ms = interleaved_ms(fns, runs)
    conv = openvino_conv_precisions(ov_q_model)
    notes = [f"onnxruntime int8: {_kernel_note(kernels_run(q_onnx, threads))}",
             "OpenVINO int8: convolutions by runtime precision " + ", ".join(f"{k} {v}" for k, v in conv.items())]
    profiles = {"onnxruntime int8": ort_profile(q_onnx, x, threads),
                "onnxruntime fp32": ort_profile(f32_onnx, x, threads),
                "OpenVINO int8": ov_profile(openvino_xml(q_ov), x, threads),
                "OpenVINO fp32": ov_profile(openvino_xml(f32_ov), x, threads)}
    return ms, notes, profiles


def cpu_description() -> str:
    """The CPU model and the vector / int8 instruction flags it has."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    except OSError:
        pass
    have = [f for f in CPU_FLAGS if f in cpu_flags()]
    return f"{name}, {os.cpu_count()} cores, flags: {' '.join(have) or 'none of ' + ' '.join(CPU_FLAGS)}"


def _profile_lines(profiles, size, batch, threads, top=9):
    lines = []
    for runtime, ops in profiles.items():
        ops = dict(ops)
        total = ops.pop("(run)")
        parts = ", ".join(f"{op} {v:.2f}" for op, v in list(ops.items())[:top])
        lines.append(f"{size:>5} {batch:>5} {threads:>7}  {runtime:<17} {total:8.2f}  {parts}")
    return lines


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--weights", default=str(ROOT.parent / "shared/reference/yolov5n_relu.pt"),
                   help="float .pt; the QAT model is prepared from it")
    p.add_argument("--qat-recipe", default=None, help="QAT recipe yaml (data/quant/*.yaml; default: the default one)")
    p.add_argument("--sizes", nargs="+", type=int, default=[256, 640], help="square image sizes")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8], help="batch sizes")
    p.add_argument("--threads", nargs="+", type=int, default=[1, 2], help="thread counts (every runtime gets the same)")
    p.add_argument("--runs", type=int, default=10, help="timed rounds per configuration")
    opt = p.parse_args(argv)

    rows, notes, profile_lines = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = export.prepare_for_export(load_pytorch_model(opt.weights))
        qat_pt = qat_checkpoint(opt.weights, tmp / "qat.pt", size=min(opt.sizes), recipe=opt.qat_recipe)
        for size in opt.sizes:
            for batch in opt.batch_sizes:
                files = [exports(w, tmp / f"{size}_{batch}" / kind, size, batch)
                         for w, kind in ((opt.weights, "fp32"), (qat_pt, "qat"))]
                for threads in opt.threads:
                    ms, found, profiles = measure(model, files, size, batch, threads, opt.runs)
                    profile_lines += _profile_lines(profiles, size, batch, threads)
                    base = ms["PyTorch fp32"]
                    for k, v in ms.items():
                        fp32 = ms.get(k.split(" ")[0] + " fp32") if "int8" in k else None
                        rows.append((size, batch, threads, k, v, base / v, fp32 / v if fp32 else None))
                    notes += [f"{size} batch {batch} threads {threads}: {n}" for n in found]

    import onnxruntime as ort
    import openvino as ov

    form = int8_weight_form()
    LOGGER.info(f"\nCPU latency, median of {opt.runs} interleaved rounds (torch {torch.__version__}, onnxruntime "
                f"{ort.__version__}, openvino {ov.get_version().split('-')[0]}; {Path(opt.weights).name} and its "
                f"pow2 QAT model, recipe {opt.qat_recipe or 'default'}; onnxruntime int8 weights given as {form}, "
                f"CPU {'with' if form == 'int8' else 'without'} VNNI)\nCPU: {cpu_description()}\n"
                f"onnxruntime int8: as DetectMultiBackend runs the file (first conv as SpaceToDepth + 3x3 conv, "
                f"utils.graph_forms); int8*: the file as it is. OpenVINO: the export's IR "
                f"(graph_forms.openvino_form), one InferRequest reading the input in place")
    LOGGER.info(f"{'size':>5} {'batch':>5} {'threads':>7}  {'runtime':<18} {'ms':>9} {'vs PyTorch fp32':>16} "
                f"{'int8 vs fp32':>13}")
    for size, batch, threads, k, v, ratio, vs_fp32 in rows:
        same = f"{vs_fp32:>12.2f}x" if vs_fp32 else f"{'':>13}"
        LOGGER.info(f"{size:>5} {batch:>5} {threads:>7}  {k:<18} {v:>9.1f} {ratio:>15.2f}x {same}")
    for n in notes:
        LOGGER.info(n)
    LOGGER.info("\nwhere the time goes: ms per run by op type of the graph each runtime runs (onnxruntime's profiler; "
                "OpenVINO's per-node counters, by node type and the precision it ran in; the largest first)")
    LOGGER.info(f"{'size':>5} {'batch':>5} {'threads':>7}  {'runtime':<17} {'total':>8}  op type ms")
    for line in profile_lines:
        LOGGER.info(line)
    return rows


if __name__ == "__main__":
    main()
