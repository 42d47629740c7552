"""How tests/data/qat_checkpoint_format1.pt was written, by the code of the commit before QAT checkpoints got a
format (d6e3c1d; run from a checkout of it: python make_qat_checkpoint_format1.py OUT.pt): a tiny yolov5 QAT model
(ReLU, --bn-folding --pow2-scale, default recipe) calibrated on random images, with the BN statistics of its first
conv frozen, saved by that commit's utils.checkpoint.save_checkpoint (QAT modules pickled whole, as train.py saved
them), with its expected eval output. It does not run with later code: its imports are that commit's."""
import sys
from copy import deepcopy

import torch

sys.path.insert(0, ".")
from models.quant import calibrate, freeze, prepare_yolo_qat
from models.yolo import DetectionModel
from utils.checkpoint import save_checkpoint

torch.manual_seed(0)
cfg = {"nc": 3, "depth_multiple": 0.33, "width_multiple": 0.0625, "activation": "relu",
       "anchors": [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]],
       "backbone": [[-1, 1, "Conv", [64, 6, 2, 2]], [-1, 1, "Conv", [128, 3, 2]], [-1, 3, "C3", [128]],
                    [-1, 1, "Conv", [256, 3, 2]], [-1, 6, "C3", [256]], [-1, 1, "Conv", [512, 3, 2]],
                    [-1, 9, "C3", [512]], [-1, 1, "Conv", [1024, 3, 2]], [-1, 3, "C3", [1024]],
                    [-1, 1, "SPPF", [1024, 5]]],
       "head": [[-1, 1, "Conv", [512, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                [[-1, 6], 1, "Concat", [1]],
                [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [256, 1, 1]], [-1, 1, "nn.Upsample", [None, 2, "nearest"]],
                [[-1, 4], 1, "Concat", [1]], [-1, 3, "C3", [256, False]], [-1, 1, "Conv", [256, 3, 2]],
                [[-1, 14], 1, "Concat", [1]], [-1, 3, "C3", [512, False]], [-1, 1, "Conv", [512, 3, 2]],
                [[-1, 10], 1, "Concat", [1]], [-1, 3, "C3", [1024, False]],
                [[17, 20, 23], 1, "Detect", ["nc", "anchors"]]]}
model = DetectionModel(cfg, ch=3, nc=3)
model.names = {0: "a", 1: "b", 2: "c"}
for m in model.modules():  # non-trivial BN statistics
    if isinstance(m, torch.nn.BatchNorm2d):
        m.running_mean.uniform_(-0.2, 0.2)
        m.running_var.uniform_(0.5, 2.0)
        m.weight.data.uniform_(0.5, 1.5)
        m.bias.data.uniform_(-0.1, 0.1)
model = prepare_yolo_qat(model.train(), bn_folding=True, pow2=True)
loader = [(torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8),) for _ in range(3)]
calibrate(model, loader, 3, "cpu")
model.model[0].conv.freeze_bn_stats()
x = torch.rand(1, 3, 64, 96)
ref = deepcopy(model)
freeze(ref.eval())
with torch.no_grad():
    y = ref(x)[0]
save_checkpoint({"epoch": 1, "best_fitness": None, "model": model, "ema": None, "updates": 3,
                 "optimizer": None, "opt": {"qat": True}, "git": None, "date": "2026-12-02",
                 "qat": {"bn_folding": True, "pow2": True, "recipe": None},
                 "expected": {"input": x, "output": y}}, sys.argv[1])
print("saved", sys.argv[1])
