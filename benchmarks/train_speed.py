"""Training images/s of yolov5n and yolov5s on shapes, split into data loading, forward+loss, backward, optimizer.

Each model trains the way train.py trains it: the augmenting training dataloader (mosaic, HSV, flips, perspective),
the hyp gains scaled for nc and image size, ComputeLoss, SGD over upstream's three parameter groups, gradient
clipping, an optimizer step every `nbs / batch` batches (train.py's accumulation after warmup) and the EMA update.
The models take turns, a few batches each per round, so both see the same machine load; every number in the table
comes from that one run.

  data       time the loop waits for the next batch (the dataloader works ahead in worker processes)
  fwd+loss   model(imgs) and ComputeLoss
  backward   loss.backward()
  optimizer  gradient clipping, optimizer.step(), zero_grad() and the EMA update (only on stepping batches)

    python benchmarks/train_speed.py                       # yolov5n and yolov5s, 320 px, batch 16, CPU
    python benchmarks/train_speed.py --models n s m --batches 4 --rounds 2 --threads 2
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from models.yolo import DetectionModel
from utils.dataloaders import create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import LOGGER, UserError, check_file, check_img_size, run_cli, yaml_load
from utils.loss import ComputeLoss
from utils.torch_utils import ModelEMA, select_device, smart_optimizer, time_sync

PHASES = ("data", "fwd+loss", "backward", "optimizer")
NBS = 64  # train.py's nominal batch size


class Trainee:
    """One model with its loss, optimizer and EMA, set up as train.py sets them up after warmup."""

    def __init__(self, size, nc, hyp, imgsz, batch_size, device):
        self.name = f"yolov5{size}"
        hyp = dict(hyp)
        self.model = DetectionModel(ROOT / f"models/{self.name}.yaml", nc=nc).to(device).train()
        nl = self.model.model[-1].nl
        hyp["box"] *= 3 / nl
        hyp["cls"] *= nc / 80 * 3 / nl
        hyp["obj"] *= (imgsz / 640) ** 2 * 3 / nl
        hyp.setdefault("label_smoothing", 0.0)
        self.model.hyp, self.model.nc = hyp, nc
        self.accumulate = max(round(NBS / batch_size), 1)
        decay = hyp["weight_decay"] * batch_size * self.accumulate / NBS
        self.optimizer = smart_optimizer(self.model, "SGD", hyp["lr0"], hyp["momentum"], decay)
        self.loss = ComputeLoss(self.model)
        self.ema = ModelEMA(self.model)
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self.images = self.batches = self.timed = self.steps = 0

    def train_batches(self, batches, n, device, timed=True):
        for _ in range(n):
            t0 = time_sync()
            imgs, targets, _, _ = next(batches)
            imgs = imgs.to(device, non_blocking=True).float() / 255
            targets = targets.to(device)
            t1 = time_sync()
            loss, _ = self.loss(self.model(imgs), targets)
            t2 = time_sync()
            loss.backward()
            t3 = time_sync()
            stepped = (self.batches + 1) % self.accumulate == 0
            if stepped:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=10.0)
                self.optimizer.step()
                self.optimizer.zero_grad()
                self.ema.update(self.model)
            t4 = time_sync()
            if not torch.isfinite(loss).all():
                raise RuntimeError(f"{self.name}: non-finite loss {loss.item()} in the benchmark")
            self.batches += 1
            if timed:
                for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    self.seconds[k] += dt
                self.images += imgs.shape[0]
                self.timed += 1
                self.steps += stepped


def forever(loader):
    while True:
        yield from loader


def run(models=("n", "s"), data="shapes.yaml", hyp="data/hyps/hyp.scratch-low.yaml", imgsz=320, batch_size=16,
        batches=4, rounds=3, warmup=1, workers=2, device="cpu", threads=0, seed=0):
    if threads:
        torch.set_num_threads(threads)
    for name, v in (("--batches", batches), ("--rounds", rounds), ("--batch-size", batch_size)):
        if v < 1:
            raise UserError(f"{name} {v}: must be at least 1")
    hyp = yaml_load(check_file(hyp))
    data_dict = check_dataset(data)
    device = select_device(device, batch_size=batch_size)
    torch.manual_seed(seed)
    np.random.seed(seed)
    imgsz = check_img_size(imgsz, 32, floor=64)
    loader, dataset = create_dataloader(data_dict["train"], imgsz, batch_size, 32, hyp=hyp, augment=True,
                                        workers=workers, shuffle=True, seed=seed, prefix="train: ")
    stream = forever(loader)
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)  # model tables and optimizer lines would bury the result
    try:
        trainees = [Trainee(s, int(data_dict["nc"]), hyp, imgsz, batch_size, device) for s in models]
    finally:
        LOGGER.setLevel(level)

    for t in trainees:  # first batches allocate memory and start the workers: not timed
        t.train_batches(stream, warmup, device, timed=False)
    for _ in range(rounds):  # take turns so that both models run under the same load
        for t in trainees:
            t.train_batches(stream, batches, device)

    print(f"\ntraining speed: {data_dict.get('yaml_file', data)}, {imgsz} px, batch {batch_size}, "
          f"{loader.num_workers} dataloader workers, torch threads {torch.get_num_threads()}, device {device}, "
          f"{batches * rounds} timed batches per model (after {warmup} untimed), optimizer step every "
          f"{trainees[0].accumulate} batches")
    head = f"{'model':<10}{'images/s':>10}{'ms/batch':>10}" + "".join(f"{p:>11}" for p in PHASES) + f"{'steps':>7}"
    print(head)
    print("-" * len(head))
    rows = {}
    for t in trainees:
        total = sum(t.seconds.values())
        rows[t.name] = t.images / total
        shares = "".join(f"{100 * t.seconds[p] / total:>10.1f}%" for p in PHASES)
        print(f"{t.name:<10}{t.images / total:>10.2f}{1000 * total / t.timed:>10.0f}{shares}{t.steps:>7}")
    base = trainees[0].name
    for t in trainees[1:]:
        print(f"{t.name} takes {rows[base] / rows[t.name]:.2f}x the time per image of {base}")
    return rows


def parse_opt(argv=None):
    p = argparse.ArgumentParser(description="Training speed of YOLOv5 models and where the time goes")
    p.add_argument("--models", nargs="+", default=["n", "s"], choices=list("nsmlx"), help="model sizes")
    p.add_argument("--data", default="shapes.yaml", help="dataset yaml")
    p.add_argument("--hyp", default="data/hyps/hyp.scratch-low.yaml", help="hyperparameters yaml")
    p.add_argument("--imgsz", "--img", type=int, default=320, help="training image size")
    p.add_argument("--batch-size", type=int, default=16, help="batch size")
    p.add_argument("--batches", type=int, default=4, help="timed batches per model and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds in which the models take turns")
    p.add_argument("--warmup", type=int, default=1, help="untimed batches per model first")
    p.add_argument("--workers", type=int, default=2, help="dataloader workers")
    p.add_argument("--device", default="cpu", help="cpu or a CUDA index")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


if __name__ == "__main__":
    run_cli(lambda o: run(**vars(o)), parse_opt())
