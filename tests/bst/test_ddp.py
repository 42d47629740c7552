"""DDP: quantizer buffers are broadcast from rank 0 and stay exact powers of two on every rank."""
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[2]


def _worker(rank, world, init_file, out_dir):
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    import bst.torch.ao.quantization as bq

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same initial model on both ranks
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).train()
        model = bq.fuse_modules_qat(model, [["0", "1", "2"]])
        model.qconfig = bq.get_default_qat_qconfig(pow2=True)
        model = bq.prepare_qat(model)
        ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=True)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.01)
        torch.manual_seed(100 + rank)  # different data: local observers disagree
        for _ in range(3):
            loss = ddp(torch.randn(2, 3, 6, 6) * (1 + 3 * rank)).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.apply(bq.disable_observer)
        ddp(torch.randn(2, 3, 6, 6))  # buffers are broadcast at the start of the forward
        keys = sorted(bq.quantizer_state_keys(model))
        state = {k: model.state_dict()[k].clone() for k in keys}
        gathered = [None] * world
        dist.all_gather_object(gathered, state)
        if rank == 0:
            same = all(torch.equal(gathered[0][k], g[k]) for g in gathered for k in keys)
            scales = [v for k, v in gathered[0].items() if k.endswith(".scale")]
            pow2 = all(bool(bq.is_pow2(s).all()) for s in scales)
            Path(out_dir, "result").write_text(f"{same} {pow2} {len(scales)}")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ddp_broadcast_keeps_quantizer_state_identical_and_pow2(tmp_path):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    # fork: the children reuse the imported torch instead of paying for a fresh interpreter each
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True,
                       start_method=method)
    same, pow2, count = (tmp_path / "result").read_text().split()
    assert same == "True" and pow2 == "True" and int(count) == 4
