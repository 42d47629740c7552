"""Train a YOLOv5 model on a custom dataset (FP32, activation retraining, and QAT).

Usage:
    python train.py --data shapes.yaml --cfg yolov5n.yaml --weights '' --img 320 --epochs 30
    python train.py --data shapes.yaml --weights runs/train/relu/weights/best.pt --hyp data/hyps/hyp.qat.yaml \
        --qat --bn-folding --pow2-scale --freeze-bn-epoch 0 --disable-observer-epoch 0      (QAT, see README)
    python train.py --data coco.yaml --weights weights/yolov5m.pt --cfg models/yolov5m.yaml --act relu \
        --hyp data/hyps/hyp.m-relu-tune.yaml
    torchrun --nproc_per_node 2 train.py --device 0,1 ...    (DDP; --device cpu uses gloo)
Runs go to runs/train/exp*: weights/last.pt, weights/best.pt, results.csv, results.png, plots.
"""
from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

import val as validate
from models.checkpoint import build_checkpoint, load_checkpoint, save_checkpoint, strip_optimizer
from models.common import activation_name, model_activation
from models.experimental import attempt_load
from models.quant import QATConfig, is_quantized
from models.yolo import DetectionModel
from utils.checkpoint_io import attempt_download, check_checkpoint_path
from utils.class_weights import labels_to_class_weights, labels_to_image_weights
from utils.dataloaders import create_dataloader, sample_seed
from utils.dataset_yaml import check_dataset
from utils.general import (
    LOCAL_RANK,
    LOGGER,
    RANK,
    WORLD_SIZE,
    UserError,
    check_file,
    check_img_size,
    check_imgsz_flag,
    claim_run_folder,
    colorstr,
    git_info,
    increment_path,
    intersect_dicts,
    make_run_folder,
    print_args,
    run_cli,
    yaml_load,
    yaml_save,
)
from utils.loss import ComputeLoss
from utils.metrics import fitness
from utils.plots import plot_labels, plot_results
from utils.torch_utils import (
    EarlyStopping,
    ModelEMA,
    de_parallel,
    one_cycle,
    select_device,
    smart_optimizer,
    torch_distributed_zero_first,
)
from workflow.autoanchor import check_anchors
from workflow.autobatch import autobatch
from workflow.engine import NBS, StepState, train_one_epoch
from workflow.evolve import evolve
from workflow.qat import QATRun, check_qat_flags, checkpoint_copy, report_ptq

DDP_DUMP_ENV = "YOLOV5_DDP_DUMP"  # debug aid, see dump_parameters()

HYP_KEYS = ("lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr", "box",
            "cls", "obj", "anchor_t")  # read by train.py itself; the dataloader and ComputeLoss check their own
RESULT_COLUMNS = ("train/box_loss", "train/obj_loss", "train/cls_loss", "metrics/precision", "metrics/recall",
                  "metrics/mAP_0.5", "metrics/mAP_0.5:0.95", "val/box_loss", "val/obj_loss", "val/cls_loss",
                  "x/lr0", "x/lr1", "x/lr2")


