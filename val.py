"""Validate a trained YOLOv5 detection model on a detection dataset.

Usage:
    python val.py --weights yolov5s.pt --data coco.yaml --img 640
    python val.py --weights runs/train/exp/weights/best.pt --data shapes.yaml --img 320 --save-json
    python val.py --weights model.onnx --data shapes.yaml --img 320          (onnxruntime)
With --save-json and a dataset that has COCO annotations, pycocotools' COCOeval runs and its mAP is the result.
"""
from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.quant import QATConfig, is_quantized, load_recipe, observers_frozen
from utils.coco import category_ids, coco_eval, json_from_labels, save_one_json
from utils.dataloaders import create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import (
    LOGGER,
    UserError,
    check_file,
    check_img_size,
    check_imgsz_flag,
    colorstr,
    increment_path,
    make_run_folder,
    non_max_suppression,
    print_args,
    run_cli,
    scale_boxes,
    xywh2xyxy,
    xyxy2xywh,
)
from utils.metrics import ConfusionMatrix, ap_per_class, process_batch
from utils.plots import output_to_target, plot_images
from utils.torch_utils import select_device, time_sync
from workflow.backend import DetectMultiBackend
from workflow.qat import ptq_model


def save_one_txt(predn, save_conf, shape, file):
    gn = torch.tensor(shape)[[1, 0, 1, 0]]
    with open(file, "a") as f:
        for *xyxy, conf, cls in predn.tolist():
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
            line = (cls, *xywh, conf) if save_conf else (cls, *xywh)
            f.write(("%g " * len(line)).rstrip() % line + "\n")


def _as_dict(names):
    """Class names as {index: name} (a list or dict given; None/empty -> {})."""
    if isinstance(names, (list, tuple)):
        return dict(enumerate(names))
    return {int(k): v for k, v in names.items()} if names else {}


def _qparams_frozen(evaluate):
    """A QAT model passed in (training's validation) is evaluated with frozen qparams (models.quant.freeze: observers
    off, convs on the integer bias grid), as its checkpoint and exports will be; observers come back afterwards.
    A checkpoint loaded by DetectMultiBackend is frozen on load."""
    @functools.wraps(evaluate)
    def wrapper(*args, **kwargs):
        model = kwargs.get("model")
        if model is None or not is_quantized(model):
            return evaluate(*args, **kwargs)
        with observers_frozen(model):
            return evaluate(*args, **kwargs)
    return wrapper


def load_model(weights, data, device="", batch_size=32, imgsz=640, half=True, dnn=False, workers=8,
               ptq_options=None):
    """Standalone validation's model: (DetectMultiBackend, checked dataset dict, device, imgsz, batch_size).

    A fixed-shape export gets batch size 1. `ptq_options` (post_training_quantize's keywords, or None) quantizes the
    float checkpoint, loaded unfused, before it is returned."""
    device = select_device(device, batch_size=batch_size)
    model = DetectMultiBackend(weights, device=device, dnn=dnn, data=data, fp16=half and device.type != "cpu",
                               fuse=ptq_options is None)
    imgsz = check_img_size(imgsz, s=model.stride)
    if not model.pt and not model.dynamic:
        batch_size = 1
        first = weights[0] if isinstance(weights, (list, tuple)) else weights
        LOGGER.info(f"Forcing --batch-size 1 square inference (1,3,{imgsz},{imgsz}) for {Path(str(first)).name}, "
                    f"an exported file with fixed shapes; export it with --dynamic to validate it with the "
                    f"rectangular batches the .pt gets")
    data = check_dataset(data)
    if ptq_options is not None:
        post_training_quantize(model, weights, data, imgsz, batch_size, device, workers, **ptq_options)
    return model, data, device, imgsz, batch_size


def post_training_quantize(model, weights, data, imgsz, batch_size, device, workers=8, qat=None, calib_batches=32,
                           ptq_save=""):
    """--ptq: calibrate the float checkpoint `model` (a DetectMultiBackend) holds on the train split as `qat` (a
    QATConfig) says, in place; it is then evaluated fake-quantized (workflow.qat.ptq_model)."""
    if not model.pt or is_quantized(model.model):
        raise UserError(f"--ptq {weights}: needs a float PyTorch .pt checkpoint")
    model.model = ptq_model(model.model, data, imgsz, batch_size, model.stride, device, qat or QATConfig(),
                            calib_batches=calib_batches, workers=workers, save=ptq_save)


