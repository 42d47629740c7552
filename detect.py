"""Run YOLOv5 detection on images, folders, globs, .txt lists, videos, URLs, webcams, streams and the screen.

Usage:
    python detect.py --weights yolov5s.pt --source data/images/   # folder, file, glob, list.txt, video.mp4
                                                   --source 0                               # webcam
                                                   --source 'https://example.com/img.jpg'   # image or video URL
                                                   --source 'rtsp://example.com/media.mp4'  # RTSP/RTMP/HTTP stream
                                                   --source list.streams                    # several streams
                                                   --source screen                          # screenshots (mss)
    python detect.py --weights runs/train/exp/weights/best.pt --source img.jpg --save-txt --save-conf
Results go to runs/detect/exp*: annotated images/videos, labels/*.txt with --save-txt, crops with --save-crop.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

from models.checkpoint import strip_optimizer
from utils.dataloaders import (
    IMG_FORMATS,
    VID_FORMATS,
    LoadImages,
    LoadScreenshots,
    LoadStreams,
    download_source,
    is_url,
)
from utils.general import (
    LOGGER,
    UserError,
    check_file,
    check_img_size,
    check_imgsz_flag,
    colorstr,
    has_display,
    increment_path,
    make_run_folder,
    non_max_suppression,
    print_args,
    run_cli,
    scale_boxes,
    shown,
    xyxy2xywh,
)
from utils.imageio import Cv2Paths, imwrite
from utils.plots import Annotator, colors, save_one_box
from utils.torch_utils import select_device, time_sync
from workflow.backend import DetectMultiBackend


@torch.no_grad()
def run(weights=ROOT / "yolov5s.pt", source="data/images", data=None, imgsz=(640, 640), conf_thres=0.25,
        iou_thres=0.45, max_det=1000, device="", view_img=False, save_txt=False, save_conf=False, save_crop=False,
        nosave=False, classes=None, agnostic_nms=False, augment=False, visualize=False, update=False,
        project=ROOT / "runs/detect", name="exp", exist_ok=False, line_thickness=3, hide_labels=False,
        hide_conf=False, half=False, dnn=False, vid_stride=1, nms_time_limit=0.0):
    check_flags(imgsz=imgsz, conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det, classes=classes,
                line_thickness=line_thickness, vid_stride=vid_stride, nms_time_limit=nms_time_limit)
    source = str(source)
    is_file, url, webcam, screenshot = source_kind(source)
    save_dir = increment_path(Path(project) / name, exist_ok=exist_ok)
    make_run_folder(save_dir / "labels" if save_txt else save_dir)

    device = select_device(device)
    model = DetectMultiBackend(weights, device=device, dnn=dnn, data=data, fp16=half)
    stride, names = model.stride, model.names or {}
    imgsz = check_img_size(imgsz, s=stride)
    downloads = tempfile.TemporaryDirectory() if url and is_file else None  # an image or video file at a URL
    if downloads:
        source = download_source(source, Path(downloads.name))
    if view_img or webcam:
        view_img = check_imshow(warn=view_img)
    dataset = load_source(source, webcam, screenshot, imgsz, stride, model.pt, vid_stride)
    bs = len(dataset) if webcam else 1
    videos = VideoWriters(bs)
    model.warmup(imgsz=(1 if model.pt else bs, 3, *imgsz))
    out = Output(save_dir, names, not nosave, save_txt, save_conf, save_crop, view_img, line_thickness, hide_labels,
                 hide_conf)
    nms = dict(conf_thres=conf_thres, iou_thres=iou_thres, classes=classes, agnostic=agnostic_nms, max_det=max_det,
               time_limit=nms_time_limit if nms_time_limit > 0 else None)
    seen, dt = 0, [0.0, 0.0, 0.0]
    for path, im, im0s, vid_cap, s in dataset:
        vis_dir = increment_path(save_dir / Path(path).stem, mkdir=True) if visualize else False
        im, pred, t_inference = predict(model, im, device, dt, augment, vis_dir, nms)
        for i, det in enumerate(pred):
            seen += 1
            p, im0, frame = batch_item(dataset, i, path, im0s, webcam)
            if webcam:
                s += f"{i}: "
            s += save_image_results(det, im, im0, p, frame, dataset.mode, out, videos, i, vid_cap)
        LOGGER.info(f"{s}{'' if len(det) else '(no detections), '}{t_inference * 1e3:.1f}ms")

    videos.release()
    if downloads:
        downloads.cleanup()
    log_summary(seen, dt, imgsz, save_dir, save_txt, out.save_img)
    if update:  # as upstream: strip the optimizer from the weights file (kept FP16, EMA as the model)
        for w in weights if isinstance(weights, (list, tuple)) else [weights]:
            if str(w).endswith(".pt"):
                strip_optimizer(w)
    return save_dir


class Output(NamedTuple):
    """What detect.run writes, draws and shows of each image's detections, and where."""
    save_dir: Path
    names: dict  # class index -> name
    save_img: bool  # annotated images and videos (not --nosave)
    save_txt: bool
    save_conf: bool
    save_crop: bool
    view_img: bool
    line_thickness: int
    hide_labels: bool
    hide_conf: bool


