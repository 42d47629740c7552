"""TorchScript export (--include torchscript): the model traced at the export shape, saved as <stem>.torchscript with
config.txt (json shape, stride, names, dynamic) as an extra file; optionally optimized for the mobile interpreter."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.mobile_optimizer import optimize_for_mobile

from utils.general import LOGGER, colorstr
from workflow.exporters.common import FORMATS, ExportJob
from workflow.exporters.verify import quiet_tracing


def export_torchscript(model, im, file, metadata, optimize=False, dynamic=False,
                       prefix=colorstr("TorchScript:")) -> Path:
    """Trace the model at im's shape; config.txt (json shape, stride, names, dynamic) rides along as an extra file.

    The trace fixes h and w (the Detect grids are constants) unless the model was prepared with dynamic=True.

    optimize=True rewrites it for the mobile (lite) interpreter; torch.jit.load still reads the result.
    """
    LOGGER.info(f"\n{prefix} starting export with torch {torch.__version__}...")
    f = Path(file).with_suffix(FORMATS["torchscript"])
    with quiet_tracing():
        ts = torch.jit.trace(model, im, strict=False, check_trace=False)  # verify_torchscript checks the file
    config = {"shape": list(im.shape), "stride": metadata["stride"], "names": metadata["names"], "dynamic": dynamic}
    extra = {"config.txt": json.dumps(config)}
    if optimize:
        optimize_for_mobile(ts)._save_for_lite_interpreter(str(f), _extra_files=extra)
    else:
        ts.save(str(f), _extra_files=extra)
    return f


def torchscript_file(job: ExportJob) -> Path:
    """export.py's TorchScript exporter: the job's export model traced (the converted network of a QAT model)."""
    return export_torchscript(job.export_model, job.im, job.weights, job.metadata, optimize=job.optimize,
                              dynamic=job.dynamic)