def check_classes(model, weights, nc):
    """A model with fewer classes than the dataset is refused; one with more is evaluated, with a warning."""
    ncm = model.nc if hasattr(model, "nc") else model.yaml["nc"]
    wname = ", ".join(str(w) for w in weights) if isinstance(weights, (list, tuple)) else str(weights)
    if ncm < nc:
        raise UserError(f"{wname}: model has {ncm} classes but the dataset has {nc}; "
                        f"pass the --data the model was trained on")
    if ncm > nc:  # upstream refuses this; we evaluate, as COCOeval does with categories it has no labels of
        LOGGER.warning(f"WARNING: {wname} has {ncm} classes, the dataset {nc}: predictions of classes >= {nc} "
                       f"match no label, so they are never true positives and are left out of the per-class "
                       f"metrics, the confusion matrix and the JSON; class names come from the dataset")


def split_dataloader(data, task, imgsz, batch_size, stride, single_cls, workers, rect, nc):
    """(dataloader, split name) for --task: train, val or test; speed (square, unpadded) and others use val."""
    # rectangular batches for .pt and for exported files with dynamic shapes alike (`rect`), so both are judged on
    # the same inputs; a fixed-shape export can only take its square size, one image at a time
    pad, rect = (0.0, False) if task == "speed" else (0.5, rect)
    task = task if task in ("train", "val", "test") else "val"
    if not data.get(task):
        raise UserError(f"--task {task}: the dataset yaml has no '{task}' split")
    dataloader = create_dataloader(data[task], imgsz, batch_size, stride, single_cls, pad=pad, rect=rect,
                                   workers=workers, prefix=colorstr(f"{task}: "), nc=None if single_cls else nc)[0]
    return dataloader, task


def class_names(model, data, nc, single_cls):
    """(names of the dataset's classes, for labels and metrics; names of the model's classes, for predictions)."""
    names = _as_dict(model.names if hasattr(model, "names") else model.module.names) or _as_dict(data["names"])
    pred_names = names  # predictions are in the model's classes
    if not single_cls and len(names) != nc:  # the model's names do not describe this dataset's classes
        names = _as_dict(data["names"])
    return names, pred_names


def image_statistics(pred, labels, im_shape, shapes, iouv, nc, single_cls, stats, confusion_matrix=None):
    """Match one image's predictions to its labels: appends (correct, conf, cls, label cls) to `stats` and feeds
    `confusion_matrix` (if given). Returns the predictions in original-image coordinates (None if there are none)."""
    nl, npr = labels.shape[0], pred.shape[0]
    correct = torch.zeros(npr, iouv.numel(), dtype=torch.bool, device=iouv.device)
    if npr == 0:
        if nl:
            stats.append((correct, *torch.zeros((2, 0), device=iouv.device), labels[:, 0]))
            if confusion_matrix is not None:
                confusion_matrix.process_batch(detections=None, labels=labels[:, 0])
        return None
    if single_cls:
        pred[:, 5] = 0
    predn = pred.clone()
    scale_boxes(im_shape, predn[:, :4], shapes[0], shapes[1])
    if nl:
        tbox = xywh2xyxy(labels[:, 1:5])
        scale_boxes(im_shape, tbox, shapes[0], shapes[1])
        labelsn = torch.cat((labels[:, 0:1], tbox), 1)
        correct = process_batch(predn, labelsn, iouv)
        if confusion_matrix is not None:
            confusion_matrix.process_batch(predn[predn[:, 5] < nc], labelsn)
    stats.append((correct, pred[:, 4], pred[:, 5], labels[:, 0]))
    return predn


class Metrics(NamedTuple):
    """What ap_per_class makes of the statistics (all 0 and empty without labels), and the labels per class `nt`."""
    tp: np.ndarray | float
    fp: np.ndarray | float
    p: np.ndarray | float
    r: np.ndarray | float
    f1: np.ndarray | float
    ap: np.ndarray | list  # mAP50-95 per class in ap_class
    ap50: np.ndarray | float
    ap_class: np.ndarray | list
    mp: float
    mr: float
    map50: float
    map: float
    nt: np.ndarray