def source_kind(source: str):
    """(is_file, url, webcam, screenshot) of a --source: an image or video file (at a URL too), a URL, a webcam index,
    .streams list or stream URL, the screen. A local path that does not exist is refused."""
    is_file = Path(source).suffix[1:].lower() in IMG_FORMATS + VID_FORMATS
    url = is_url(source)
    webcam = source.isnumeric() or source.endswith(".streams") or (url and not is_file)
    screenshot = source.lower().startswith("screen")
    if not (url or webcam or screenshot) and not Path(source).exists() and not any(c in source for c in "*?"):
        raise UserError(f"--source {source}: path does not exist; give an image, video, folder, glob, .txt list, "
                        f"URL, webcam index, .streams list or 'screen'")
    return is_file, url, webcam, screenshot


def load_source(source, webcam, screenshot, imgsz, stride, auto, vid_stride):
    """The loader of a --source: streams (each batch one frame of every stream), screenshots, or images and videos."""
    if webcam:
        return LoadStreams(source, img_size=imgsz, stride=stride, auto=auto, vid_stride=vid_stride)
    if screenshot:
        return LoadScreenshots(source, img_size=imgsz, stride=stride, auto=auto)
    return LoadImages(source, img_size=imgsz, stride=stride, auto=auto, vid_stride=vid_stride)


def predict(model, im, device, dt, augment, vis_dir, nms):
    """Pre-process (uint8 -> float in [0, 1], batched), inference and NMS (`nms`: non_max_suppression's keywords)
    of one loader item, each step's seconds added to dt. Returns (input tensor, detections per image, inference
    seconds)."""
    t1 = time_sync()
    im = torch.from_numpy(im).to(device)
    im = (im.half() if model.fp16 else im.float()) / 255
    if im.ndim == 3:
        im = im[None]
    t2 = time_sync()
    dt[0] += t2 - t1
    pred = model(im, augment=augment, visualize=vis_dir)
    t3 = time_sync()
    dt[1] += t3 - t2
    pred = non_max_suppression(pred, **nms)
    dt[2] += time_sync() - t3
    return im, pred, t3 - t2


def batch_item(dataset, i, path, im0s, webcam):
    """(path, a copy of the original image, frame number) of image i of a loader item."""
    if webcam:  # a batch: one frame of every stream
        return Path(path[i]), im0s[i].copy(), dataset.count
    return Path(path), im0s.copy(), getattr(dataset, "frame", 0)


def save_image_results(det, im, im0, p, frame, mode, out: Output, videos, i, vid_cap) -> str:
    """One image's detections (boxes in `im`'s coordinates, rescaled in place to `im0`'s): labels, crops, the annotated
    image or video frame written and shown as `out` says. Returns its part of the log line."""
    save_path = str(out.save_dir / p.name)
    txt_path = str(out.save_dir / "labels" / p.stem) + ("" if mode == "image" else f"_{frame}")
    s = "%gx%g " % im.shape[2:]
    if len(det):
        det[:, :4] = scale_boxes(im.shape[2:], det[:, :4], im0.shape).round()
        for c in det[:, 5].unique():
            n = (det[:, 5] == c).sum()
            s += f"{n} {out.names.get(int(c), int(c))}{'s' * (n > 1)}, "
    im0 = annotate(det, im0, p, txt_path, out)
    if out.view_img:
        show_window(shown(p), im0)
    if out.save_img:
        if mode == "image":
            if not imwrite(save_path, im0):
                LOGGER.warning(f"WARNING: {save_path}: could not be written")
        else:
            videos.write(i, save_path, vid_cap, im0)
    return s


