"""OpenVINO export (--include openvino): IR converted from an ONNX file of the model, in upstream's
<stem>_openvino_model/ layout (<stem>.xml, .bin and .yaml); a QAT model's QDQ pairs become int8 FakeQuantize nodes.

The module shares the openvino package's name: imports are absolute, so `import openvino` here is that package."""
from __future__ import annotations

import shutil
from pathlib import Path

import onnx

from models.yolo import Detect
from utils.general import LOGGER, UserError, colorstr, yaml_save
from utils.graph_forms import openvino_form
from workflow.exporters.common import DEFAULT_OPSET, FORMATS, ExportJob
from workflow.exporters.onnx import export_onnx


def openvino_source(model, im, file, metadata, opset=DEFAULT_OPSET, dynamic=False) -> Path:
    """The ONNX file export_openvino converts: `model` exported as export_onnx does, with Detect's decode as one
    elementwise chain (Detect.decode_fused: the same numbers; OpenVINO runs it as one fused kernel where it ran
    decode's channel split and concatenation with its slow reference kernels), as <stem>_openvino_source.onnx."""
    detects = [m for m in model.modules() if isinstance(m, Detect)]
    for m in detects:
        m.fused_decode = True
    try:
        level = LOGGER.level
        LOGGER.setLevel("WARNING")  # export_onnx's own lines: the ONNX file is announced once
        return export_onnx(model, im, Path(file).with_name(f"{Path(file).stem}_openvino_source.pt"), metadata,
                           opset=opset, dynamic=dynamic)
    finally:
        LOGGER.setLevel(level)
        for m in detects:
            m.fused_decode = False


def export_openvino(onnx_file, metadata, shape, dynamic=False, half=False, source=None,
                    prefix=colorstr("OpenVINO:")) -> Path:
    """OpenVINO IR converted from the ONNX file export_onnx wrote (openvino.convert_model), in upstream's layout:
    <stem>_openvino_model/<stem>.xml and .bin, plus <stem>.yaml with stride and names and, for DetectMultiBackend,
    quantized, pow2, shape and dynamic. --half stores the weights as float16 (compress_to_fp16). A QDQ file's
    QuantizeLinear/DequantizeLinear pairs become FakeQuantize nodes with the same scales, which OpenVINO's CPU plugin
    runs as int8 convolutions. The graph converted is utils.graph_forms.openvino_form of `source` (default: the
    file; export.py gives `openvino_source`): the same numbers, arranged so that OpenVINO computes a QAT model's
    integers exactly (a Clip keeps the rounding of a convolution output that an Add reads, which OpenVINO's fused
    convolution + sum drops otherwise) and transposes the head outputs as integers."""
    import openvino as ov

    LOGGER.info(f"\n{prefix} starting export with openvino {ov.get_version().split('-')[0]}...")
    onnx_file = Path(onnx_file)
    source = onnx_file if source is None else Path(source)
    folder = onnx_file.with_name(onnx_file.stem + FORMATS["openvino"])
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        form = tmp / f"{onnx_file.stem}_openvino_form.onnx"  # the same numbers, arranged for OpenVINO (graph_forms)
        proto, counts = openvino_form(onnx.load(str(source)))
        onnx.save(proto, str(form))
        ov.save_model(ov.convert_model(str(form)), str(tmp / f"{onnx_file.stem}.xml"), compress_to_fp16=half)
        form.unlink()
    except Exception as e:  # OpenVINO's own exception types
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"{onnx_file}: OpenVINO could not convert it ({str(e).strip().splitlines()[0][:200]})") \
            from None
    meta = {"stride": int(metadata["stride"]), "names": dict(metadata["names"]),
            "quantized": bool(metadata.get("quantized")), "pow2": bool(metadata.get("pow2")),
            "shape": list(shape), "dynamic": bool(dynamic)}
    yaml_save(tmp / f"{onnx_file.stem}.yaml", meta)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def openvino_folder(job: ExportJob) -> Path:
    """export.py's OpenVINO exporter: the folder converted from `openvino_source` of the job's export model, named
    after the ONNX file the onnx exporter wrote (export.py runs that one first). The source file stays on the job
    until the verification step has read it (ExportJob.remove_temporary deletes it)."""
    job.openvino_source = openvino_source(job.export_model, job.im, job.onnx_file, job.metadata, opset=job.opset,
                                          dynamic=job.dynamic)
    return export_openvino(job.onnx_file, job.metadata, job.im.shape, dynamic=job.dynamic, half=job.half,
                           source=job.openvino_source, prefix=colorstr("OpenVINO:"))