def compute_metrics(stats, nc, plots, save_dir, names):
    """Metrics of the per-image statistics (image_statistics), with P/R/F1/PR curves in save_dir if `plots`."""
    tp, fp, p, r, f1, mp, mr, map50, ap50, map = 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
    ap, ap_class = [], []
    stats = [torch.cat(x, 0).cpu().numpy() for x in zip(*stats)]
    # Upstream skips this when nothing matched; the numbers are the same (all 0), but then the per-class rows and
    # the P/R/F1/PR curves would silently be missing, so run it whenever there are labels.
    if len(stats) and len(stats[3]):
        tp, fp, p, r, f1, ap, ap_class = ap_per_class(*stats, plot=plots, save_dir=save_dir, names=names)
        ap50, ap = ap[:, 0], ap.mean(1)
        mp, mr, map50, map = p.mean(), r.mean(), ap50.mean(), ap.mean()
    nt = np.bincount(stats[3].astype(int), minlength=nc) if len(stats) else np.zeros(nc, dtype=int)
    return Metrics(tp, fp, p, r, f1, ap, ap50, ap_class, mp, mr, map50, map, nt)


def print_metrics(m: Metrics, seen, nc, names, task, per_class):
    """The 'all' row (a warning without labels), then one row per class if `per_class` and there are classes."""
    pf = "%22s" + "%11i" * 2 + "%11.3g" * 4
    LOGGER.info(pf % ("all", seen, m.nt.sum(), m.mp, m.mr, m.map50, m.map))
    if m.nt.sum() == 0:
        LOGGER.warning(f"WARNING: no labels found in {task} set, can not compute metrics without labels")
    if per_class and nc > 1:
        for i, c in enumerate(m.ap_class):
            LOGGER.info(pf % (names[c], seen, m.nt[c], m.p[i], m.r[i], m.ap50[i], m.ap[i]))


def save_json_and_eval(jdict, weights, data, save_dir, dataloader, nc, conf_thres, names):
    """Save the COCO-JSON predictions and score them with pycocotools against the dataset's annotations file, or,
    when the dataset has none, against one written from its labels into save_dir.

    Returns COCOeval's (mAP50-95, mAP50), or None when it did not run."""
    if not jdict:
        LOGGER.info(f"No predictions of the dataset's {nc} classes above --conf-thres {conf_thres} to save as JSON; "
                    f"pycocotools evaluation skipped")
        return None
    w = Path(weights[0] if isinstance(weights, (list, tuple)) else weights).stem if weights is not None else ""
    anno_json = Path(data["path"]) / (data.get("annotations") or "annotations/instances_val2017.json")
    pred_json = str(save_dir / f"{w}_predictions.json")
    LOGGER.info(f"\nEvaluating pycocotools mAP... saving {pred_json}...")
    with open(pred_json, "w") as f:
        json.dump(jdict, f)
    if not anno_json.is_file():
        if data.get("annotations"):
            LOGGER.warning(f"WARNING: {anno_json} not found, pycocotools evaluation skipped")
            return None
        anno_json = json_from_labels(dataloader.dataset, category_ids(data), names, save_dir / "labels_coco.json")
        LOGGER.info(f"{data['path']} has no COCO annotations file: ground truth written from the labels to {anno_json}")
    stats = coco_eval(anno_json, pred_json, dataloader.dataset.im_files)
    return None if stats is None else (float(stats[0]), float(stats[1]))


class Collector:
    """What val.run gathers image by image: the statistics the metrics come from (image_statistics; the confusion
    matrix too, if given), each image's entry of `image_stats` (see run), its --save-txt labels and its --save-json
    predictions (in `jdict`)."""

    def __init__(self, nc, single_cls, iouv, confusion_matrix, image_stats, save_dir, save_txt, save_conf, save_json,
                 class_map):
        self.nc, self.single_cls, self.iouv, self.confusion_matrix = nc, single_cls, iouv, confusion_matrix
        self.image_stats, self.class_map = image_stats, class_map
        self.save_dir, self.save_txt, self.save_conf, self.save_json = save_dir, save_txt, save_conf, save_json
        self.seen, self.stats, self.jdict = 0, [], []

    def add(self, pred, labels, im_shape, shapes, path: Path):
        """One image's predictions and labels (as image_statistics takes them). Returns the predictions in
        original-image coordinates (None if there are none)."""
        self.seen += 1
        n_stats = len(self.stats)
        predn = image_statistics(pred, labels, im_shape, shapes, self.iouv, self.nc, self.single_cls, self.stats,
                                 self.confusion_matrix)
        if self.image_stats is not None:
            self.image_stats.append((str(path), self.stats[-1] if len(self.stats) > n_stats else None))
        if predn is None:
            return None
        if self.save_txt:
            save_one_txt(predn, self.save_conf, shapes[0], file=self.save_dir / "labels" / f"{path.stem}.txt")
        if self.save_json:  # classes the dataset does not have (a model with more classes) have no category id
            save_one_json(predn[predn[:, 5] < self.nc], self.jdict, path, self.class_map)
        return predn


