import logging
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# reference files that are not part of the repository (real checkpoints, coco128, a release file): ../shared beside
# the clone, or where YOLOV5_SHARED points (YOLOV5_SHARED=/nonexistent runs the suite as a plain clone does). Tests
# that need them skip when they are absent, saying which file is missing.
SHARED = Path(os.environ.get("YOLOV5_SHARED") or ROOT.parent / "shared")
REFERENCE = SHARED / "reference"
torch.set_num_threads(1)  # 2 shared cores: OpenMP threads fighting other processes cost more than they give


@pytest.fixture
def yolo_log():
    """Capture the 'yolov5' logger (it does not propagate) as a list of messages."""
    from utils.general import LOGGER

    records = []

    class _H(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    h = _H(level=logging.DEBUG)
    LOGGER.addHandler(h)
    old = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    yield records
    LOGGER.removeHandler(h)
    LOGGER.setLevel(old)


@pytest.fixture(scope="module")
def tq():
    """torch.ao.quantization, the reference bst's quantization modules are compared with (skips without it)."""
    ao = pytest.importorskip("torch.ao.quantization")
    warnings.filterwarnings("ignore", module="torch.ao")
    return ao


def reference(name):
    path = REFERENCE / name
    if not path.is_file():
        pytest.skip(f"reference file {path} not present")
    return path


def start_and_kill_when(cmd, log, ready, env, timeout=240):
    """Run cmd with output to `log`; SIGKILL it as soon as ready(log_text) is true (it must still be running)."""
    import signal
    import subprocess
    import time

    with open(log, "w") as f:
        p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and p.poll() is None:
            if ready(Path(log).read_text()):
                break
            time.sleep(0.05)
        assert p.poll() is None, "training ended before it could be killed:\n" + Path(log).read_text()[-3000:]
        p.send_signal(signal.SIGKILL)
        assert p.wait(30) == -signal.SIGKILL
    finally:
        if p.poll() is None:
            p.kill()


def shapes_subset(folder, n_train, n_val, name="tiny"):
    """A dataset yaml over the first n_train / n_val images of shapes (generated on first use) in `folder`."""
    import os

    from utils.dataset_yaml import check_dataset
    from utils.general import yaml_save

    full = check_dataset("data/shapes.yaml")
    train = sorted(p for p in os.listdir(full["train"]) if p.endswith(".jpg"))[:n_train]
    val = sorted(p for p in os.listdir(full["val"]) if p.endswith(".jpg"))[:n_val]
    (folder / f"{name}_train.txt").write_text("".join(f"{full['train']}/{p}\n" for p in train))
    (folder / f"{name}_val.txt").write_text("".join(f"{full['val']}/{p}\n" for p in val))
    yaml_save(folder / f"{name}.yaml", {"path": str(folder), "train": f"{name}_train.txt", "val": f"{name}_val.txt",
                                        "names": list(full["names"].values())})
    return folder / f"{name}.yaml"
