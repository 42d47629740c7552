"""Sessions of the runtimes that run exported files on the CPU: onnxruntime (a QDQ graph on its int8 kernels, arranged
so that they compute the graph's integers exactly, or run as written) and OpenVINO (one Core per process, a model with
dynamic dimensions compiled for each input shape). DetectMultiBackend, export.py's checks and the benchmarks open
files through these, so all of them run a file the same way."""
from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np

from utils.cpuinfo import VNNI_FLAGS, cpu_flags
from utils.graph_forms import onnxruntime_kernel_form, space_to_depth_form

# onnxruntime graph rewrites that change the numbers of a QDQ graph: WeightBiasQuantization rounds float conv biases
# to the int32 grid input_scale * weight_scale; QDQSelectorActionTransformer fuses DequantizeLinear -> op ->
# QuantizeLinear into int8 kernels (QLinearConv, QLinearAdd, QLinearConcat ...). Without them the graph runs as the
# ONNX spec defines it (float arithmetic on the dequantized values).
ORT_QDQ_REWRITES = ("WeightBiasQuantization", "QDQSelectorActionTransformer")


def int8_weight_form() -> str:
    """How onnxruntime_session hands a QDQ file's int8 weights to onnxruntime's int8 kernels on this CPU: "int8" as
    stored where the CPU has VNNI (its u8 x s8 kernel then accumulates in 32 bits: exact, and 2-2.7x faster than the
    uint8 path for yolov5n), else "uint8" (onnxruntime_kernel_form: exact on every CPU)."""
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    return "int8" if x86 and any(f in cpu_flags() for f in VNNI_FLAGS) else "uint8"


def onnxruntime_session(model, providers=("CPUExecutionProvider",), as_written=False, threads=0,
                        optimized_model_filepath=None, spinning=True, weights=None, space_to_depth=True,
                        profile_prefix=None):
    """An onnxruntime InferenceSession of `model` (a path or serialized bytes) with its default optimizations: a QDQ
    graph runs on onnxruntime's int8 kernels, its int8 weights given to them as `weights` says ("int8": as stored;
    "uint8": onnxruntime_kernel_form; None: int8_weight_form(), the exact and faster one for this CPU), and with
    space_to_depth=True a strided first convolution on the few image channels as SpaceToDepth + a stride-1
    convolution (utils.graph_forms.space_to_depth_form: the same integers, 2.3x faster than onnxruntime's int8
    kernel on 3 channels); as_written=True turns off ORT_QDQ_REWRITES instead, so a QDQ graph computes exactly its
    QuantizeLinear/DequantizeLinear semantics with float kernels. threads: intra-op threads (0: ORT's default);
    optimized_model_filepath: where onnxruntime saves the graph it runs; spinning=False stops idle threads from
    spinning (for timing it beside other runtimes); profile_prefix: turns on onnxruntime's profiler, which writes
    per-node times to a json file with this prefix (session.end_profiling() returns its path)."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    if optimized_model_filepath:
        so.optimized_model_filepath = str(optimized_model_filepath)
        so.log_severity_level = 3  # no notice that the saved graph holds hardware-specific layouts
    if profile_prefix:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_prefix)
    if not spinning:
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    disabled = list(ORT_QDQ_REWRITES) if as_written else []
    model = str(model) if isinstance(model, Path) else model
    weights = weights or int8_weight_form()
    if weights not in ("int8", "uint8"):
        raise ValueError(f"weights={weights!r}: use 'int8', 'uint8' or None")
    if not as_written and (weights == "uint8" or space_to_depth):
        proto = onnx.load_from_string(model) if isinstance(model, bytes) else onnx.load(model)
        changed = space_to_depth_form(proto)[1] if space_to_depth else 0
        if weights == "uint8":
            changed += onnxruntime_kernel_form(proto)[1]
        if changed:
            model = proto.SerializeToString()
    return ort.InferenceSession(model, so, providers=list(providers), disabled_optimizers=disabled)


OPENVINO_DIR = "_openvino_model"  # export.py --include openvino writes <stem>_openvino_model/<stem>.xml/.bin/.yaml


def openvino_xml(path) -> Path | None:
    """The OpenVINO IR .xml of `path` (an .xml file, or a *_openvino_model folder holding one); None if neither."""
    path = Path(path)
    if path.suffix.lower() == ".xml":
        return path
    if path.name.endswith(OPENVINO_DIR) or path.is_dir():
        found = sorted(path.glob("*.xml")) if path.is_dir() else []
        return found[0] if len(found) == 1 else None
    return None


@functools.lru_cache(maxsize=None)
def openvino_core():
    """The process's one openvino.Core (every compiled model shares its CPU plugin and thread pools)."""
    import openvino as ov

    return ov.Core()


def openvino_compiled(model, threads=0, shape=None, profile=False):
    """OpenVINO's CPU plugin compiling `model` (an .xml path or an openvino.Model) for latency; threads: inference
    threads (0: OpenVINO's default); shape: the input shape to compile a model with dynamic dimensions for. A QDQ
    model's QuantizeLinear/DequantizeLinear become FakeQuantize, which the CPU plugin runs as int8 convolutions (see
    the export_speed benchmark for what ran in int8). Float layers run in float32: on CPUs with bfloat16 units (AMX,
    AVX512_BF16) the plugin would otherwise run them in bfloat16, whose 8-bit mantissa moves outputs by about 1e-3
    of their range. A model with dynamic dimensions is compiled for `shape`: compiled for dynamic shapes, the
    plugin's int8 kernels gave other integers than for the same model at a fixed shape (all raw outputs of a yolov5n
    moved, by up to 56 steps), at a fixed shape they are exact (utils.graph_forms.openvino_form). profile: count
    each node's time (InferRequest.get_profiling_info), which slows every run a little."""
    core = openvino_core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    if profile:
        config["PERF_COUNT"] = "YES"
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    model = core.read_model(str(model)) if isinstance(model, (str, Path)) else model
    if shape is not None and model.is_dynamic():
        model.reshape([int(d) for d in shape])
    return core.compile_model(model, "CPU", config)


def openvino_run(request, x):
    """The first output of OpenVINO InferRequest `request` on numpy `x` (cast to float32 contiguous), read without
    copying the input into a new tensor; the output is a copy the caller may keep."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    return request.infer({0: x}, share_inputs=True, share_outputs=False)[0]