def standalone_loader(model, weights, data, task, imgsz, batch_size, single_cls, workers, nc):
    """val.py's inputs once the model is loaded: the classes checked, the model warmed up, (dataloader, split name)."""
    if model.pt and not single_cls:
        check_classes(model.model, weights, nc)
    model.warmup(imgsz=(1 if model.pt else batch_size, 3, imgsz, imgsz))
    return split_dataloader(data, task, imgsz, batch_size, model.stride, single_cls, workers,
                            rect=model.pt or model.dynamic, nc=nc)


def infer_batch(model, im, targets, device, half, augment, compute_loss, save_hybrid, nms, dt, loss):
    """Pre-process, inference (training's loss added to `loss`) and NMS (`nms`: non_max_suppression's keywords) of
    one batch, each step's seconds added to dt. Returns (input tensor, targets in pixels, detections per image)."""
    t1 = time_sync()
    im = im.to(device, non_blocking=True)
    targets = targets.to(device)
    im = im.half() if half else im.float()
    im /= 255
    nb, _, height, width = im.shape
    t2 = time_sync()
    dt[0] += t2 - t1

    if compute_loss:
        preds, train_out = model(im)
    else:
        preds, train_out = model(im, augment=augment), None
    dt[1] += time_sync() - t2
    if compute_loss:
        loss += compute_loss([x.float() for x in train_out], targets)[1]

    targets[:, 2:] *= torch.tensor((width, height, width, height), device=device)
    lb = [targets[targets[:, 0] == i, 1:] for i in range(nb)] if save_hybrid else []
    t3 = time_sync()
    preds = non_max_suppression(preds, labels=lb, **nms)
    dt[2] += time_sync() - t3
    return im, targets, preds


def evaluate_batches(dataloader, infer, images: Collector, hook, plots, save_dir, names, pred_names):
    """Every batch of `dataloader` through `infer` (infer_batch with the run's settings) into `images`, with the
    callbacks' batch and image hooks and the plots of the first three batches (labels and predictions)."""
    s = ("%22s" + "%11s" * 6) % ("Class", "Images", "Instances", "P", "R", "mAP50", "mAP50-95")
    pbar = tqdm(dataloader, desc=s, bar_format="{l_bar}{bar:10}{r_bar}", file=sys.stdout)
    for batch_i, (im, targets, paths, shapes) in enumerate(pbar):
        hook("on_val_batch_start")
        im, targets, preds = infer(im, targets)
        for si, pred in enumerate(preds):
            path = Path(paths[si])
            predn = images.add(pred, targets[targets[:, 0] == si, 1:], im[si].shape[1:], shapes[si], path)
            if predn is not None:
                hook("on_val_image_end", pred, predn, path, names, im[si])
        if plots and batch_i < 3:
            plot_images(im, targets, paths, save_dir / f"val_batch{batch_i}_labels.jpg", names)
            plot_images(im, output_to_target(preds), paths, save_dir / f"val_batch{batch_i}_pred.jpg", pred_names)
        hook("on_val_batch_end", batch_i, im, targets, paths, shapes, preds)


def class_maps(m: Metrics, nc, map):
    """mAP50-95 of every class: its own where it has one, else the overall `map`."""
    maps = np.zeros(nc) + map
    for i, c in enumerate(m.ap_class):
        maps[c] = m.ap[i]
    return maps