def annotate(det, im0, p, txt_path, out: Output):
    """Each detection's line in <txt_path>.txt (--save-txt), box drawn on im0 (when it is saved or shown) and crop
    (--save-crop). Returns the annotated image."""
    gn = torch.tensor(im0.shape)[[1, 0, 1, 0]]
    imc = im0.copy() if out.save_crop else im0
    annotator = Annotator(im0, line_width=out.line_thickness, example=str(out.names))
    names = out.names
    for *xyxy, conf, cls in reversed(det):
        c = int(cls)
        if out.save_txt:
            xywh = (xyxy2xywh(torch.tensor(xyxy).view(1, 4)) / gn).view(-1).tolist()
            line = (c, *xywh, float(conf)) if out.save_conf else (c, *xywh)
            with open(f"{txt_path}.txt", "a") as f:
                f.write(("%g " * len(line)).rstrip() % line + "\n")
        if out.save_img or out.save_crop or out.view_img:
            label = None if out.hide_labels else (names.get(c, str(c)) if out.hide_conf
                                                  else f"{names.get(c, c)} {conf:.2f}")
            annotator.box_label(xyxy, label, color=colors(c, True))
        if out.save_crop:
            save_one_box(xyxy, imc, file=out.save_dir / "crops" / str(names.get(c, c)) / f"{p.stem}.jpg", BGR=True)
    return annotator.result()


def log_summary(seen, dt, imgsz, save_dir, save_txt, save_img):
    """The speed per image, and where the results went."""
    t = tuple(x / max(seen, 1) * 1e3 for x in dt)
    LOGGER.info(f"Speed: %.1fms pre-process, %.1fms inference, %.1fms NMS per image at shape {(1, 3, *imgsz)}" % t)
    if save_txt or save_img:
        n = len(list(save_dir.glob("labels/*.txt")))
        extra = f"\n{n} labels saved to {save_dir / 'labels'}" if save_txt else ""
        LOGGER.info(f"Results saved to {colorstr('bold', save_dir)}{extra}")


class VideoWriters:
    """The .mp4 writer of each image of a batch (of each stream), while its video lasts."""

    def __init__(self, n):
        self.paths, self.writers = [None] * n, [None] * n
        self.cv2_paths = Cv2Paths()  # where OpenCV can write a video whose name is not UTF-8

    def write(self, i, save_path, vid_cap, im0):
        self.paths[i], self.writers[i] = _write_video_frame(self.cv2_paths.writable(save_path), self.paths[i],
                                                            self.writers[i], vid_cap, im0)

    def release(self):
        for w in self.writers:
            if w is not None:
                w.release()


def check_imshow(warn=True) -> bool:
    """Whether result windows can be shown here; if not, and `warn`, say why in one line."""
    why = None
    if not has_display():
        why = "there is no display ($DISPLAY is not set)"
    else:
        try:
            cv2.imshow("yolov5", np.zeros((8, 8, 3), np.uint8))
            cv2.waitKey(1)
            cv2.destroyAllWindows()
        except cv2.error:
            why = "this OpenCV has no GUI support (opencv-python-headless)"
    if why and warn:
        LOGGER.warning(f"WARNING: --view-img: cannot show windows, {why}; results are saved to the run folder instead")
    return why is None


def show_window(name, im):
    if sys.platform.startswith("linux"):
        cv2.namedWindow(name, cv2.WINDOW_NORMAL | cv2.WINDOW_KEEPRATIO)
    cv2.imshow(name, im)
    cv2.waitKey(1)


