"""The same workflow on CUDA (skipped without a GPU): core fake-quant kernels, sync-free observers,
power-of-two state through .half(), conversion and the integer reference from CUDA tensors."""
import pytest
import torch
import torch.nn as nn

import bst.torch.ao.quantization as bq
from bst.torch.ao.nn.quantized import FloatFunctional

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = bq.QuantStub()
        self.c1 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.c2 = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.add, self.cat = FloatFunctional(), FloatFunctional()
        self.dequant = bq.DeQuantStub()

    def forward(self, x):
        a = self.c1(self.quant(x))
        return self.dequant(self.cat.cat([a, self.add.add(a, self.c2(a))], 1))


def _prepared(pow2=True):
    torch.manual_seed(0)
    model = bq.fuse_modules_qat(Small().train(), [["c1.0", "c1.1", "c1.2"], ["c2.0", "c2.1"]])
    model.qconfig = bq.get_default_qat_qconfig(pow2=pow2)
    return bq.prepare_qat(model).cuda()


def test_cuda_training_keeps_pow2_and_matches_cpu():
    model = _prepared()
    cpu_model = _prepared().cpu()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    for i in range(3):
        x = torch.randn(4, 3, 8, 8) * (i + 1)
        y = model(x.cuda())
        assert torch.allclose(y.cpu(), cpu_model(x), atol=1e-4)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        cpu_model.load_state_dict(model.state_dict())
        for m in model.modules():
            if isinstance(m, bq.FakeQuantize):
                assert m.scale.is_cuda and bool(bq.is_pow2(m.scale).all())


def test_cuda_half_and_flags():
    model = _prepared().half()
    for key in bq.quantizer_state_keys(model):
        value = model.state_dict()[key]
        assert value.is_cuda and (not value.is_floating_point() or value.dtype == torch.float32), key
    model.apply(bq.disable_observer)
    y = model(torch.randn(2, 3, 8, 8, device="cuda", dtype=torch.half))
    assert y.dtype == torch.half and torch.isfinite(y).all()


def test_cuda_fused_fake_quantize_and_core_ops():
    fq = bq.FusedMovingAvgObsFakeQuantize().cuda()
    x = torch.randn(1000, device="cuda")
    y = fq(x)
    ref = torch.fake_quantize_per_tensor_affine(x, fq.scale, fq.zero_point, 0, 255)
    assert torch.equal(y, ref)


def test_cuda_convert_and_integer_reference():
    model = _prepared()
    model(torch.randn(4, 3, 8, 8, device="cuda"))
    model.apply(bq.disable_observer)
    x = torch.randn(2, 3, 8, 8, device="cuda")
    qmodel = bq.convert(model.eval(), example_inputs=(x,))
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # plain fp32 accumulation
    try:
        y = qmodel(x)
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    with bq.integer_mode(qmodel):
        y_int = qmodel(x)
    assert y_int.is_cuda
    # cuDNN may pick non-direct algorithms, so bit-exactness is only promised on the CPU: within a step
    assert float((y - y_int).abs().max()) <= float(qmodel.cat.output_scale)
    assert float((y != y_int).float().mean()) < 0.01
