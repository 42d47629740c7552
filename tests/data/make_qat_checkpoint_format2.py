"""How tests/data/qat_checkpoint_format2.pt was written, by the code of commit b47c169 (the last one whose QAT
checkpoints are format 2: the float part in 'model', the settings and the state_dict in 'qat_state'); run from a
checkout of it: python tests/data/make_qat_checkpoint_format2.py OUT.pt. It does not run with later code: its imports
are that commit's.

The shipped ReLU parent (weights/shapes_yolov5n_relu.pt) is post-training quantized with a setting other than the
default wherever one exists (--bn-folding, --pow2-scale, --pow2-rounding round, --rounding half_up; the default
recipe, stored whole), calibrated on 2 batches of 8 shapes training images at 256 px, the BN statistics of its first
conv frozen, and saved as train.py saves a finished run (epoch -1, no optimizer, no EMA) with the checkpoint's 'qat'
record of a PTQ run. Its expected results ride along in 'expected': the frozen model's decoded output on a fixed
input, and what val.run printed for the file on the first 32 shapes val images at 256 px, batch 16."""
import sys
from copy import deepcopy
from pathlib import Path

import torch

sys.path.insert(0, ".")
import val
from models.checkpoint import build_checkpoint, save_checkpoint
from models.experimental import attempt_load
from models.quant import calibrate, freeze, prepare_yolo_qat
from utils.dataloaders import create_dataloader
from utils.dataset_yaml import check_dataset
from utils.general import yaml_save
from workflow.qat import qat_meta

VAL_IMAGES, IMGSZ, BATCH = 32, 256, 16


def val_subset(folder: Path) -> Path:
    """The first VAL_IMAGES shapes val images as a dataset yaml (tests/conftest.py's shapes_subset makes the same)."""
    full = check_dataset("data/shapes.yaml")
    val_ims = sorted(p for p in Path(full["val"]).iterdir() if p.suffix == ".jpg")[:VAL_IMAGES]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "format2_val.txt").write_text("".join(f"{p}\n" for p in val_ims))
    yaml_save(folder / "format2.yaml", {"path": str(folder), "train": "format2_val.txt", "val": "format2_val.txt",
                                        "names": list(full["names"].values())})
    return folder / "format2.yaml"


out = Path(sys.argv[1])
torch.manual_seed(0)
data = check_dataset("data/shapes.yaml")
model = attempt_load("weights/shapes_yolov5n_relu.pt", fuse=False).float()
model = prepare_yolo_qat(model.train(), bn_folding=True, pow2=True, pow2_rounding="round", rounding="half_up")
loader = create_dataloader(data["train"], IMGSZ, 8, 32, augment=False, rect=False, workers=0, shuffle=True, seed=0)[0]
calibrate(model, loader, 2, "cpu")
model.model[0].conv.freeze_bn_stats()
model.eval()
x = torch.rand(1, 3, 64, 96)
ref = freeze(deepcopy(model).eval())
with torch.no_grad():
    y = ref(x)[0]
ckpt = build_checkpoint(model, qat=qat_meta(model, calib_batches=2, ptq=True))
save_checkpoint({**ckpt, "expected": {"input": x, "output": y}}, out)
results = val.run(data=val_subset(out.parent / "format2_subset"), weights=str(out), imgsz=IMGSZ, batch_size=BATCH,
                  half=False, plots=False, workers=0, project=out.parent / "format2_val", exist_ok=True)[0]
raw = torch.load(out, weights_only=False)
raw["expected"]["val"] = {"images": VAL_IMAGES, "imgsz": IMGSZ, "batch_size": BATCH,
                          "results": tuple(float(r) for r in results[:4])}  # P, R, mAP50, mAP50-95
torch.save(raw, out)
print("saved", out, raw["expected"]["val"])
