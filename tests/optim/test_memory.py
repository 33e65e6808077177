"""memory_report: exact bytes per parameter of weights + optimizer state, and the issue's targets."""

import pytest
import torch
from torch import nn

import lowprec
import optim

N, L = 512 * 512, 4  # four 512 x 512 layers: 1,048,576 weights


def stack(policy):
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512, bias=False) for _ in range(L)])
    lowprec.apply_policy(model, policy)
    return model


def one_step(model, cfg):
    opt = optim.build_optimizer(model, cfg)
    model(torch.randn(4, 512)).pow(2).mean().backward()
    opt.step()
    opt.zero_grad()
    return opt, optim.memory_report(model, opt)


def native(fmt):
    return {"default": {"weight": fmt, "storage": "native"}}


def test_binary_with_bop_bf16_momentum():
    _, report = one_step(stack(native("binary")), {"bop": {"momentum_dtype": "bf16"}})
    r = report.row("bop")
    assert (r.params, r.targets) == (L * N, L)
    assert r.weight_bytes == L * (N // 8 + 4)  # sign bits + one fp32 scale
    assert r.state_bytes == L * (2 * N + 8)  # bf16 momentum + the scale's two Adam moments
    assert r.resident_per_param == pytest.approx(2.125, abs=1e-4) and r.resident_per_param <= 2.2
    assert r.grad_bytes == L * 4 * N  # fp32 native gradients exist at step() unless updated in backward


def test_ternary_with_ternary_bop_bf16_momentum():
    _, report = one_step(stack(native("ternary")), {"ternary": {"momentum_dtype": "bf16"}})
    r = report.row("ternary")
    assert r.weight_bytes == L * (N // 4 + 4)
    assert r.state_bytes == L * (2 * N + 8)
    assert r.resident_per_param == pytest.approx(2.25, abs=1e-4) and r.resident_per_param <= 2.3


def test_fp8_with_sradamw_fp8_moments():
    _, report = one_step(stack(native("fp8_e4m3")), {"sr": {"moment_dtype": "fp8", "moment_block": 128}})
    r = report.row("sr")
    assert r.weight_bytes == L * (N + 4)
    assert r.state_bytes == L * 2 * (N + 4 * N // 128)  # two E4M3 moments + fp32 scale per 128
    assert r.resident_per_param == pytest.approx(3.0625, abs=1e-4) and r.resident_per_param <= 3.1


def test_bf16_mixed_precision_adamw_is_16_bytes_per_param():
    """fp32 master (4) + fp32 gradient (4) + two fp32 moments (8) = 16, plus torch's 0-d fp32
    ``step`` per tensor; the weights compute in bf16 (cast in every forward)."""
    _, report = one_step(stack({"default": {"weight": "bf16", "input": "bf16", "grad": "bf16"}}), {})
    r = report.row("latent")
    assert r.weight_bytes == L * 4 * N and r.grad_bytes == L * 4 * N
    assert r.state_bytes == L * (8 * N + 4)
    assert r.step_bytes == L * (16 * N + 4)
    assert round(r.step_per_param, 4) == 16.0 and round(r.resident_per_param, 4) == 12.0


def test_update_in_backward_drops_native_gradients_from_the_step():
    model = stack(native("binary"))
    opt, _ = one_step(model, {"in_backward": True})
    r = optim.memory_report(model, opt).row("bop")
    assert r.grad_bytes == 0 and r.step_per_param == r.resident_per_param


def test_report_table_and_unallocated_state():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 8, bias=False))
    lowprec.apply_policy(model, {"default": {}, "rules": [{"match": "2", "weight": "ternary", "storage": "native"}]})
    frozen = nn.Linear(3, 3)
    model.append(frozen)
    frozen.requires_grad_(False)
    opt = optim.build_optimizer(model, {})
    report = optim.memory_report(model, opt)
    assert "report after one step" in str(report)
    text = str(report)
    assert text.startswith("| group | optimizer |") and "| **total** |" in text
    stray = report.row("not optimized")
    assert stray.params == 12 and stray.weight_bytes == 48
    assert report.total.params == 8 * 8 + 8 + 16 + 64 + 12
