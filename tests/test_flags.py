"""Every command-line flag of upstream YOLOv5 v7.0's train.py, val.py, detect.py and export.py parses here, so a
change cannot silently drop one. The lists are written out from upstream v7.0 (GitHub tag v7.0), each flag with a
value of the kind upstream takes. Options of upstream features this project does not have (W&B / GCS logging,
TensorFlow / TensorRT exports) parse and then stop with one line naming what is supported (tested below)."""
import pytest

import detect
import export
import train
import val
from utils.general import UserError

TRAIN = [("--weights", "yolov5s.pt"), ("--cfg", "yolov5s.yaml"), ("--data", "coco128.yaml"),
         ("--hyp", "data/hyps/hyp.scratch-low.yaml"), ("--epochs", "3"), ("--batch-size", "16"), ("--imgsz", "640"),
         ("--img", "640"), ("--img-size", "640"), ("--rect",), ("--resume",),
         ("--resume", "runs/train/exp/weights/last.pt"),
         ("--nosave",), ("--noval",), ("--noautoanchor",), ("--noplots",), ("--evolve",), ("--evolve", "10"),
         ("--bucket", "b"), ("--cache",), ("--cache", "disk"), ("--image-weights",), ("--device", "cpu"),
         ("--multi-scale",), ("--single-cls",), ("--optimizer", "AdamW"), ("--sync-bn",), ("--workers", "2"),
         ("--project", "runs/train"), ("--name", "exp"), ("--exist-ok",), ("--quad",), ("--cos-lr",),
         ("--label-smoothing", "0.1"), ("--patience", "50"), ("--freeze", "10"), ("--freeze", "0", "1", "2"),
         ("--save-period", "5"), ("--seed", "1"), ("--local_rank", "0"), ("--entity", "me"), ("--upload_dataset",),
         ("--upload_dataset", "val"), ("--bbox_interval", "3"), ("--artifact_alias", "v1")]
VAL = [("--data", "coco128.yaml"), ("--weights", "a.pt", "b.pt"), ("--batch-size", "8"), ("--imgsz", "320"),
       ("--img", "320"), ("--img-size", "320"), ("--conf-thres", "0.01"), ("--iou-thres", "0.5"), ("--max-det", "100"),
       ("--task", "speed"), ("--device", "cpu"), ("--workers", "2"), ("--single-cls",), ("--augment",), ("--verbose",),
       ("--save-txt",), ("--save-hybrid",), ("--save-conf",), ("--save-json",), ("--project", "runs/val"),
       ("--name", "exp"), ("--exist-ok",), ("--half",), ("--dnn",)]
DETECT = [("--weights", "a.pt"), ("--source", "data/images"), ("--data", "coco128.yaml"), ("--imgsz", "320"),
          ("--img", "320", "480"), ("--img-size", "320"), ("--conf-thres", "0.3"), ("--iou-thres", "0.5"),
          ("--max-det", "100"), ("--device", "cpu"), ("--view-img",), ("--save-txt",), ("--save-conf",),
          ("--save-crop",), ("--nosave",), ("--classes", "0", "2"), ("--agnostic-nms",), ("--augment",),
          ("--visualize",), ("--update",), ("--project", "runs/detect"), ("--name", "exp"), ("--exist-ok",),
          ("--line-thickness", "2"), ("--hide-labels",), ("--hide-conf",), ("--half",), ("--dnn",),
          ("--vid-stride", "2")]
EXPORT = [("--data", "coco128.yaml"), ("--weights", "a.pt"), ("--imgsz", "320"), ("--img", "320", "320"),
          ("--img-size", "320"), ("--batch-size", "2"), ("--device", "cpu"), ("--half",), ("--inplace",), ("--keras",),
          ("--optimize",), ("--int8",), ("--dynamic",), ("--simplify",), ("--opset", "17"), ("--verbose",),
          ("--workspace", "8"), ("--nms",), ("--agnostic-nms",), ("--topk-per-class", "50"), ("--topk-all", "50"),
          ("--iou-thres", "0.5"), ("--conf-thres", "0.3"), ("--include", "torchscript", "onnx")]
CLIS = {"train": (train, TRAIN), "val": (val, VAL), "detect": (detect, DETECT), "export": (export, EXPORT)}


@pytest.mark.parametrize("cli, args", [(name, args) for name, (_, flags) in CLIS.items() for args in flags],
                         ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_upstream_flag_parses(cli, args):
    module = CLIS[cli][0]
    opt = module.parse_opt(list(args))
    dest = args[0].lstrip("-").replace("-", "_")
    dest = {"img": "imgsz", "img_size": "imgsz"}.get(dest, dest)
    assert hasattr(opt, dest), f"{cli}.py {args[0]} parsed into no option"


@pytest.mark.parametrize("args, fragment", [
    (["--entity", "me"], "--entity: Weights & Biases and Google Cloud uploads are not part of yolov5-qat"),
    (["--bucket", "b", "--bbox_interval", "3"], "--bucket, --bbox_interval: Weights & Biases"),
])
def test_train_refuses_logger_options_in_one_line(args, fragment):
    opt = train.parse_opt(["--data", "shapes.yaml", "--cfg", "yolov5n.yaml", *args])
    with pytest.raises(UserError, match="drop the option") as e:
        train.check_train_flags(opt)
    assert fragment in str(e.value)


def test_export_refuses_other_formats_options_in_one_line():
    with pytest.raises(UserError, match=r"--int8: options of upstream's CoreML/TensorFlow/TensorRT exports; this "
                                        r"export writes torchscript, onnx, openvino, integer only \(--include\); "
                                        r"for an int8 model train with --qat"):
        export.main(export.parse_opt(["--weights", "a.pt", "--int8"]))
    with pytest.raises(UserError, match="--nms, --topk-all: options of upstream's"):
        export.run(weights="a.pt", nms=True, topk_all=10)
    with pytest.raises(UserError, match=r"export.run\(\): unknown option\(s\) foo"):
        export.run(weights="a.pt", foo=1)
