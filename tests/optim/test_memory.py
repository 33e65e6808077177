"""memory_report: exact bytes per parameter of weights + optimizer state, and the targets of the
latent-free recipes (native ternary/binary at most a stated share of bf16 AdamW's bytes)."""

import gc
import types
import weakref

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
    # bf16 momentum + the scale's two Adam moments + step + the noise's key and count of draws (int64)
    assert r.state_bytes == L * (2 * N + 8 + 4 + 16)
    # 2.125 per weight + 32 bytes per layer (its scale, the scale's moments, step, noise key and count)
    assert r.resident_per_param == pytest.approx(2.125 + 32 / N, rel=1e-12)  # float division only
    assert r.grad_bytes == L * 4 * N  # fp32 native gradients exist at step() unless updated in backward


def test_ternary_with_ternary_bop_bf16_momentum():
    _, report = one_step(stack(native("ternary")), {"ternary": {"momentum_dtype": "bf16"}})
    r = report.row("ternary")
    assert r.weight_bytes == L * (N // 4 + 4)
    assert r.state_bytes == L * (2 * N + 8 + 4 + 16)
    assert r.resident_per_param == pytest.approx(2.25 + 32 / N, rel=1e-12)  # float division only


def test_fp8_with_sradamw_fp8_moments():
    _, report = one_step(stack(native("fp8_e4m3")), {"sr": {"moment_dtype": "fp8", "moment_block": 128}})
    r = report.row("sr")
    assert r.weight_bytes == L * (N + 4)
    assert r.state_bytes == L * (2 * (N + 4 * N // 128) + 4)  # two E4M3 moments + fp32 scale per 128 + step
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


# ---- the report against what is really held ---------------------------------------------------
WALK_POLICIES = {
    "native ternary": native("ternary"),
    "native binary": native("binary"),
    "native fp8": native("fp8_e4m3"),
    "native nvfp4": native("nvfp4"),
    "native mxfp4": native("mxfp4"),
    "latent fp8, delayed scaling": {"default": {"weight": "fp8_e4m3", "input": "fp8_e4m3", "grad": "fp8_e5m2",
                                                "scaling": "delayed"}},
    "latent ternary": {"default": {"weight": "ternary"}},
    "latent nvfp4": {"default": {"weight": "nvfp4", "input": "nvfp4", "grad": "nvfp4"}},
}
_LEAVES = (type, types.ModuleType, types.FunctionType, types.BuiltinFunctionType, weakref.ref, str, bytes, int, float)


def reachable_tensors(*roots) -> list:
    """Every tensor reachable from ``roots`` through Python references (the garbage collector's view
    of every object, not the report's notion of parameters and state)."""
    seen, out, stack = set(), [], list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or isinstance(obj, _LEAVES):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            out.append(obj)
            continue
        stack.extend(gc.get_referents(obj))
    return out


def reachable_storages(*roots) -> dict:
    """Bytes of each distinct storage of :func:`reachable_tensors`."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in reachable_tensors(*roots)}


@pytest.mark.parametrize("name", list(WALK_POLICIES))
def test_report_counts_every_tensor_the_model_and_optimizer_hold(name):
    """After a step (gradients released), the report's resident bytes equal the bytes of every
    tensor storage reachable from the model and the optimizer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.LayerNorm(64), nn.Linear(64, 64, bias=False))
    lowprec.apply_policy(model, WALK_POLICIES[name])
    opt = optim.build_optimizer(model, {})
    for _ in range(2):
        model(torch.randn(8, 64)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    report = optim.memory_report(model, opt)
    walked = reachable_storages(model, opt)
    assert report.total.resident_bytes == sum(walked.values()), (str(report), walked)


@pytest.mark.parametrize("fmt", ["ternary", "binary", "fp8_e4m3", "nvfp4", "mxfp4", "mxfp8", "fp4_e2m1", "int8"])
def test_no_float_copy_of_a_native_weight_survives_the_step(fmt):
    """Dequantized or FP8 operands of a native weight live from a forward to the end of its backward:
    after ``step()`` no float tensor of the weight's size is alive anywhere in the process, other
    than its gradient (freed by ``zero_grad``) and the optimizer's own state. (The gradient carrier
    has the weight's shape but 4 bytes of storage.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 80, bias=False))
    lowprec.apply_policy(model, native(fmt))
    opt = optim.build_optimizer(model, {})
    model(torch.randn(4, 96)).sum().backward()
    opt.step()
    layer = model[0]
    state = set(reachable_storages(opt))
    gc.collect()
    copies = [t for t in gc.get_objects() if isinstance(t, torch.Tensor) and t.is_floating_point()
              and t.numel() == 96 * 80 and t.untyped_storage().nbytes() >= 96 * 80 * t.element_size()
              and t.untyped_storage().data_ptr() not in state and t is not layer.native_grad and t is not layer.w_data]
    assert copies == [], [(t.dtype, tuple(t.shape)) for t in copies]
    opt.zero_grad()
    assert layer.native_grad is None
