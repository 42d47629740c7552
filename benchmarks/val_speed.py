"""Images/s of val.py on shapes with yolov5n at 320, split into data loading, pre-process, inference, NMS and the rest.

One val.run(...) call, in-process, set up as `python val.py` sets it up (rectangular batches with pad 0.5, the same
thresholds, Conv+BN fused), with its dataloader wrapped so that the time the loop waits for each batch is measured.
val.run's own timers give pre-process, inference and NMS; "metrics and other" is the rest of the wall time (matching,
scale_boxes, AP, progress bar). Every share in the table comes from that single run.

Model: by default yolov5n built from models/yolov5n.yaml with nc=10 (shapes' classes) and random weights, fused.
Its inference cost is exactly that of a yolov5n trained on shapes, and with upstream's bias initialisation it leaves
a few thousand candidates per image at conf 0.001, in the range a trained model leaves, so NMS is timed on a
realistic load. The reference checkpoint (`--weights ../shared/reference/yolov5n_relu.pt`, nc=80, confident random
Detect biases) passes all 6300 anchors x 80 classes at conf 0.001: a worst case for NMS. val.py's NMS has no time
limit (the metric never depends on the machine's speed), so every image is processed whatever it costs.

    python benchmarks/val_speed.py
    python benchmarks/val_speed.py --weights ../shared/reference/yolov5n_relu.pt --conf-thres 0.25
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import val
from models.yolo import DetectionModel
from utils.dataloaders import LoadImagesAndLabels, create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import UserError, check_img_size, run_cli
from utils.torch_utils import select_device
from workflow.backend import DetectMultiBackend


class TimedLoader:
    """Wraps a DataLoader; `wait` accumulates the seconds the consumer spent blocked on the next batch."""

    def __init__(self, loader):
        self.loader, self.dataset, self.wait = loader, loader.dataset, 0.0

    def __iter__(self):
        it = iter(self.loader)
        while True:
            t = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self.wait += time.perf_counter() - t
            yield batch

    def __len__(self):
        return len(self.loader)


def build_model(opt, data, device):
    if opt.weights:
        model = DetectMultiBackend(opt.weights, device=device, data=data)
        return model, model.stride, f"{opt.weights} (fused)"

    torch.manual_seed(0)
    model = DetectionModel(opt.cfg, nc=data["nc"]).to(device).fuse().eval()
    model.names = data["names"]
    return model, int(model.stride.max()), f"{Path(opt.cfg).name} nc={data['nc']} (fused, random init)"


def main(opt):
    for name, v, low in (("--batch-size", opt.batch_size, 1), ("--imgsz", opt.imgsz, 1), ("--images", opt.images, 0),
                         ("--threads", opt.threads, 0)):
        if v < low:
            raise UserError(f"{name} {v}: must be an integer >= {low}")
    if not (0 <= opt.conf_thres <= 1 and 0 <= opt.iou_thres <= 1):
        raise UserError(f"--conf-thres {opt.conf_thres} / --iou-thres {opt.iou_thres}: must be between 0.0 and 1.0")
    if opt.threads:
        torch.set_num_threads(opt.threads)
    device = select_device(opt.device, batch_size=opt.batch_size)
    data = check_dataset(opt.data)
    model, stride, model_desc = build_model(opt, data, device)
    imgsz = check_img_size(opt.imgsz, s=stride)

    with tempfile.TemporaryDirectory() as tmp:
        source = data["val"]
        if opt.images:  # the first N images of the split, through a list file (its label cache stays in tmp)
            images = LoadImagesAndLabels(source, imgsz, opt.batch_size, stride=stride, prefix="val: ").im_files
            source = Path(tmp) / "val.txt"
            source.write_text("".join(f"{f}\n" for f in sorted(images)[:opt.images]))
        loader = create_dataloader(str(source) if opt.images else source, imgsz, opt.batch_size, stride, pad=0.5,
                                   rect=True, workers=opt.workers, prefix="val: ")[0]
        timed = TimedLoader(loader)
        with torch.no_grad():  # one untimed pass so lazy initialisation does not land in the first batch
            model(torch.zeros(1, 3, imgsz, imgsz, device=device))
        t0 = time.perf_counter()
        results, _, per_image_ms = val.run(data, batch_size=opt.batch_size, conf_thres=opt.conf_thres,
                                           iou_thres=opt.iou_thres, model=model, dataloader=timed, half=opt.half,
                                           plots=False, save_dir=Path(tmp))
        wall = time.perf_counter() - t0

    n = len(timed.dataset)
    pre, inf, nms = (ms * n / 1e3 for ms in per_image_ms)
    rows = [("data loading (wait)", timed.wait), ("pre-process", pre), ("inference", inf), ("NMS", nms)]
    rows.append(("metrics and other", wall - sum(t for _, t in rows)))
    threads = torch.get_num_threads()
    print(f"\nval.py speed: {n} shapes val images at {imgsz} px, batch {opt.batch_size}, {opt.workers} workers, "
          f"{device.type.upper()} ({threads} torch threads)")
    print(f"model {model_desc}; conf {opt.conf_thres}, iou {opt.iou_thres}; mAP50 {results[2]:.3f}")
    print(f"{'stage':<22}{'total s':>10}{'ms/image':>10}{'share':>9}")
    for name, t in rows:
        print(f"{name:<22}{t:>10.2f}{t / n * 1e3:>10.1f}{t / wall:>9.1%}")
    print(f"{'total':<22}{wall:>10.2f}{wall / n * 1e3:>10.1f}{1:>9.1%}")
    print(f"throughput: {n / wall:.1f} images/s")


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default="", help="a checkpoint to time instead of --cfg (e.g. the reference)")
    parser.add_argument("--cfg", default=str(ROOT / "models" / "yolov5n.yaml"), help="model yaml when no --weights")
    parser.add_argument("--data", default="shapes.yaml", help="dataset yaml")
    parser.add_argument("--imgsz", "--img", type=int, default=320, help="inference size (pixels)")
    parser.add_argument("--batch-size", type=int, default=16, help="batch size")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold (val.py's default)")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold (val.py's default)")
    parser.add_argument("--images", type=int, default=0, help="time only the first N val images (0: all)")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0, or cpu")
    parser.add_argument("--half", action="store_true", help="FP16 inference (CUDA only)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


if __name__ == "__main__":
    run_cli(main, parse_opt())