def _write_video_frame(save_path, vid_path, vid_writer, vid_cap, im0):
    """Append a frame to the .mp4 beside save_path, opening a new writer when the video changes."""
    save_path = str(Path(save_path).with_suffix(".mp4"))
    if vid_path != save_path:
        if vid_writer is not None:
            vid_writer.release()
        fps = vid_cap.get(cv2.CAP_PROP_FPS) if vid_cap else 30
        h, w = im0.shape[:2]
        vid_writer = cv2.VideoWriter(save_path, cv2.VideoWriter_fourcc(*"mp4v"), fps or 30, (w, h))
        vid_path = save_path
    vid_writer.write(im0)
    return vid_path, vid_writer


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description="YOLOv5 detection")
    parser.add_argument("--weights", nargs="+", type=str, default=ROOT / "yolov5s.pt",
                        help="model path(s): .pt, .torchscript, .onnx")
    parser.add_argument("--source", type=str, default=ROOT / "data/images",
                        help="file/dir/glob/.txt list/video/URL/webcam index (0)/.streams list/screen")
    parser.add_argument("--data", type=str, default=None, help="(optional) dataset.yaml for class names")
    parser.add_argument("--imgsz", "--img", "--img-size", nargs="+", type=int, default=[640], help="inference size h,w")
    parser.add_argument("--conf-thres", type=float, default=0.25, help="confidence threshold")
    parser.add_argument("--iou-thres", type=float, default=0.45, help="NMS IoU threshold")
    parser.add_argument("--max-det", type=int, default=1000, help="maximum detections per image")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--view-img", action="store_true", help="show results")
    parser.add_argument("--update", action="store_true", help="strip the optimizer from the weights file(s) afterwards")
    parser.add_argument("--save-txt", action="store_true", help="save results to *.txt")
    parser.add_argument("--save-conf", action="store_true", help="save confidences in --save-txt labels")
    parser.add_argument("--save-crop", action="store_true", help="save cropped prediction boxes")
    parser.add_argument("--nosave", action="store_true", help="do not save images/videos")
    parser.add_argument("--classes", nargs="+", type=int, help="filter by class: --classes 0, or --classes 0 2 3")
    parser.add_argument("--agnostic-nms", action="store_true", help="class-agnostic NMS")
    parser.add_argument("--augment", action="store_true", help="augmented inference")
    parser.add_argument("--visualize", action="store_true", help="visualize features")
    parser.add_argument("--project", default=ROOT / "runs/detect", help="save results to project/name")
    parser.add_argument("--name", default="exp", help="save results to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--line-thickness", default=3, type=int, help="bounding box thickness (pixels)")
    parser.add_argument("--hide-labels", default=False, action="store_true", help="hide labels")
    parser.add_argument("--hide-conf", default=False, action="store_true", help="hide confidences")
    parser.add_argument("--half", action="store_true", help="use FP16 half-precision inference")
    parser.add_argument("--dnn", action="store_true", help="use OpenCV DNN for ONNX inference")
    parser.add_argument("--vid-stride", type=int, default=1, help="video frame-rate stride")
    parser.add_argument("--nms-time-limit", type=float, default=0.0, help="seconds NMS may spend on a batch before "
                        "dropping the rest (for live streams; 0: no limit, every detection is kept)")
    opt = parser.parse_args(argv)
    opt.imgsz *= 2 if len(opt.imgsz) == 1 else 1
    print_args(vars(opt), "detect")
    return opt


MAX_LINE_THICKNESS = 1000  # OpenCV refuses to draw lines thicker than 32767 px, after inference


def check_flags(imgsz=(640, 640), conf_thres=0.25, iou_thres=0.45, max_det=1000, classes=None, line_thickness=3,
                vid_stride=1, nms_time_limit=0.0, **_):
    """Every number detect.py takes, checked before the model or any image is loaded: one UserError naming the flag,
    the value and what it must be. (--imgsz is also rounded up to a multiple of the model's stride, with a warning,
    once the model is loaded.)"""
    check_imgsz_flag(imgsz)
    for flag, v in (("--conf-thres", conf_thres), ("--iou-thres", iou_thres)):
        if not 0 <= v <= 1:  # NaN fails too
            raise UserError(f"{flag} {v}: must be between 0.0 and 1.0")
    for flag, v, most in (("--max-det", max_det, None), ("--vid-stride", vid_stride, None),
                          ("--line-thickness", line_thickness, MAX_LINE_THICKNESS)):
        if v < 1 or most is not None and v > most:
            raise UserError(f"{flag} {v}: must be an integer >= 1" + (f" and <= {most}" if most else ""))
    if classes is not None and any(c < 0 for c in classes):
        raise UserError(f"--classes {' '.join(map(str, classes))}: class indices are >= 0")
    if not 0 <= nms_time_limit < math.inf:
        raise UserError(f"--nms-time-limit {nms_time_limit}: give seconds >= 0 (0: no limit)")


def main(opt):
    check_flags(**vars(opt))
    if opt.data:
        opt.data = check_file(opt.data)
    return run(**vars(opt))


if __name__ == "__main__":
    run_cli(main, parse_opt())