@_qparams_frozen
@torch.no_grad()
def run(data, weights=None, batch_size=32, imgsz=640, conf_thres=0.001, iou_thres=0.6, max_det=300, task="val",
        device="", workers=8, single_cls=False, augment=False, verbose=False, save_txt=False, save_hybrid=False,
        save_conf=False, save_json=False, project=ROOT / "runs/val", name="exp", exist_ok=False, half=True,
        dnn=False, model=None, dataloader=None, save_dir=Path(""), plots=True, callbacks=None, compute_loss=None,
        ptq=False, qat=None, calib_batches=32, ptq_save="", image_stats=None):
    """Evaluate `model` on `dataloader` (train.py), or the weights file(s) on data's --task split (val.py), which
    --ptq first quantizes as `qat` (a QATConfig; default QATConfig()) says (post_training_quantize). Returns ((P, R,
    mAP50, mAP50-95, *losses), mAP per class, (pre-process, inference, NMS) ms per image). image_stats: a list that
    gets (image path, that image's (correct, conf, pred class, label class) tensors, or None when it has neither
    predictions nor labels) for every image, in the loader's order: what the metrics are computed from, for
    statistics over images."""
    training = model is not None
    if training:  # called by train.py
        device = next(model.parameters()).device
        half &= device.type != "cpu" and not is_quantized(model)  # fake-quant state stays float32
        model.half() if half else model.float()
    else:
        ptq_options = dict(qat=qat, calib_batches=calib_batches, ptq_save=ptq_save) if ptq else None
        model, data, device, imgsz, batch_size = load_model(weights, data, device, batch_size, imgsz, half, dnn,
                                                            workers, ptq_options)
        half = model.fp16

    model.eval()
    nc = 1 if single_cls else int(data["nc"])
    if not training:
        dataloader, task = standalone_loader(model, weights, data, task, imgsz, batch_size, single_cls, workers, nc)
        save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)  # once the inputs load: no empty runs
    save_dir = Path(save_dir)
    if not training or plots or save_json or save_txt:  # train.py's folder exists; a caller's may not yet
        make_run_folder(save_dir / "labels" if save_txt else save_dir)

    confusion_matrix = ConfusionMatrix(nc=nc)
    names, pred_names = class_names(model, data, nc, single_cls)
    images = Collector(nc, single_cls, torch.linspace(0.5, 0.95, 10, device=device),
                       confusion_matrix if plots else None, image_stats, save_dir, save_txt, save_conf, save_json,
                       category_ids(data))
    hook = callbacks.run if callbacks is not None else (lambda *a: None)  # upstream's Callbacks interface
    dt, loss = [0.0, 0.0, 0.0], torch.zeros(3, device=device)
    nms = dict(conf_thres=conf_thres, iou_thres=iou_thres, multi_label=True, agnostic=single_cls, max_det=max_det)
    infer = functools.partial(infer_batch, model, device=device, half=half, augment=augment, compute_loss=compute_loss,
                              save_hybrid=save_hybrid, nms=nms, dt=dt, loss=loss)
    hook("on_val_start")
    evaluate_batches(dataloader, infer, images, hook, plots, save_dir, names, pred_names)

    m = compute_metrics(images.stats, nc, plots, save_dir, names)
    print_metrics(m, images.seen, nc, names, task, per_class=verbose or (nc < 50 and not training))
    t = tuple(x / max(images.seen, 1) * 1e3 for x in dt)
    if not training:
        LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape "
                    f"{(batch_size, 3, imgsz, imgsz)}" % t)
    if plots:
        confusion_matrix.plot(save_dir=save_dir, names=list(names.values()))
    hook("on_val_end", m.nt, m.tp, m.fp, m.p, m.r, m.f1, m.ap, m.ap50, m.ap_class, confusion_matrix)

    mp, mr, map50, map = m.mp, m.mr, m.map50, m.map
    coco = save_json_and_eval(images.jdict, weights, data, save_dir, dataloader, nc, conf_thres, names) \
        if save_json else None
    if coco is not None:
        map, map50 = coco
    model.float()
    if not training:
        n = len(list(save_dir.glob("labels/*.txt")))
        s = f"\n{n} labels saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{s}")
    return (mp, mr, map50, map, *(loss.cpu() / max(len(dataloader), 1)).tolist()), class_maps(m, nc, map), t


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description="Validate a YOLOv5 model")
    parser.add_argument("--data", type=str, default=ROOT / "data/coco128.yaml", help="dataset.yaml path")
    parser.add_argument("--weights", nargs="+", type=str, default=ROOT / "yolov5s.pt", help="model path(s)")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="inference size (pixels)")
    parser.add_argument("--conf-thres", type=float, default=0.001, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.6, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=300, help="maximum detections per image")
    parser.add_argument("--task", default="val", help="train, val, test, speed or study")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    parser.add_argument("--single-cls", action="store_true", help="treat as single-class dataset")
    parser.add_argument("--augment", action="store_true", help="augmented inference")
    parser.add_argument("--verbose", action="store_true", help="report mAP by class")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-hybrid", action="store_true", help="save label+prediction hybrid results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-json", action="store_true", help="save a COCO-JSON results file (and run pycocotools)")
    parser.add_argument("--project", default=ROOT / "runs/val", help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference")
    parser.add_argument("--dnn", action="store_true", help="use OpenCV DNN for ONNX inference")
    q = parser.add_argument_group("post-training quantization (PTQ): calibrate a float .pt, then evaluate it")
    q.add_argument("--ptq", action="store_true", help="quantize the float checkpoint with a calibration pass on the "
                   "train split (no training) and evaluate the fake-quantized model")
    QATConfig.add_arguments(q, prefix="with --ptq: ")
    q.add_argument("--calib-batches", type=int, default=32, help="with --ptq: calibration batches")
    q.add_argument("--ptq-save", type=str, default="", help="with --ptq: save the calibrated model as a checkpoint")
    opt = parser.parse_args(argv)
    opt.save_json |= str(opt.data).endswith("coco.yaml")
    opt.save_txt |= opt.save_hybrid
    print_args(vars(opt), "val")
    return opt


def run_options(opt) -> dict:
    """val.run's keywords from the command line: the QAT flags make one QATConfig (`qat`)."""
    return {**{k: v for k, v in vars(opt).items() if k not in QATConfig.dests()}, "qat": QATConfig.from_options(opt)}


def main(opt):
    opt.data = check_file(opt.data)
    qat = QATConfig.from_options(opt)
    given = qat.flags_given() + (["--ptq-save"] if opt.ptq_save else [])
    if not opt.ptq and given:
        raise UserError(f"{', '.join(given)} apply to --ptq only; add --ptq")
    if qat.recipe:
        load_recipe(qat.recipe)  # the schema check, before any data or model is loaded
    for name, v in (("--conf-thres", opt.conf_thres), ("--iou-thres", opt.iou_thres)):
        if not 0 <= v <= 1:
            raise UserError(f"{name} {v}: must be between 0.0 and 1.0")
    for name, v in (("--batch-size", opt.batch_size), ("--imgsz", opt.imgsz), ("--max-det", opt.max_det)):
        if v < 1:
            raise UserError(f"{name} {v}: must be a positive integer")
    check_imgsz_flag(opt.imgsz)
    if opt.task in ("train", "val", "test"):
        if opt.conf_thres > 0.001:
            LOGGER.info(f"WARNING: confidence threshold {opt.conf_thres} > 0.001 produces invalid results")
        if opt.save_hybrid:
            LOGGER.info("WARNING: --save-hybrid will return high mAP from hybrid labels, not from predictions alone")
        return run(**run_options(opt))
    weights = opt.weights if isinstance(opt.weights, list) else [opt.weights]
    opt.half = torch.cuda.is_available() and opt.device != "cpu"
    if opt.task == "speed":
        opt.conf_thres, opt.iou_thres, opt.save_json = 0.25, 0.45, False
        for opt.weights in weights:
            run(**run_options(opt), plots=False)
    elif opt.task == "study":  # mAP and speed against image size
        for w in weights:
            rows = []
            for opt.imgsz in range(256, 1536 + 128, 128):
                r, _, t = run(**{**run_options(opt), "weights": w}, plots=False)
                rows.append(r + t)
            f = f"study_{Path(opt.data).stem}_{Path(w).stem}.txt"
            np.savetxt(f, rows, fmt="%10.4g")
            LOGGER.info(f"study results saved to {f}")
    else:
        raise UserError(f"--task {opt.task}: choose train, val, test, speed or study")


if __name__ == "__main__":
    run_cli(main, parse_opt())
