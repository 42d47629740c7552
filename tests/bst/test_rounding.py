"""Rounding as a property of the quantization: half to even (torch, ONNX) or half up (add 2^(k-1), shift right by k),
the same in the fake quantizers, the integer reference's shifts and the numpy runner's."""
import copy

import numpy as np
import pytest
import torch

from bst.torch.ao.quantization import (
    FakeQuantize,
    FusedMovingAvgObsFakeQuantize,
    LearnableFakeQuantize,
    MinMaxObserver,
    get_default_qat_qconfig,
    integer_runner,
)
from bst.torch.ao.quantization.fake_quant_ops import fake_quantize_per_channel, fake_quantize_per_tensor
from bst.torch.ao.quantization.integer_reference import shift_round

S = 0.25
TIES = torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5]) * S  # exactly halfway between two grid points
HALF_UP = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0]) * S  # floor(t + 1/2): ties towards +inf
HALF_EVEN = torch.tensor([-2.0, -2.0, -0.0, 0.0, 2.0, 2.0]) * S


def test_fake_quant_ops_round_ties_by_the_given_rule():
    scale, zp = torch.tensor([S]), torch.tensor([0], dtype=torch.int32)
    assert torch.equal(fake_quantize_per_tensor(TIES, scale, zp, -128, 127), HALF_EVEN)
    assert torch.equal(fake_quantize_per_tensor(TIES, scale, zp, -128, 127, "half_up"), HALF_UP)
    x = TIES.reshape(1, -1, 1).repeat(1, 1, 3)
    per_channel = fake_quantize_per_channel(x, torch.full((6,), S), torch.zeros(6, dtype=torch.int32), 1, -128, 127,
                                            "half_up")
    assert torch.equal(per_channel[0, :, 0], HALF_UP)
    # away from ties both rules agree with torch's kernel, and the backward pass is the straight-through mask
    g = torch.Generator().manual_seed(0)
    y = (torch.rand(1000, generator=g) - 0.5) * 400 * S
    y.requires_grad_(True)
    up = fake_quantize_per_tensor(y, scale, zp, -128, 127, "half_up")
    ref = torch.fake_quantize_per_tensor_affine(y.detach(), S, 0, -128, 127)
    assert torch.equal(up.detach(), ref)
    up.sum().backward()
    inside = (y.detach() / S >= -128.5) & (y.detach() / S < 127.5)
    assert torch.equal(y.grad, inside.float())
    # other dtypes (no vectorized core path for half even) still round half up
    assert torch.equal(fake_quantize_per_tensor(TIES.double(), scale, zp, -128, 127, "half_up"), HALF_UP.double())


def test_quantizers_carry_their_rounding():
    for cls in (FakeQuantize, LearnableFakeQuantize):
        fq = cls(observer=MinMaxObserver, pow2=True, quant_min=-128, quant_max=127, dtype=torch.qint8,
                 qscheme=torch.per_tensor_symmetric, rounding="half_up")
        fq(torch.tensor([-31.0, 31.0]))  # calibrates a scale of 2^-2 (31 / 127 <= 1/4)
        fq.disable_observer()
        assert float(fq.scale) == S and fq.rounding == "half_up" and "rounding=half_up" in repr(fq)
        assert torch.equal(fq(TIES), HALF_UP), cls.__name__
    qc = get_default_qat_qconfig(pow2=True, rounding="half_up")
    assert qc.activation().rounding == "half_up" and qc.weight().rounding == "half_up"
    with pytest.raises(ValueError, match="rounding='nearest'"):
        FakeQuantize(rounding="nearest")
    with pytest.raises(ValueError, match="fused"):
        get_default_qat_qconfig(fused=True, rounding="half_up")
    with pytest.raises(ValueError, match="half to even"):
        FusedMovingAvgObsFakeQuantize(rounding="half_up")
    # a quantizer pickled before rounding existed has no attribute of its own: it rounds half to even
    old = FakeQuantize()
    del old.rounding
    assert copy.deepcopy(old).rounding == "half_even"


@pytest.mark.parametrize("rounding", ["half_even", "half_up"])
def test_shifts_torch_and_numpy_agree_with_the_definition(rounding):
    g = torch.Generator().manual_seed(1)
    acc = torch.randint(-(1 << 20), 1 << 20, (4000,), generator=g)
    acc[:64] = torch.arange(-32, 32) * 8 + 4  # ties for a shift of 3
    for shift in (-2, 0, 1, 3, 7, 12):
        got = shift_round(acc, shift, rounding)
        if shift <= 0:
            want = acc << -shift
        elif rounding == "half_up":
            want = (acc + (1 << (shift - 1))) >> shift
        else:
            want = torch.round(acc.double() / 2 ** shift).long()  # exact in float64; round half to even
        assert torch.equal(got, want), (shift, rounding)
        assert np.array_equal(integer_runner.shift_round(acc.numpy(), shift, rounding), want.numpy())
