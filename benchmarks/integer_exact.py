"""One integer network, computed five ways: the PyTorch QAT model (eval, frozen), bst's integer reference, the numpy
runner of `export.py --include integer` and the ONNX QDQ file run by onnxruntime, as written and with its int8 kernels
(QLinearConv ..., as val.py and detect.py run it). On validation images, how many raw head outputs (the Detect convs'
outputs, before the sigmoid) differ between them.

    python benchmarks/integer_exact.py --weights runs/train/qat/weights/best.pt --data shapes.yaml --img 256

The images are the first --images of the dataset's val split, letterboxed to --img (square). The checkpoint is copied
to a temporary folder and exported there (ONNX and the integer model), so nothing is written beside it. A model that
rounds half up (train.py --rounding half_up) has no ONNX form; its ONNX columns are skipped. Exit status 1 when any
output differs: for a power-of-two QAT model all five must be identical.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import export
from bst.torch.ao.quantization.integer_runner import IntegerModel
from models.quant import convert_yolo, integer_head, is_quantized
from utils.general import LOGGER, UserError, check_file, run_cli
from utils.runtimes import onnxruntime_session
from workflow.backend import load_pytorch_model
from workflow.exporters.qdq_checks import detect_raw_outputs
from workflow.exporters.verify import sample_batch


def raw_outputs(model, x) -> list:
    """PyTorch eval raw head outputs (bs, na, ny, nx, no) per level."""
    detect = model.model[-1]
    flag, detect.export = detect.export, False
    try:
        with torch.no_grad():
            return [r.float() for r in model(x)[1]]
    finally:
        detect.export = flag


def main(opt):
    weights = Path(opt.weights)
    if not weights.is_file():
        raise UserError(f"--weights {weights}: file not found")
    data = check_file(opt.data)
    with tempfile.TemporaryDirectory() as tmp:
        pt = Path(tmp) / weights.name
        shutil.copyfile(weights, pt)
        model = load_pytorch_model(pt)
        if not (is_quantized(model) and model.qat_config.pow2):
            raise UserError(f"--weights {weights}: needs a QAT checkpoint with power-of-two scales")
        with_onnx = model.qat_config.rounding == "half_even"
        folder = Path(export.run(weights=pt, imgsz=(opt.img, opt.img), include=["integer"], data=data)[0])
        runner = IntegerModel(folder)
        converted = convert_yolo(model)
        detect = model.model[-1]
        probe = names = None
        if with_onnx:
            import onnx

            (f,) = export.run(weights=pt, imgsz=(opt.img, opt.img), include=["onnx"], data=data)
            proto = onnx.load(f)
            names = detect_raw_outputs(proto)
            for name in names:
                proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
            probe = onnxruntime_session(proto.SerializeToString(), as_written=True)
            kernels = onnxruntime_session(proto.SerializeToString())  # int8 kernels, as val.py runs them
        images = sample_batch((opt.images, 3, opt.img, opt.img), data=data)
        pairs = {"integer reference vs PyTorch": 0, "numpy runner vs integer reference": 0}
        if with_onnx:
            pairs["onnxruntime (as written) vs PyTorch"] = 0
            pairs["onnxruntime (int8 kernels) vs PyTorch"] = 0
        total = 0
        for x in images.split(1):
            raw = raw_outputs(model, x)
            ints = integer_head(converted, x)
            ran = runner.run(x.numpy())
            feed = {probe.get_inputs()[0].name: x.numpy()} if with_onnx else None
            by_shape = {r.shape: r for r in probe.run(names, feed)} if with_onnx else {}
            by_shape_k = {r.shape: r for r in kernels.run(names, feed)} if with_onnx else {}
            for r, q, name in zip(raw, ints, runner.graph["outputs"]):
                bs, _, ny, nx = q.int_repr.shape
                ref = q.dequantize().view(bs, detect.na, detect.no, ny, nx).permute(0, 1, 3, 4, 2)
                pairs["integer reference vs PyTorch"] += int((ref != r).sum())
                pairs["numpy runner vs integer reference"] += int((ran[name] != q.int_repr.numpy()).sum())
                if with_onnx:
                    pairs["onnxruntime (as written) vs PyTorch"] += int((by_shape[tuple(r.shape)] != r.numpy()).sum())
                    pairs["onnxruntime (int8 kernels) vs PyTorch"] += int(
                        (by_shape_k[tuple(r.shape)] != r.numpy()).sum())
                total += r.numel()
    print(f"\n{weights}: {opt.images} val images of {opt.data} at {opt.img}x{opt.img}, raw head outputs "
          f"({total} per column), rounding {model.qat_config.rounding}")
    width = max(map(len, pairs)) + 2
    print(f"{'':<{width}}{'differ':>8}")
    for k, v in pairs.items():
        print(f"{k:<{width}}{v:>8}")
    if not with_onnx:
        print("onnxruntime: skipped (ONNX QuantizeLinear rounds half to even; this model rounds half up)")
    return 1 if any(pairs.values()) else 0


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", required=True, help="a power-of-two QAT checkpoint (train.py --qat --pow2-scale)")
    p.add_argument("--data", default="shapes.yaml", help="dataset yaml whose val images are used")
    p.add_argument("--img", type=int, default=256, help="square input size (a multiple of 32)")
    p.add_argument("--images", type=int, default=100, help="how many val images")
    return p.parse_args(argv)


if __name__ == "__main__":
    LOGGER.setLevel("WARNING")
    raise SystemExit(run_cli(main, parse_opt()))