def init_seeds(seed=0, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"


def build_model(opt, hyp, nc, device):
    """The model to train and, when fine-tuning, how many tensors came from the checkpoint."""
    weights = opt.weights
    if weights and str(weights).endswith(".pt"):
        with torch_distributed_zero_first(LOCAL_RANK):  # one rank downloads, the others wait for the file
            path = attempt_download(weights)
            ckpt = load_checkpoint(path)
        # the live training weights, as upstream (a resumed run must not restart from its EMA); stripped
        # checkpoints hold the EMA as 'model' already
        src = ckpt.get("model") if isinstance(ckpt, dict) else None
        if not isinstance(src, nn.Module) and isinstance(ckpt, dict):
            src = ckpt.get("ema")
        if not isinstance(src, nn.Module):
            raise UserError(f"{path}: not a YOLOv5 checkpoint (no 'model' module inside)")
        if is_quantized(src):  # a QAT checkpoint: keep training it as saved (modules, scales, observer statistics)
            if not (getattr(opt, "qat", False) or opt.resume):
                raise UserError(f"{path}: is a QAT checkpoint; add --qat to keep training it, "
                                "or start from a float one")
            src_nc = int(getattr(src, "nc", 0) or src.yaml.get("nc", 0))
            if src_nc != nc and not opt.resume:
                raise UserError(f"{path}: a QAT model with {src_nc} classes cannot train on {opt.data} ({nc} classes): "
                                f"its quantized Detect head has the wrong size; start QAT from the float model it came "
                                f"from (--weights <float .pt> --qat ...)")
            LOGGER.info(f"Continuing the QAT model of {weights}")
            return src.float().to(device), ckpt
        act = pick_activation(opt, src)
        model = DetectionModel(opt.cfg or src.yaml, ch=3, nc=nc, anchors=hyp.get("anchors"), act=act).to(device)
        exclude = ["anchor"] if (opt.cfg or hyp.get("anchors")) and not opt.resume else []
        csd = intersect_dicts(src.float().state_dict(), model.state_dict(), exclude=exclude)
        model.load_state_dict(csd, strict=False)
        LOGGER.info(f"Transferred {len(csd)}/{len(model.state_dict())} items from {weights}"
                    + (f" (activation {model_activation(src)} -> {act})" if model_activation(src) != act else ""))
        return model, ckpt
    if weights:
        raise UserError(f"--weights {weights}: expected a .pt checkpoint, or '' to train from scratch")
    if not opt.cfg:
        raise UserError("--cfg is required when training from scratch (--weights ''), e.g. --cfg yolov5s.yaml")
    return DetectionModel(opt.cfg, ch=3, nc=nc, anchors=hyp.get("anchors"), act=pick_activation(opt)).to(device), None


def pick_activation(opt, src=None) -> str:
    """--act, else the --cfg yaml's own `activation`, else the checkpoint's, else SiLU (upstream's default).

    Always a name, so the model's yaml (and every checkpoint) records which activation it was built with.
    """
    cfg = yaml_load(opt.cfg) if opt.cfg else {}
    act = opt.act or (cfg.get("activation") if isinstance(cfg, dict) else None) or \
        (model_activation(src) if src is not None else "silu")
    try:
        return activation_name(act)
    except ValueError as e:
        raise UserError(f"{opt.cfg or opt.weights}: {e}") from None


def diverged_advice(last: Path) -> str:
    """What to do after training diverged: --resume would keep the run's hyperparameters, so it cannot lower lr0."""
    if not last.exists():
        return "The last good checkpoint is not written yet; lower lr0 in --hyp and start again"
    return (f"The last good checkpoint is {last}; lower lr0 in --hyp and continue from it with --weights {last} "
            f"(--resume keeps the run's hyperparameters)")


def train(hyp, opt, device):
    """One training run in opt.save_dir, which it holds for itself (`claim_run_folder`; rank 0 under DDP)."""
    with claim_run_folder(opt.save_dir) if RANK in (-1, 0) else nullcontext():
        return _train(hyp, opt, device)


def _train(hyp, opt, device):
    save_dir, batch_size, single_cls = Path(opt.save_dir), opt.batch_size, opt.single_cls
    hyp, tb = start_run_folder(save_dir, hyp, opt)
    plots = not opt.evolve and not opt.noplots
    cuda = device.type != "cpu"
    init_seeds(opt.seed + 1 + RANK, deterministic=True)
    with torch_distributed_zero_first(LOCAL_RANK):
        data_dict = check_dataset(opt.data)
    nc = 1 if single_cls else int(data_dict["nc"])
    names = {0: "item"} if single_cls and len(data_dict["names"]) != 1 else data_dict["names"]

    model, ckpt, qat = prepare_model(opt, hyp, nc, device)
    amp = cuda
    gs = max(int(model.stride.max()), 32)
    imgsz = check_img_size(opt.imgsz, gs, floor=gs * 2)
    if batch_size == -1:  # AutoBatch: one CUDA device (main checked)
        batch_size = opt.batch_size = autobatch(model, imgsz, device, amp)
    step = StepState(batch_size)
    optimizer, lf, scheduler = make_optimizer(model, opt, hyp, step, opt.epochs)
    ema = ModelEMA(model) if RANK in (-1, 0) else None
    best_fitness, start_epoch, epochs = start_or_resume(ckpt, opt, optimizer, ema, step, save_dir, opt.epochs)
    del ckpt
    model = sync_batchnorm(model, opt, cuda, device)

    train_loader, dataset, val_loader = make_loaders(data_dict, opt, hyp, imgsz, batch_size, gs, nc)
    if RANK in (-1, 0) and not opt.resume:
        first_run_checks(model, dataset, opt, hyp, imgsz, names, save_dir if plots else None)
    evaluate = validation(data_dict, batch_size // WORLD_SIZE * 2, imgsz, single_cls, val_loader, save_dir)
    if qat.enabled and not qat.resumed:
        # scales must exist before observers can be frozen (--disable-observer-epoch 0): calibrate on training
        # images without augmentation; every rank does the same, and DDP then broadcasts rank 0's quantizer buffers
        qat.calibrate(model, calibration_loader(data_dict, opt, hyp, imgsz, batch_size, gs, nc), device)
        if RANK in (-1, 0):
            report_ptq(evaluate(model, half=False, plots=False)[0])
            ema = ModelEMA(model)  # start the average from the calibrated model

    set_training_attributes(model, ema, hyp, opt, nc, names, dataset, imgsz, device)
    model = ddp_wrap(model, opt, cuda)
    git = git_info() if RANK in (-1, 0) else None  # recorded in every checkpoint, as upstream
    t0 = time.time()
    scheduler.last_epoch = start_epoch - 1
    loop = EpochLoop(opt, hyp, device, save_dir, plots, amp, nc, imgsz, gs, model, ema, optimizer, lf, scheduler, step,
                     qat, train_loader, dataset, evaluate, tb, git, start_epoch, epochs, best_fitness)
    LOGGER.info(f"Image sizes {imgsz} train, {imgsz} val\n"
                f"Using {train_loader.num_workers * WORLD_SIZE} dataloader workers\n"
                f"Logging results to {colorstr('bold', save_dir)}\n"
                f"Starting training for {epochs} epochs...")
    epoch = train_epochs(loop)
    return end_run(loop, epoch, t0, data_dict)


@dataclass
class EpochLoop:
    """What the epoch loop reads and updates, from the first epoch of a run (or the one it resumes) to its end."""

    opt: argparse.Namespace
    hyp: dict
    device: torch.device
    save_dir: Path
    plots: bool  # plot files: not --evolve, not --noplots
    amp: bool
    nc: int
    imgsz: int
    gs: int  # grid size: the largest stride, at least 32
    model: nn.Module  # DDP-wrapped under torchrun
    ema: ModelEMA | None  # rank 0's only
    optimizer: torch.optim.Optimizer
    lf: Callable[[float], float]  # lr factor of an epoch
    scheduler: torch.optim.lr_scheduler.LambdaLR
    step: StepState
    qat: QATRun
    train_loader: Any
    dataset: Any  # train_loader's dataset
    evaluate: Callable  # validation(): val.run on the val split
    tb: Any  # TensorBoard writer, or None
    git: dict | None  # recorded in every checkpoint
    start_epoch: int
    epochs: int
    best_fitness: float
    nw: int = field(init=False)  # warmup iterations
    scaler: torch.amp.GradScaler = field(init=False)
    compute_loss: ComputeLoss = field(init=False)
    stopper: EarlyStopping = field(init=False)
    results: tuple = field(init=False)  # of the last validation: P, R, mAP50, mAP50-95, 3 val losses
    maps: np.ndarray = field(init=False)  # mAP50-95 per class, of the last validation

    def __post_init__(self):
        self.nw = max(round(self.hyp["warmup_epochs"] * len(self.train_loader)), 100)
        self.maps, self.results = np.zeros(self.nc), (0, 0, 0, 0, 0, 0, 0)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.stopper = EarlyStopping(patience=self.opt.patience)
        self.compute_loss = ComputeLoss(de_parallel(self.model))

    @property
    def weights(self) -> Path:
        return self.save_dir / "weights"


def train_epochs(loop: EpochLoop) -> int:
    """Train from loop.start_epoch to the last epoch or an early stop, each epoch validated (unless --noval), logged
    and saved on rank 0; every rank stops together. Returns the last epoch run."""
    opt, model = loop.opt, loop.model
    last = loop.weights / "last.pt"
    epoch = loop.start_epoch
    for epoch in range(loop.start_epoch, loop.epochs):
        model.train()
        # every random draw of an epoch depends on (seed, epoch) only, so a resumed run repeats the epochs it
        # continues exactly: the loop's own draws here, the order and augmentations in EpochSampler
        init_seeds(sample_seed(opt.seed, epoch, 1 + RANK))
        if loop.qat.enabled:
            loop.qat.start_epoch(de_parallel(model), epoch)
        if opt.image_weights:
            cw = model.class_weights.cpu().numpy() * (1 - loop.maps) ** 2 / loop.nc
            iw = labels_to_image_weights(loop.dataset.labels, nc=loop.nc, class_weights=cw)
            loop.dataset.indices = random.choices(range(loop.dataset.n), weights=iw, k=loop.dataset.n)
        mloss = train_one_epoch(model, loop.train_loader, loop.optimizer, loop.scaler, loop.compute_loss, loop.ema,
                                loop.step, epoch, loop.epochs, device=loop.device, hyp=loop.hyp, lf=loop.lf,
                                nw=loop.nw, imgsz=loop.imgsz, gs=loop.gs, amp=loop.amp, multi_scale=opt.multi_scale,
                                quad=opt.quad, plot_dir=loop.save_dir if loop.plots else None,
                                advice=diverged_advice(last))
        lr = [x["lr"] for x in loop.optimizer.param_groups]
        loop.scheduler.step()
        stop = False
        if RANK != -1:
            # DDP broadcasts rank 0's buffers at the start of every forward, so after the last step each rank's
            # BN statistics and observer state have moved on its own batch: make them rank 0's again
            for buf in de_parallel(model).buffers():
                dist.broadcast(buf, 0)
        if RANK in (-1, 0):
            stop = end_epoch(loop, epoch, mloss, lr)
        if RANK != -1:  # every rank stops together
            flag = [stop if RANK == 0 else None]
            dist.broadcast_object_list(flag, 0)
            stop = flag[0]
        if stop:
            break
    return epoch


def end_epoch(loop: EpochLoop, epoch, mloss, lr) -> bool:
    """Rank 0 after an epoch: validate the EMA (every epoch, or only the final one with --noval), log results.csv,
    save the checkpoints. Returns whether EarlyStopping says stop."""
    opt, ema = loop.opt, loop.ema
    ema.update_attr(loop.model, include=MODEL_ATTRIBUTES)
    final_epoch = (epoch + 1 == loop.epochs) or loop.stopper.possible_stop
    if not opt.noval or final_epoch:
        loop.results, loop.maps, _ = loop.evaluate(ema.ema, half=loop.amp, plots=False, compute_loss=loop.compute_loss)
    fi = float(fitness(np.array(loop.results).reshape(1, -1))[0])
    stop = loop.stopper(epoch=epoch, fitness=fi)
    loop.best_fitness = max(loop.best_fitness, fi)
    log_results(loop.save_dir, epoch, list(mloss.cpu().numpy()) + list(loop.results) + lr, loop.tb)
    if (not opt.nosave) or final_epoch:
        ckpt = training_checkpoint(de_parallel(loop.model), ema, epoch, loop.best_fitness, loop.optimizer, loop.step,
                                   opt, loop.git, loop.qat)
        save_epoch(ckpt, loop.weights, epoch, opt.save_period, is_best=loop.best_fitness == fi,
                   advice=diverged_advice(loop.weights / "last.pt"))
    return stop


def end_run(loop: EpochLoop, epoch, t0, data_dict):
    """After the last epoch: the DDP parameter dump (debug aid), then on rank 0 the run's time, best.pt validated
    and the plots (finish_run). Returns the final results: best.pt's, else the last epoch's."""
    if os.getenv(DDP_DUMP_ENV):
        dump_parameters(de_parallel(loop.model), Path(os.environ[DDP_DUMP_ENV]))
    results = loop.results
    if RANK in (-1, 0):
        LOGGER.info(f"\n{epoch - loop.start_epoch + 1} epochs completed in {(time.time() - t0) / 3600:.3f} hours.")
        results = finish_run(loop.weights / "last.pt", loop.weights / "best.pt", data_dict, loop.evaluate,
                             loop.device, loop.compute_loss, loop.plots) or results
        LOGGER.info(f"Results saved to {colorstr('bold', loop.save_dir)}")
    if loop.tb:
        loop.tb.close()
    torch.cuda.empty_cache()
    return results


def prepare_model(opt, hyp, nc, device):
    """(model, checkpoint it came from or None, QATRun): built or loaded (build_model), quantized with --qat before
    the optimizer and the EMA see it, --freeze applied."""
    model, ckpt = build_model(opt, hyp, nc, device)
    qat = QATRun(opt)
    if qat.enabled:  # before the optimizer and the EMA: they must see the QAT modules
        model = qat.prepare(model).to(device)
    freeze_layers(model, opt.freeze)
    return model, ckpt, qat


def make_optimizer(model, opt, hyp, step: StepState, epochs):
    """(optimizer, lf, scheduler): --optimizer with weight decay scaled to the accumulated batch (hyp updated, as
    upstream), and the lr schedule, lf(epoch) the factor of lr0 (linear to lrf, or --cos-lr)."""
    hyp["weight_decay"] *= step.batch_size * step.accumulate / NBS
    optimizer = smart_optimizer(model, opt.optimizer, hyp["lr0"], hyp["momentum"], hyp["weight_decay"])
    lf = (one_cycle(1, hyp["lrf"], epochs) if opt.cos_lr
          else (lambda x: (1 - x / epochs) * (1.0 - hyp["lrf"]) + hyp["lrf"]))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lf)
    return optimizer, lf, scheduler


def validation(data_dict, batch_size, imgsz, single_cls, val_loader, save_dir):
    """evaluate(model, **val.run keywords): val.run of `model` on the run's val loader."""
    def evaluate(m, **kw):
        return validate.run(data_dict, batch_size=batch_size, imgsz=imgsz, model=m, single_cls=single_cls,
                            dataloader=val_loader, save_dir=save_dir, **kw)
    return evaluate


MODEL_ATTRIBUTES = ["yaml", "nc", "hyp", "names", "stride", "class_weights"]  # what the EMA copies from the model


def start_run_folder(save_dir: Path, hyp, opt):
    """weights/ made and checked before any work; the hyperparameters checked, logged and saved with opt.yaml;
    the TensorBoard writer (None without the package or with --noplots). Returns (hyp, writer)."""
    w = save_dir / "weights"
    make_run_folder(w)
    for f in w / "last.pt", w / "best.pt":  # before any work, not after the first epoch
        check_checkpoint_path(f)
    where = str(hyp) if isinstance(hyp, (str, Path)) else "hyp"
    hyp = check_hyp(yaml_load(hyp) if isinstance(hyp, (str, Path)) else hyp, where)
    LOGGER.info(colorstr("hyperparameters: ") + ", ".join(f"{k}={v}" for k, v in hyp.items()))
    opt.hyp = hyp.copy()
    if not opt.evolve and RANK in (-1, 0):  # one writer under DDP
        yaml_save(save_dir / "hyp.yaml", hyp)
        yaml_save(save_dir / "opt.yaml", vars(opt))
    tb = None
    if RANK in (-1, 0) and not opt.noplots:
        try:
            from torch.utils.tensorboard import SummaryWriter  # optional: needs the tensorboard package

            tb = SummaryWriter(str(save_dir))
        except (ImportError, ModuleNotFoundError):
            pass
    return hyp, tb


def start_or_resume(ckpt, opt, optimizer, ema, step, save_dir: Path, epochs):
    """(best fitness, first epoch, epochs): a resumed run's from its checkpoint (optimizer, EMA and gradient
    accumulation restored, results.csv cut back to the epochs it keeps); a new run's from scratch, after moving aside
    the results.csv of a run that used the folder before (--exist-ok)."""
    if opt.resume and ckpt is not None:
        best_fitness, start_epoch, epochs = resume_state(ckpt, optimizer, ema, opt.weights, epochs)
        step.last_opt_step = int(ckpt.get("last_opt_step", -1))  # where gradient accumulation stands
        if RANK in (-1, 0):
            trim_results(save_dir / "results.csv", start_epoch)
        return best_fitness, start_epoch, epochs
    if RANK in (-1, 0) and (save_dir / "results.csv").exists():
        os.replace(save_dir / "results.csv", save_dir / "results.previous.csv")
        LOGGER.info(f"{save_dir / 'results.csv'} of the run that used this folder before is now results.previous.csv")
    return 0.0, 0, epochs


def first_run_checks(model, dataset, opt, hyp, imgsz, names, plot_dir):
    """Before a new run's first epoch (rank 0): AutoAnchor, anchors rounded through FP16 as upstream, labels plot."""
    if not opt.noautoanchor:
        check_anchors(dataset, model=model, thr=hyp["anchor_t"], imgsz=imgsz)
    model.half().float()  # pre-reduce anchor precision, as upstream
    if plot_dir is not None:
        labels = np.concatenate(dataset.labels, 0) if len(dataset.labels) else np.zeros((0, 5))
        plot_labels(labels, names, plot_dir)


def freeze_layers(model, freeze):
    """--freeze: parameters of the first N model layers (or of the listed ones) get no gradient."""
    prefixes = [f"model.{x}." for x in (freeze if len(freeze) > 1 else range(freeze[0]))]
    for k, v in model.named_parameters():
        v.requires_grad = True
        if any(x in k for x in prefixes):
            LOGGER.info(f"freezing {k}")
            v.requires_grad = False


def sync_batchnorm(model, opt, cuda, device):
    if cuda and RANK != -1 and opt.sync_bn:
        LOGGER.info("Using SyncBatchNorm()")
        return nn.SyncBatchNorm.convert_sync_batchnorm(model).to(device)
    if opt.sync_bn and RANK != -1:
        LOGGER.warning("WARNING: --sync-bn needs CUDA devices; ignored on CPU")
    return model


def make_loaders(data_dict, opt, hyp, imgsz, batch_size, gs, nc):
    """(train loader, its dataset, val loader): the val loader on rank 0 only (None elsewhere)."""
    single_cls = opt.single_cls
    train_loader, dataset = create_dataloader(data_dict["train"], imgsz, batch_size // WORLD_SIZE, gs, single_cls,
                                              hyp=hyp, augment=True, cache=None if opt.cache == "val" else opt.cache,
                                              rect=opt.rect, rank=LOCAL_RANK, workers=opt.workers,
                                              image_weights=opt.image_weights, quad=opt.quad,
                                              prefix=colorstr("train: "), shuffle=True, seed=opt.seed,
                                              nc=None if single_cls else nc)
    val_loader = None
    if RANK in (-1, 0):
        cache = None if opt.noval else ("ram" if opt.cache == "val" else opt.cache)
        val_loader = create_dataloader(data_dict["val"], imgsz, batch_size // WORLD_SIZE * 2, gs, single_cls,
                                       hyp=hyp, cache=cache, rect=True, rank=-1, workers=opt.workers * 2,
                                       pad=0.5, prefix=colorstr("val: "), nc=None if single_cls else nc)[0]
    return train_loader, dataset, val_loader


def calibration_loader(data_dict, opt, hyp, imgsz, batch_size, gs, nc):
    """QAT calibration batches: training images without augmentation, in the run's seeded order."""
    return create_dataloader(data_dict["train"], imgsz, batch_size // WORLD_SIZE, gs, opt.single_cls, hyp=hyp,
                             augment=False, rect=False, rank=-1, workers=opt.workers, shuffle=True, seed=opt.seed,
                             prefix=colorstr("calib: "), nc=None if opt.single_cls else nc)[0]


def set_training_attributes(model, ema, hyp, opt, nc, names, dataset, imgsz, device):
    """Loss gains scaled to the number of levels, classes and image size (as upstream); the attributes the loss,
    image weights and checkpoints read from the model, copied to the EMA."""
    nl = de_parallel(model).model[-1].nl
    hyp["box"] *= 3 / nl
    hyp["cls"] *= nc / 80 * 3 / nl
    hyp["obj"] *= (imgsz / 640) ** 2 * 3 / nl
    hyp["label_smoothing"] = opt.label_smoothing
    model.nc = nc
    model.hyp = hyp
    model.class_weights = labels_to_class_weights(dataset.labels, nc).to(device) * nc
    model.names = names
    if ema:
        ema.update_attr(model, include=MODEL_ATTRIBUTES)


def ddp_wrap(model, opt, cuda):
    if cuda and RANK == -1 and torch.cuda.device_count() > 1 and len(str(opt.device).split(",")) > 1:
        LOGGER.warning("WARNING: DataParallel is not supported, use torchrun for multi-GPU training")
    if RANK == -1:
        return model
    return nn.parallel.DistributedDataParallel(model, device_ids=[LOCAL_RANK] if cuda else None,
                                               output_device=LOCAL_RANK if cuda else None)


def training_checkpoint(model, ema, epoch, best_fitness, optimizer, step, opt, git, qat) -> dict:
    """The checkpoint of an epoch: upstream's keys, plus where gradient accumulation stands and the QAT settings."""
    return build_checkpoint(checkpoint_copy(model), ema=checkpoint_copy(ema.ema), updates=ema.updates, epoch=epoch,
                            best_fitness=best_fitness, optimizer=optimizer.state_dict(),
                            last_opt_step=step.last_opt_step, opt=_plain(vars(opt)), git=git,
                            qat=qat.schedule() if qat.enabled else None)


def save_epoch(ckpt, w: Path, epoch, save_period, is_best, advice):
    """last.pt, best.pt when the epoch is the best so far, epoch<N>.pt every --save-period epochs; nothing when a
    weight is not finite (a good last.pt is never replaced by a diverged one)."""
    if not (all_finite(ckpt["model"]) and all_finite(ckpt["ema"])):
        raise UserError(f"non-finite weights after epoch {epoch} (as saved, in float16); stopped without saving. "
                        f"{advice}")
    save_checkpoint(ckpt, w / "last.pt")
    if is_best:
        save_checkpoint(ckpt, w / "best.pt")
    if save_period > 0 and epoch % save_period == 0:
        save_checkpoint(ckpt, w / f"epoch{epoch}.pt")


def finish_run(last, best, data_dict, evaluate, device, compute_loss, plots):
    """Strip the optimizer from last.pt and best.pt, validate best.pt as upstream does (verbose, JSON when the
    dataset has annotations; COCO at NMS IoU 0.65, its published numbers, else 0.6) and plot results.csv.
    Returns best.pt's results, or None without a best.pt."""
    results = None
    for f in last, best:
        if f.exists():
            strip_optimizer(f)
            if f is best:
                LOGGER.info(f"\nValidating {f}...")
                val_path = data_dict["val"]
                is_coco = isinstance(val_path, str) and val_path.endswith(f"coco{os.sep}val2017.txt")
                results, _, _ = evaluate(attempt_load(f, device, fuse=True), iou_thres=0.65 if is_coco else 0.60,
                                         save_json=bool(data_dict.get("annotations")), verbose=True, plots=plots,
                                         compute_loss=compute_loss)
    if plots and (last.parent.parent / "results.csv").exists():
        plot_results(file=last.parent.parent / "results.csv")
    return results
def resume_state(ckpt, optimizer, ema, weights, epochs):
    """Restore optimizer, EMA, epoch and best fitness from a last.pt; refuse finished runs."""
    best_fitness = float(ckpt.get("best_fitness") or 0.0)
    if ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if ema and ckpt.get("ema") is not None:
        ema.ema.load_state_dict(ckpt["ema"].float().state_dict())
        ema.updates = ckpt["updates"]
    start_epoch = ckpt["epoch"] + 1
    if ckpt["epoch"] == -1 or start_epoch >= epochs:
        raise UserError(f"{weights}: training to {epochs} epochs is finished, nothing to resume; "
                        f"start a new run with --weights {weights}")
    LOGGER.info(f"Resuming training from {weights} from epoch {start_epoch} to {epochs} total epochs")
    return best_fitness, start_epoch, epochs


def check_hyp(hyp, where="hyp") -> dict:
    """A copy of the hyperparameter mapping, with the keys train.py reads present and numeric."""
    if not isinstance(hyp, dict):
        raise UserError(f"{where}: a --hyp yaml must be a mapping of hyperparameters, "
                        f"see data/hyps/hyp.scratch-low.yaml")
    missing = [k for k in HYP_KEYS if k not in hyp]
    if missing:
        raise UserError(f"{where}: missing {', '.join(missing)}; add them (see data/hyps/hyp.scratch-low.yaml)")
    bad = [k for k in HYP_KEYS if isinstance(hyp[k], bool) or not isinstance(hyp[k], (int, float))]
    if bad:
        raise UserError(f"{where}: {', '.join(f'{k}={hyp[k]!r}' for k in bad)} must be numbers")
    return dict(hyp)


def all_finite(model) -> bool:
    return all(bool(torch.isfinite(v).all()) for v in model.state_dict().values() if v.is_floating_point())


def trim_results(file, start_epoch):
    """Drop results.csv rows of epochs >= start_epoch: a run killed after logging an epoch but before saving
    its checkpoint repeats that epoch on --resume, and must not log it twice."""
    file = Path(file)
    if not file.is_file():
        return
    def epoch_of(line):
        try:
            return float(line.split(",")[0])
        except ValueError:  # a line cut short by the kill
            return math.inf

    lines = file.read_text().splitlines(keepends=True)
    keep = lines[:1] + [ln for ln in lines[1:] if ln.strip() and epoch_of(ln) < start_epoch]
    if len(keep) != len(lines):
        tmp = file.with_name(file.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, file)


def dump_parameters(model, folder: Path):
    """Debug aid for DDP: with YOLOV5_DDP_DUMP=<folder> set, every rank saves its final parameters to
    <folder>/rank<RANK>.pt, so they can be compared across ranks (tests/test_train.py does)."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().clone() for k, v in model.named_parameters()}
    torch.save(state, folder / f"rank{max(RANK, 0)}.pt")
    buffers = {k: v.detach().cpu().clone() for k, v in model.named_buffers()}  # BN statistics, quantizer state
    torch.save(buffers, folder / f"rank{max(RANK, 0)}_buffers.pt")


def _plain(d):
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in d.items()}


def log_results(save_dir, epoch, vals, tb=None):
    file = save_dir / "results.csv"
    n = len(RESULT_COLUMNS) + 1
    header = "" if file.exists() else (("%20s," * n % ("epoch", *RESULT_COLUMNS)).rstrip(",") + "\n")
    with open(file, "a") as f:
        f.write(header + ("%20.5g," * n % (epoch, *vals)).rstrip(",") + "\n")
    if tb:
        for k, v in zip(RESULT_COLUMNS, vals):
            tb.add_scalar(k, float(v), epoch)


def parse_opt(argv=None):
    parser = argparse.ArgumentParser(description="Train YOLOv5 (FP32, activation retraining, QAT)")
    parser.add_argument("--weights", type=str, default=ROOT / "yolov5s.pt",
                        help="initial weights path ('' to train from scratch with --cfg)")
    parser.add_argument("--cfg", type=str, default="", help="model.yaml path")
    parser.add_argument("--data", type=str, default=ROOT / "data/coco128.yaml", help="dataset.yaml path")
    parser.add_argument("--hyp", type=str, default=ROOT / "data/hyps/hyp.scratch-low.yaml", help="hyperparameters path")
    parser.add_argument("--epochs", type=int, default=100, help="total training epochs")
    parser.add_argument("--batch-size", "--batch", type=int, default=16,
                        help="total batch size for all GPUs, -1 for AutoBatch (one CUDA device)")
    parser.add_argument("--imgsz", "--img", "--img-size", type=int, default=640, help="train, val image size (pixels)")
    parser.add_argument("--rect", action="store_true", help="rectangular training")
    parser.add_argument("--resume", nargs="?", const=True, default=False, help="resume most recent training")
    parser.add_argument("--nosave", action="store_true", help="only save final checkpoint")
    parser.add_argument("--noval", action="store_true", help="only validate final epoch")
    parser.add_argument("--noautoanchor", action="store_true", help="disable AutoAnchor")
    parser.add_argument("--noplots", action="store_true", help="save no plot files")
    parser.add_argument("--evolve", type=int, nargs="?", const=300,
                        help="evolve the --hyp hyperparameters for x generations (runs/evolve/, workflow/evolve.py)")
    parser.add_argument("--cache", type=str, nargs="?", const="ram", help="image --cache ram/disk")
    parser.add_argument("--image-weights", action="store_true", help="use weighted image selection for training")
    parser.add_argument("--device", default="", help="cuda device, i.e. 0 or 0,1,2,3 or cpu")
    parser.add_argument("--multi-scale", action="store_true", help="vary img-size +/- 50%%")
    parser.add_argument("--single-cls", action="store_true", help="train multi-class data as single-class")
    parser.add_argument("--optimizer", type=str, choices=["SGD", "Adam", "AdamW"], default="SGD", help="optimizer")
    parser.add_argument("--sync-bn", action="store_true", help="use SyncBatchNorm, only available in DDP mode")
    parser.add_argument("--workers", type=int, default=8, help="max dataloader workers (per RANK in DDP mode)")
    parser.add_argument("--project", default=ROOT / "runs/train", help="save to project/name")
    parser.add_argument("--name", default="exp", help="save to project/name")
    parser.add_argument("--exist-ok", action="store_true", help="existing project/name ok, do not increment")
    parser.add_argument("--quad", action="store_true", help="quad dataloader")
    parser.add_argument("--cos-lr", action="store_true", help="cosine LR scheduler")
    parser.add_argument("--label-smoothing", type=float, default=0.0, help="Label smoothing epsilon")
    parser.add_argument("--patience", type=int, default=100, help="EarlyStopping patience (epochs without improvement)")
    parser.add_argument("--freeze", nargs="+", type=int, default=[0], help="Freeze layers: backbone=10, first3=0 1 2")
    parser.add_argument("--save-period", type=int, default=-1, help="Save checkpoint every x epochs (disabled if < 1)")
    parser.add_argument("--seed", type=int, default=0, help="Global training seed")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=-1,
                        help="Automatic DDP Multi-GPU argument, do not modify")
    logger = parser.add_argument_group("upstream's Weights & Biases / Google Cloud options (not part of yolov5-qat: "
                                       "results go to results.csv and TensorBoard; giving one stops with one line)")
    logger.add_argument("--bucket", type=str, default="", help="gsutil bucket")
    logger.add_argument("--entity", default=None, help="W&B: Entity")
    logger.add_argument("--upload_dataset", nargs="?", const=True, default=False, help='W&B: Upload data, "val" option')
    logger.add_argument("--bbox_interval", type=int, default=-1, help="W&B: Set bounding-box image logging interval")
    logger.add_argument("--artifact_alias", type=str, default="latest", help="W&B: Version of dataset artifact to use")
    parser.add_argument("--act", type=str, choices=["silu", "relu", "relu6"], default=None,
                        help="activation of every Conv block (default: the checkpoint's, else silu)")
    qat = parser.add_argument_group("quantization-aware training (QAT)")
    qat.add_argument("--qat", action="store_true", help="quantize the model (convs, skip-adds, concats, Detect "
                     "convs, per --qat-recipe) and train it with fake quantization")
    QATConfig.add_arguments(qat)
    qat.add_argument("--freeze-bn-epoch", type=int, default=-1, help="BN running statistics stop updating from "
                     "epoch N on (0: from the start; -1: never)")
    qat.add_argument("--disable-observer-epoch", type=int, default=-1, help="observers stop updating (scales "
                     "frozen) from epoch N on (0: right after calibration; -1: never)")
    qat.add_argument("--calib-batches", type=int, default=32, help="training batches for the calibration pass "
                     "that starts QAT")
    return parser.parse_args(argv)


def latest_run(search_dir=ROOT / "runs/train"):
    runs = [p for p in Path(search_dir).glob("**/last*.pt")]
    return max(runs, key=os.path.getctime) if runs else None


def resume_options(opt):
    """The options of the run to resume (its opt.yaml), keeping --device and --workers of this command line.

    --resume alone takes the newest last.pt under --project; --resume PATH takes a last.pt or a run folder.
    Finished, foreign or broken runs are refused here, before anything in the run folder is touched.
    """
    if isinstance(opt.resume, (str, Path)):
        last = Path(opt.resume)
        last = last / "weights" / "last.pt" if last.is_dir() else last
        if not last.is_file():
            raise UserError(f"--resume {opt.resume}: no such checkpoint; give a run's weights/last.pt or its folder")
    else:
        last = latest_run(opt.project)
        if last is None:
            raise UserError(f"--resume: no last.pt found under {opt.project}; give the path of a run's weights/last.pt")
    ckpt = load_checkpoint(last)
    if not (isinstance(ckpt, dict) and isinstance(ckpt.get("epoch"), int) and isinstance(ckpt.get("model"), nn.Module)):
        raise UserError(f"--resume {last}: not a YOLOv5 training checkpoint (no epoch/model), cannot resume it")
    opt_yaml = last.parent.parent / "opt.yaml"
    if opt_yaml.is_file():
        d, source = yaml_load(opt_yaml), opt_yaml
    else:  # as upstream: the options the checkpoint was saved with
        d, source = ckpt.get("opt"), f"{last} (its saved 'opt'; {opt_yaml.name} is missing)"
    if not isinstance(d, dict) or not isinstance(d.get("epochs"), int):
        raise UserError(f"--resume {last}: {source} holds no training run's options (opt.yaml beside the run, or "
                        f"'opt' in the checkpoint), cannot resume it")
    if ckpt["epoch"] == -1 or ckpt.get("optimizer") is None or ckpt["epoch"] + 1 >= d["epochs"]:
        raise UserError(f"--resume {last}: training to {d['epochs']} epochs is finished, nothing to resume; "
                        f"start a new run with --weights {last}")
    del ckpt  # (temporary files of a save that a kill interrupted go when the run claims its folder)
    keep = {"device": opt.device, "workers": opt.workers}
    opt = argparse.Namespace(**{**vars(opt), **d})
    opt.device, opt.workers = keep["device"], keep["workers"]
    opt.cfg, opt.weights, opt.resume = "", str(last), True
    opt.save_dir = str(last.parent.parent)
    return opt


UNSUPPORTED_LOGGER_FLAGS = {"bucket": "", "entity": None, "upload_dataset": False, "bbox_interval": -1,
                            "artifact_alias": "latest"}  # upstream's defaults


def check_train_flags(opt):
    """Numbers that cannot train, and upstream options this project does not have: one line each, before any data
    or model is loaded."""
    given = [f"--{k}" for k, default in UNSUPPORTED_LOGGER_FLAGS.items() if getattr(opt, k, default) != default]
    if given:
        raise UserError(f"{', '.join(given)}: Weights & Biases and Google Cloud uploads are not part of yolov5-qat; "
                        f"results go to the run folder (results.csv, TensorBoard events); drop the option")
    if opt.batch_size == -1 and LOCAL_RANK != -1:
        raise UserError("--batch-size -1 (AutoBatch) sizes the batch for one CUDA device; under torchrun give a "
                        "batch size")
    for flag, value, least in (("--batch-size", 1 if opt.batch_size == -1 else opt.batch_size, 1),  # -1: AutoBatch
                               ("--epochs", opt.epochs, 1),
                               ("--imgsz", opt.imgsz, 1), ("--workers", opt.workers, 0)):
        if value < least:
            raise UserError(f"{flag} {value}: must be an integer >= {least}")
    check_imgsz_flag(opt.imgsz)


def check_inputs_exist(opt):
    """The weights and the dataset, fetched if they can be (release files, the dataset yaml's download), before any
    work: when neither is there (upstream's defaults yolov5s.pt and coco128.yaml without network) one line says
    where to put both."""
    problems = []
    if opt.weights:
        try:
            attempt_download(opt.weights)
        except UserError as e:
            problems.append(str(e))
    try:
        check_dataset(opt.data)
    except UserError as e:
        problems.append(str(e))
    if problems:
        raise UserError("; and ".join(problems))


def main(opt):
    if RANK in (-1, 0):
        print_args(vars(opt), "train")
    if opt.evolve is not None:
        if opt.evolve < 1:
            raise UserError(f"--evolve {opt.evolve}: the number of generations must be >= 1")
        if opt.resume:
            raise UserError("--resume and --evolve: a search continues from its evolve.csv; run --evolve again with "
                            "the same --name and --exist-ok")
        if LOCAL_RANK != -1:
            raise UserError("--evolve runs one process; start it without torchrun")
    if LOCAL_RANK != -1 and opt.batch_size % WORLD_SIZE:
        raise UserError(f"--batch-size {opt.batch_size} must be a multiple of WORLD_SIZE {WORLD_SIZE}")
    if opt.resume:
        opt = resume_options(opt)
    check_train_flags(opt)
    check_qat_flags(opt)
    if not opt.resume:
        opt.data = check_file(opt.data)
        opt.hyp = opt.hyp if isinstance(opt.hyp, dict) else check_file(opt.hyp)
        opt.cfg = check_file(opt.cfg, search_dirs=("models",)) if opt.cfg else ""
        opt.weights = str(opt.weights)
        if not opt.cfg and not opt.weights:
            raise UserError("either --cfg or --weights must be specified")
        if LOCAL_RANK in (-1, 0):
            check_inputs_exist(opt)
        if opt.evolve is not None and Path(opt.project) == ROOT / "runs/train":  # as upstream
            opt.project = ROOT / "runs/evolve"
        opt.save_dir = str(increment_path(Path(opt.project) / opt.name, exist_ok=opt.exist_ok))

    device = select_device(opt.device, batch_size=opt.batch_size)
    if opt.batch_size == -1 and device.type != "cuda":
        raise UserError("--batch-size -1 (AutoBatch) measures CUDA memory and needs a CUDA --device; on the CPU give "
                        "a batch size")
    if LOCAL_RANK != -1:
        if device.type == "cuda":
            torch.cuda.set_device(LOCAL_RANK)
            device = torch.device("cuda", LOCAL_RANK)
        dist.init_process_group(backend="nccl" if dist.is_nccl_available() and device.type == "cuda" else "gloo",
                                timeout=timedelta(seconds=10800))
    try:
        if LOCAL_RANK != -1 and not opt.resume:  # rank 0 names the run folder (exp, exp2, ...) for every rank
            name = [opt.save_dir]
            dist.broadcast_object_list(name, 0)
            opt.save_dir = name[0]
        if opt.evolve is not None:  # every generation a whole run, validated after its last epoch
            opt.noval, opt.nosave = True, True
            base = check_hyp(opt.hyp if isinstance(opt.hyp, dict) else yaml_load(opt.hyp), str(opt.hyp))
            return evolve(opt, device, train, base)[1]
        return train(opt.hyp, opt, device)
    finally:
        if WORLD_SIZE > 1 and RANK == 0 and dist.is_initialized():
            LOGGER.info("Destroying process group... ")
        if dist.is_initialized():
            dist.destroy_process_group()


def run(**kwargs):
    """In-process use: opt = train.run(data='shapes.yaml', cfg='yolov5n.yaml', weights='', imgsz=320, epochs=1).
    Returns the run's options as upstream does, with `opt.metrics` = the final validation's (P, R, mAP50,
    mAP50-95, box, obj and cls loss) and `opt.save_dir` the run folder."""
    opt = parse_opt([])
    for k, v in kwargs.items():
        setattr(opt, k, v)
    results = main(opt)
    opt.metrics = tuple(float(x) for x in results)
    return opt


if __name__ == "__main__":
    run_cli(main, parse_opt())
