"""Straight-through estimators: forward equals quantize-dequantize, backward equals the
documented pseudo-gradient (checked against autograd of the smooth function it differentiates)."""
import pytest
import torch

import lowprec


def test_forward_is_quantize_dequantize_in_input_dtype(device):
    x = torch.randn(8, 48, device=device, dtype=torch.bfloat16)
    for name in lowprec.FORMATS:
        y = lowprec.fake_quantize(x, name)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, lowprec.quantize(x, name).dequantize(torch.bfloat16))


@pytest.mark.parametrize("name", ["fp8_e4m3", "nvfp4", "int8", "ternary", "binary"])
def test_identity_ste_passes_gradient_unchanged(name, device):
    x = torch.randn(6, 32, device=device, requires_grad=True)
    up = torch.randn(6, 32, device=device)
    lowprec.fake_quantize(x, name, ste="identity").backward(up)
    assert torch.equal(x.grad, up)


def test_clipped_ste_zero_outside_range():
    x = torch.randn(16, 32) * 2
    x.requires_grad_(True)
    lowprec.fake_quantize(x, "ternary", ste="clipped").sum().backward()
    s = x.detach().abs().mean()
    assert torch.equal(x.grad, (x.detach().abs() / s <= 1).float())
    assert 0 < x.grad.sum() < x.numel()  # both cases occur
    # an unscaled fp8 cast saturates above 448: no gradient there
    y = torch.tensor([1.0, 447.0, 448.0, 500.0, -1e4], requires_grad=True)
    lowprec.fake_quantize(y, lowprec.format("fp8_e4m3", scale="none"), ste="clipped").sum().backward()
    assert y.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_approx_sign_is_derivative_of_piecewise_quadratic():
    u = torch.linspace(-1.5, 1.5, 301)
    x = u.clone().requires_grad_(True)  # scale s = mean|x| != 1, so normalize it back
    s = u.abs().mean()
    lowprec.fake_quantize(x, "binary", ste="approx_sign").sum().backward()
    v = (u / s).clone().requires_grad_(True)
    # Bi-Real Net's approximation of sign: 2v + v^2 on [-1, 0), 2v - v^2 on [0, 1), +-1 outside
    f = torch.where(v < -1, -1.0, torch.where(v < 0, 2 * v + v * v, torch.where(v < 1, 2 * v - v * v, 1.0)))
    f.sum().backward()
    torch.testing.assert_close(x.grad, v.grad, rtol=1e-6, atol=1e-6)  # fp32 rounding of u/s only


def test_swish_sign_is_derivative_of_swish_approximation():
    u = torch.linspace(-2, 2, 401)
    x = u.clone().requires_grad_(True)
    s = u.abs().mean()
    lowprec.fake_quantize(x, "binary", ste="swish_sign").sum().backward()
    v = (u / s).clone().requires_grad_(True)
    beta = 5.0
    sig = torch.sigmoid(beta * v)
    f = 2 * sig * (1 + beta * v * (1 - sig)) - 1  # BNN+'s SignSwish
    f.sum().backward()
    torch.testing.assert_close(x.grad, v.grad, rtol=1e-4, atol=1e-5)  # two fp32 formulas of one function


def test_ste_errors():
    with pytest.raises(ValueError, match="unknown ste 'magic'.*identity.*clipped"):
        lowprec.fake_quantize(torch.ones(3), "int8", ste="magic")
    with pytest.raises(ValueError, match="binary"):
        lowprec.fake_quantize(torch.ones(3), "ternary", ste="approx_sign")


def test_stochastic_fake_quantize_reproducible():
    x = torch.randn(64)
    a = lowprec.fake_quantize(x, "fp8_e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(1))
    b = lowprec.fake_quantize(x, "fp8_e4m3", rounding="stochastic", generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
