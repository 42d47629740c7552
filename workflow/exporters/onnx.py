"""ONNX export (--include onnx): the TorchScript-based exporter's file with metadata_props; a QAT model's file is int8
QDQ, the ONNX form of bst.convert's integer network (checked as a QDQ graph by workflow.exporters.verify).

The module shares the onnx package's name: imports are absolute, so `import onnx` here is that package."""
from __future__ import annotations

from pathlib import Path

import onnx
import torch

from bst.torch.ao.nn.quantized.onnx_form import own_initializers
from utils.general import LOGGER, UserError, colorstr
from workflow.exporters.common import DEFAULT_OPSET, FORMATS, INPUT_NAME, OUTPUT_NAME, ExportJob
from workflow.exporters.verify import quiet_tracing


def simplifier():
    """The maintained ONNX simplifier that is installed (onnxslim preferred, else onnxsim), or None."""
    try:
        import onnxslim

        return "onnxslim", lambda m: onnxslim.slim(m)
    except ImportError:
        pass
    try:
        import onnxsim

        def simplify(m):
            m, ok = onnxsim.simplify(m)
            if not ok:
                raise RuntimeError("onnxsim could not validate the simplified model")
            return m

        return "onnxsim", simplify
    except ImportError:
        return None


def export_onnx(model, im, file, metadata, opset=DEFAULT_OPSET, dynamic=False, simplify=False, verbose=False,
                prefix=colorstr("ONNX:")) -> Path:
    """Export with the TorchScript-based exporter, `torch.onnx.export(..., dynamo=False)`.

    Why not the newer dynamo exporter (torch.export + onnxscript)? It was known for not handling fake-quant ops.
    Checked with torch 2.14 / onnxscript 0.7.2 on a one-conv fake-quant module: on the plain
    `fake_quantize_per_{tensor,channel}_affine` ops both exporters now write the same QuantizeLinear/
    DequantizeLinear (per-channel axis 0) and onnxruntime matches PyTorch; on the training-form ops
    (`_fake_quantize_learnable_per_tensor_affine`, `fused_moving_avg_obs_fake_quant`) both fail, and both refuse
    (quant_min, quant_max) outside {(0, 127), (0, 255), (-128, 127)}, e.g. a narrow-range (-127, 127) weight
    quantizer. So the choice rests on the rest: this exporter writes the opset asked for (dynamo raises it to >= 18
    and converts down afterwards) and needs no onnxscript package, which is not a dependency here.

    QAT models: traced as they are, bst's fake quantizers would not become QDQ at all (on CPU they run a custom
    autograd function, which the exporter inlines into Mul/Round/Clip; LearnableFakeQuantize likewise). So `model`
    is then the converted model (bst.convert, models.quant.convert_yolo), whose modules write their ONNX form
    (bst.torch.ao.nn.quantized.onnx_form): QuantizeLinear -> DequantizeLinear per activation quantizer, int8 weight
    and int32 bias initializers -> DequantizeLinear (integers computed by PyTorch, not re-rounded by a runtime); each
    QDQ node then gets its own named constants (`own_initializers`).

    The file gets metadata_props stride, names and quantized ("1" for a fake-quant model), as DetectMultiBackend
    reads them; a quantized model also pow2 ("1" when every quantizer keeps power-of-two scales).
    """
    LOGGER.info(f"\n{prefix} starting export with onnx {onnx.__version__} opset {opset}...")
    f = Path(file).with_suffix(FORMATS["onnx"])
    axes = {INPUT_NAME: {0: "batch", 2: "height", 3: "width"}, OUTPUT_NAME: {0: "batch", 1: "anchors"}} \
        if dynamic else None
    try:
        with quiet_tracing():
            torch.onnx.export(model, (im,), str(f), verbose=verbose, opset_version=opset, do_constant_folding=True,
                              input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes, dynamo=False)
    except ValueError as e:  # what a converted module's ONNX form cannot hold (bst onnx_form)
        raise UserError(f"{file}: {e}") from None
    proto = onnx.load(str(f))
    if metadata.get("quantized"):
        own_initializers(proto)
    onnx.checker.check_model(proto)
    if simplify:
        name, simplify_fn = simplifier()
        LOGGER.info(f"{prefix} simplifying with {name}...")
        proto = simplify_fn(proto)
        onnx.checker.check_model(proto)
    del proto.metadata_props[:]
    meta = {"stride": str(metadata["stride"]), "names": str(metadata["names"]),
            "quantized": "1" if metadata.get("quantized") else "0"}
    if metadata.get("quantized"):
        meta["pow2"] = "1" if metadata.get("pow2") else "0"
    for k, v in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, str(f))
    return f


def onnx_file(job: ExportJob) -> Path:
    """export.py's ONNX exporter: the job's export model (the converted network of a QAT model, written as QDQ);
    the file is kept on the job for the OpenVINO exporter, which converts it."""
    job.onnx_file = export_onnx(job.export_model, job.im, job.weights, job.metadata, opset=job.opset,
                                dynamic=job.dynamic, simplify=job.simplify, verbose=job.verbose)
    return job.onnx_file
