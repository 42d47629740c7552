"""Integer export (--include integer): the integer model of a power-of-two QAT model as data, <stem>_integer_model/
(model.json, tensors.npz, example.npz) with run_integer.py, a runner that needs only numpy."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch
import torch.nn as nn

from bst.torch.ao.quantization.integer_graph import record
from models.quant import convert_yolo, integer_head, is_quantized
from utils.general import UserError
from workflow.exporters.common import FORMATS, ExportJob


@torch.no_grad()
def export_integer(model, im, file) -> tuple[Path, nn.Module]:
    """The integer model of a power-of-two QAT model, as hardware teams take it: bst.convert of the model, its
    integer reference recorded op by op on `im` and saved as `<stem>_integer_model/` (model.json: ops, tensors'
    exponents and zero points, input quantization; tensors.npz: int8 weights, int32 biases, per-channel shifts;
    example.npz; run_integer.py, a runner needing only numpy; format in bst/torch/ao/quantization/integer_runner.py).

    Returns the folder and the converted network it was recorded from, which workflow.exporters.verify.verify_integer
    checks the folder against (on every batch it is given and on a second input size: the raw head outputs of the
    PyTorch model, of bst's integer reference and of the numpy runner must be identical)."""
    if not (is_quantized(model) and model.qat_config.pow2):
        raise UserError(f"{file}: --include integer needs a QAT checkpoint with power-of-two scales (train.py --qat "
                        f"--pow2-scale); requantization by a shift needs them")
    converted = convert_yolo(model, im[:1])
    graph, outs = record(lambda: integer_head(converted, im))
    f = Path(file).with_name(Path(file).stem + FORMATS["integer"])
    if f.exists():
        shutil.rmtree(f) if f.is_dir() else f.unlink()
    graph.save(f, im, outs)
    return f, converted


def integer_folder(job: ExportJob) -> Path:
    """export.py's integer exporter: the folder recorded from the job's (fake-quant) model; the converted network
    stays on the job for the verification step."""
    f, job.integer_network = export_integer(job.model, job.im, job.weights)
    return f
