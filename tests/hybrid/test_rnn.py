"""The LSTM recurrence (`LSTMRecurrence`: hand-written backward, the weight gradient of all steps
in one GEMM), with a plain `hh` and with a policy's `QLinear` `hh`, against the same layer with
`hh` called per step and differentiated by autograd."""
import dataclasses
import gc
import os
import shutil
import warnings
import weakref
import unittest.mock
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import lowprec
from hybrid.rnn import LSTMLayer, LSTMRecurrence
from lowprec import KERNELS, LayerPrecision, PrecisionPolicy, Telemetry, apply_policy
from lowprec.gemm import LayerIO
from lowprec.nn import QLinear


class PerStep(nn.Linear):
    """An `hh` that is neither a plain nn.Linear nor offers `recurrent_gemms`: the layer calls it once per step."""


def layer_pair(d, dtype):
    torch.manual_seed(0)
    fused = LSTMLayer(d).to(dtype)
    per_step = LSTMLayer(d).to(dtype)
    per_step.load_state_dict(fused.state_dict())
    per_step.hh = PerStep(d, 4 * d, bias=False, dtype=dtype)
    per_step.hh.weight = nn.Parameter(fused.hh.weight.detach().clone())
    return fused, per_step


def run(layer, x, h0, c0, valid, seed=1):
    y, h, c = layer(x, h0, c0, valid)
    g = torch.Generator().manual_seed(seed)
    loss = (y * torch.randn(y.shape, generator=g, dtype=y.dtype)).sum() + (h * h).sum() + c.sin().sum()
    grads = torch.autograd.grad(loss, [x, h0, c0, *layer.parameters()])
    return (y, h, c), grads


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=["fp64", "bf16"])
def test_recurrence_equals_per_step_autograd(dtype, held):
    """The forward is the same ops and the backward autograd's kernels in autograd's order, so
    outputs and the gradients of x, h_0, c_0, ih and norm are bit-identical. fp64: hh's weight
    gradient agrees to 1e-12 because it sums its T·B products in one GEMM instead of T GEMMs
    added up. bf16 (a bf16 model: bf16 activations, fp32 state): each step's GEMM takes h in bf16
    and returns dh in bf16, which the recurrence carries into the next step's cell as it is (the
    cell widens it, exactly) where autograd casts it first, with the same bits; hh's gradient is
    one GEMM against T summed in bf16 (each sum rounded to 8 bits: rtol 2^-5 over T = 9).
    `held`: steps 6.. hold the state (the chunk-level recurrence's placeholder steps)."""
    d, T, B = 16, 9, 3
    sd = torch.promote_types(dtype, torch.float32)
    fused, per_step = layer_pair(d, dtype)
    assert fused.hh.__class__ is nn.Linear and per_step.hh.__class__ is PerStep
    x = torch.randn(B, T, d, dtype=dtype, requires_grad=True)
    h0 = torch.randn(B, d, dtype=sd, requires_grad=True)
    c0 = torch.randn(B, d, dtype=sd, requires_grad=True)
    valid = torch.arange(T) < 6 if held else None
    (out_f, grads_f), (out_p, grads_p) = run(fused, x, h0, c0, valid), run(per_step, x, h0, c0, valid)
    for a, b in zip(out_f, out_p, strict=True):
        assert torch.equal(a, b)
    names = ["x", "h0", "c0", *(n for n, _ in fused.named_parameters())]
    for name, a, b in zip(names, grads_f, grads_p, strict=True):
        if name != "hh.weight":
            assert torch.equal(a, b), name
        elif dtype == torch.float64:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
        else:
            torch.testing.assert_close(a.float(), b.float(), rtol=2.0**-5, atol=2.0**-5 * b.float().abs().max().item())
    if held:
        assert torch.equal(out_f[1].to(dtype), out_f[0][:, 5])  # y is h in the activation dtype
        assert torch.equal(out_f[0][:, 5:], out_f[0][:, 5:6].expand(-1, 4, -1))


def test_weight_gradient_is_one_gemm():
    """Backward runs T dgrad GEMMs (one per step, sequential) and ONE weight-gradient GEMM, where
    per-step autograd runs T of each."""
    d, T, B = 8, 12, 2
    fused, per_step = layer_pair(d, torch.float32)
    x = torch.randn(B, T, d, requires_grad=True)
    h0, c0 = torch.zeros(B, d, requires_grad=True), torch.zeros(B, d, requires_grad=True)
    counts = []
    for layer in (fused, per_step):
        y, _, _ = layer(x, h0, c0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            y.sum().backward()
        counts.append(sum(e.count for e in prof.key_averages() if e.key == "aten::mm"))
    # + 2: the input projection's dgrad and wgrad (one GEMM each over all steps)
    assert counts == [T + 1 + 2, T + T + 2]


def test_which_hh_runs_the_recurrence(monkeypatch):
    """A plain nn.Linear and a policy's QLinear run `LSTMRecurrence`; the per-step calls stay for
    an `hh` that offers no `recurrent_gemms` (here an nn.Linear subclass), one with module hooks
    (tensor parallelism's, which the recurrence would not run) or a bias, and under autocast."""
    torch.manual_seed(0)
    layer = LSTMLayer(8)
    x, h = torch.randn(2, 3, 8), torch.zeros(2, 8)
    calls = []
    apply = LSTMRecurrence.apply
    monkeypatch.setattr(LSTMRecurrence, "apply", lambda *a: calls.append(1) or apply(*a))

    def runs_recurrence(hh):
        layer.hh, n = hh, len(calls)
        layer(x, h, h)
        return len(calls) > n

    plain = nn.Linear(8, 32, bias=False)
    assert runs_recurrence(plain)
    with torch.autocast("cpu", torch.bfloat16):
        assert not runs_recurrence(plain)
    assert not runs_recurrence(PerStep(8, 32, bias=False))
    assert runs_recurrence(QLinear.from_float(plain, LayerPrecision(weight=lowprec.format("fp8_e4m3"))))
    q = QLinear.from_float(nn.Linear(8, 32), LayerPrecision())
    assert not runs_recurrence(q)
    q.bias = None
    assert runs_recurrence(q)
    handle = q.register_forward_hook(lambda mod, args, y: y)
    assert not runs_recurrence(q)
    handle.remove()
    handle = q.register_full_backward_hook(lambda mod, dx, dy: None)
    assert not runs_recurrence(q)
    handle.remove()
    q.register_forward_pre_hook(lambda mod, args: None)
    assert not runs_recurrence(q)
    with pytest.raises(ValueError, match="bias"):
        QLinear.from_float(nn.Linear(8, 32), LayerPrecision()).recurrent_gemms()
    for hh in (plain, QLinear.from_float(plain, LayerPrecision(weight=lowprec.format("fp8_e4m3")))):
        layer.hh, h1 = hh, torch.randn(2, 8)
        y, h_out, c_out = layer(x[:, :0], h1, h)  # no steps: an empty output, the state unchanged
        assert y.shape == (2, 0, 8) and h_out is h1 and c_out is h


# ---- a policy's hh (lowprec.nn.QLinear): the same recurrence through QLinear.recurrent_gemms ----

PRECISION = Path(__file__).resolve().parents[2] / "configs" / "precision"
POLICIES = ["bf16", "fp8", "paper", "ternary", "ternary_native", "binary", "binary_native"]


class Calls(nn.Module):
    """Wraps a policy's `hh` so that the layer calls it once per step (it offers no
    `recurrent_gemms`), recording each step's input and output gradient in step order."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.xs, self.dys = [], {}

    def forward(self, x):
        t = len(self.xs)
        self.xs.append(x.detach())
        y = self.inner(x)
        y.register_hook(lambda g: self.dys.__setitem__(t, g))
        return y


class Holder(nn.Module):
    """`rnn.lstm.0`: an LSTM layer under the module name the policies match."""

    def __init__(self, d, dtype):
        super().__init__()
        self.rnn = nn.Module()
        self.rnn.lstm = nn.ModuleList([LSTMLayer(d).to(dtype)])


def policy_pair(policy, d, dtype):
    """(layer through the recurrence, the same layer with `hh` called per step): same weights."""
    cfg = OmegaConf.load(PRECISION / f"{policy}.yaml") if isinstance(policy, str) else policy
    layers = []
    for _ in range(2):
        torch.manual_seed(0)
        holder = Holder(d, dtype)
        with warnings.catch_warnings():  # the rules for blocks, embeddings and head match nothing here
            warnings.simplefilter("ignore")
            apply_policy(holder, PrecisionPolicy.from_config(cfg))
        layers.append(holder.rnn.lstm[0])
    fused, per_step = layers
    assert isinstance(fused.hh, QLinear) and fused.hh.bias is None
    per_step.hh = Calls(per_step.hh)
    return fused, per_step


def backward_both(fused, per_step, B, T, d, dtype, valid, seed=5):
    """Forward and backward of both layers on the same inputs -> per layer (outputs, input grads)."""
    g = torch.Generator().manual_seed(seed)
    x, h0, c0 = (torch.randn(*s, generator=g) for s in ((B, T, d), (B, d), (B, d)))
    w = torch.randn(B, T, d, generator=g)
    out = []
    for layer in (fused, per_step):
        xs = tuple(t.to(dt, copy=True).requires_grad_() for t, dt in ((x, dtype), (h0, h0.dtype), (c0, c0.dtype)))
        y, h, c = layer(*xs, valid)
        ((y.float() * w).sum() + (h * h).sum() + c.sin().sum()).backward()
        out.append(((y, h, c), tuple(t.grad for t in xs)))
    return out


def hh_grad(hh):
    return hh.native_grad if hh.is_native else hh.weight.grad


def stacked_wgrad_bound(plan, xs, dys, w_dtype):
    """|per-step dW - stacked dW| <= this, elementwise. With A1_t = Q(dy_t), B1_t = Q(x_t) each
    step's wgrad operands (scales of its own) and A2, B2 those of the stacked steps (the row
    blocks of Q([dy_1; ...]) and Q([x_1; ...])):

        |Σ_t A1_tᵀ B1_t - A2ᵀ B2| <= |A1 - A2|ᵀ |B1| + |A2|ᵀ |B1 - B2|        (exact arithmetic)

    plus the roundings: per step an fp32 GEMM rounded to the weight's dtype and T such gradients
    added in that dtype; stacked one fp32 GEMM of T·B products rounded once. First order in
    u = 2^-24 (fp32) and u_w (the weight gradient's dtype): (T·B·u + (T + 1)·u_w)·(|A1|ᵀ|B1| + |A2|ᵀ|B2|).
    Also returns (A1 == A2 and B1 == B2), i.e. whether the operands are the same."""
    def q(t, fmt):
        return KERNELS["emulated"].operand(t, fmt)[0]

    A1 = torch.cat([q(dy, plan.wgrad.a) for dy in dys])
    B1 = torch.cat([q(x, plan.wgrad.b) for x in xs])
    A2, B2 = q(torch.cat(dys), plan.wgrad.a), q(torch.cat(xs), plan.wgrad.b)
    T, B = len(xs), xs[0].shape[0]
    u_w = torch.finfo(w_dtype).eps / 2
    bound = (A1 - A2).abs().t() @ B1.abs() + A2.abs().t() @ (B1 - B2).abs()
    bound += (T * B * 2.0**-24 + (T + 1) * u_w) * (A1.abs().t() @ B1.abs() + A2.abs().t() @ B2.abs())
    return bound, torch.equal(A1, A2) and torch.equal(B1, B2)


@pytest.mark.parametrize("held", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("policy", POLICIES)
def test_policy_hh_recurrence_equals_per_step_calls(policy, dtype, held):
    """A policy's `hh` in `LSTMRecurrence` against the same layer called per step.

    Exact: outputs, h_T, c_T, the gradients of x, h_0, c_0 and of every parameter but hh's (fprop
    and dgrad are QLinear's own, call for call, and the gate derivatives are autograd's kernels in
    autograd's order); and hh's gradient IS the policy's wgrad applied to the T steps stacked, with
    the per-step path's own operands (dy_t, h_{t-1}). Bounded (`stacked_wgrad_bound`): hh's
    gradient against the sum of the T per-step ones. The operands are the same unless the wgrad
    format has a per-tensor scale (fp8 here: one scale over all steps instead of one per step);
    without one the bound is the summation's (T GEMMs added in the weight's dtype vs one). The
    latent binary weight's clipped STE multiplies by 0 or 1, which keeps the bound."""
    d, T, B = 32, 7, 3
    fused, per_step = policy_pair(policy, d, dtype)
    valid = torch.arange(T) < 5 if held else None
    (out_f, grads_f), (out_p, grads_p) = backward_both(fused, per_step, B, T, d, dtype, valid)
    for a, b in zip(out_f + grads_f, out_p + grads_p, strict=True):
        assert torch.equal(a, b)
    params_p = dict(per_step.named_parameters())
    for name, p in fused.named_parameters():
        if not name.startswith("hh."):
            assert torch.equal(p.grad, params_p[name].grad), name
    if isinstance(fused.ih, QLinear) and fused.ih.is_native:
        assert torch.equal(fused.ih.native_grad, per_step.ih.native_grad)

    hh, calls = fused.hh, per_step.hh
    xs, dys = calls.xs, [calls.dys[t] for t in range(T)]
    assert len(xs) == len(dys) == T
    gemms, weights = hh.recurrent_gemms()
    dw = hh_grad(hh)
    expect = [g for g in gemms.wgrad(torch.cat(dys), torch.cat(xs), weights) if g is not None]
    assert torch.equal(dw, expect[0])

    bound, same_operands = stacked_wgrad_bound(hh.plan, xs, dys, dw.dtype)
    per_tensor = any(f is not None and f.is_scaled and f.granularity == "tensor" for f in (hh.plan.wgrad.a, hh.plan.wgrad.b))
    assert same_operands != per_tensor
    err = (dw.double() - hh_grad(calls.inner).double()).abs()
    assert (err <= bound).all(), f"max excess {(err - bound).max():.3g}"


def test_delayed_scaling_steps_as_per_step_calls():
    """Delayed scaling: each step's fprop pushes its input's and weight's amax, each step's dgrad
    its gradient's, as the per-step calls do, so two training steps in a row (the second one
    scaling from a filled history) give bit-identical outputs and input gradients, and identical
    amax histories."""
    fp8 = {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
           "grad": {"format": "fp8_e5m2", "granularity": "tensor"}, "scaling": "delayed", "amax_history": 4}
    d, T, B = 16, 6, 2
    fused, per_step = policy_pair({"default": fp8}, d, torch.float32)
    histories = sorted(n for n, _ in fused.hh.named_buffers() if n.startswith("amax_history"))
    assert histories == ["amax_history_grad", "amax_history_input", "amax_history_weight"]
    for seed in (5, 6):
        (out_f, grads_f), (out_p, grads_p) = backward_both(fused, per_step, B, T, d, torch.float32,
                                                           torch.arange(T) < 4, seed=seed)
        for a, b in zip(out_f + grads_f, out_p + grads_p, strict=True):
            assert torch.equal(a, b)
        for n in histories:
            assert torch.equal(getattr(fused.hh, n), getattr(per_step.hh.inner, n)), n


def test_policy_hh_telemetry_and_gradient_hooks():
    """What observes hh sees what it sees for the per-step calls: Telemetry the same statistics
    (per step: input, weight, grad), a hook on a latent weight and a native layer's
    `native_grad_hook` one call each, with the whole gradient."""
    d, T, B = 16, 5, 2
    for policy in ("fp8", "ternary_native"):
        fused, per_step = policy_pair(policy, d, torch.float32)
        tels, seen = [], []
        for layer, hh in ((fused, fused.hh), (per_step, per_step.hh.inner)):
            tels.append(Telemetry(layer).enable())
            got = []
            if hh.is_native:
                hh.native_grad_hook = lambda lay, g, got=got: got.append(g)
            else:
                hh.weight.register_hook(lambda g, got=got: got.append(g))
            seen.append(got)
        backward_both(fused, per_step, B, T, d, torch.float32, None)
        stats_f, stats_p = tels[0].stats(), {(n.replace("hh.inner", "hh"), o): s for (n, o), s in tels[1].stats().items()}
        assert {n for n, _ in stats_f} == {"hh", "ih"} and stats_f == stats_p
        assert [len(g) for g in seen] == [1, 1]
        bound, _ = stacked_wgrad_bound(fused.hh.plan, per_step.hh.xs, [per_step.hh.dys[t] for t in range(T)], torch.float32)
        assert ((seen[0][0] - seen[1][0]).abs() <= bound).all()


def test_dgrad_weight_operand_derived_once_per_backward(monkeypatch):
    """Where dgrad cannot reuse fprop's weight operand (here: dgrad's weight in bf16, fprop's in
    FP8), the per-step calls quantize the weight for dgrad at every step; the recurrence once per
    backward, with the same numbers."""
    p = {"weight": "fp8_e4m3", "input": "fp8_e4m3", "grad": "fp8_e5m2", "dgrad": {"weight": "bf16"}}
    d, T, B = 16, 6, 2
    fused, per_step = policy_pair({"default": p}, d, torch.float32)
    assert not fused.hh.plan.reuse_weight
    emulated, weights, counts = KERNELS["emulated"], (fused.hh.weight, per_step.hh.inner.weight), [0, 0]
    operand = emulated.operand

    def counting(t, fmt, **kw):
        for n, w in enumerate(weights):
            counts[n] += t is w and kw.get("transposed", False)
        return operand(t, fmt, **kw)

    monkeypatch.setattr(emulated, "operand", counting)
    (out_f, grads_f), (out_p, grads_p) = backward_both(fused, per_step, B, T, d, torch.float32, None)
    for a, b in zip(out_f + grads_f, out_p + grads_p, strict=True):
        assert torch.equal(a, b)
    assert counts == [1, T]


class KeepsNothing:
    """An operand cache that keeps nothing: every lookup derives the operand again, as every lookup
    inside a CUDA graph's capture does."""

    @staticmethod
    def get(key, tag, make):
        return make()


@pytest.mark.parametrize("dgrad_weight", [None, "bf16"], ids=["reuses-fprop", "own-operand"])
def test_weight_operands_derived_once_per_loop_where_no_cache_keeps_them(monkeypatch, dgrad_weight):
    """With an operand cache that keeps nothing, the recurrence still quantizes its weight once per
    forward loop and once per backward (fprop's operand transposed once, or dgrad's own derived
    once) instead of at every step; every output and gradient is bit-identical to the loops run
    with the layer's own cache."""
    from hybrid.rnn import _recurrence_backward, _recurrence_forward
    from lowprec.gemm import RecurrentGemms

    p = {"weight": "fp8_e4m3", "input": "fp8_e4m3", "grad": "fp8_e5m2"}
    if dgrad_weight:
        p["dgrad"] = {"weight": dgrad_weight}
    d, T, B = 16, 6, 2
    torch.manual_seed(0)
    layer = QLinear(d, 4 * d, bias=False, precision=LayerPrecision.from_fields(p))
    assert layer.plan.reuse_weight == (dgrad_weight is None)
    w = layer.weight.detach()
    emulated = KERNELS["emulated"]
    operand, transposed = emulated.operand, emulated.transposed
    counts = [0, 0, 0]  # fprop's weight operand derived, dgrad's own derived, fprop's transposed

    def counting(t, fmt, **kw):
        counts[1 if kw.get("transposed", False) else 0] += t is w
        return operand(t, fmt, **kw)

    def counting_transposed(op):
        counts[2] += 1
        return transposed(op)

    monkeypatch.setattr(emulated, "operand", counting)
    monkeypatch.setattr(emulated, "transposed", counting_transposed)
    gx, h, c = (torch.randn(*shape) for shape in ((B, T, 4 * d), (B, d), (B, d)))
    dy, dh, dc = (torch.randn(*shape) for shape in ((B, T, d), (B, d), (B, d)))
    results = []
    for cache in (KeepsNothing(), layer._io.cache):
        counts[:] = [0, 0, 0]
        gemms = RecurrentGemms(layer.plan, LayerIO(cache))
        fwd = _recurrence_forward(gx, h, c, None, torch.float32, gemms, (w, None, None, None))
        hs_prev, cs_prev, acts, tanh_cs, saved = fwd[3:]
        da, dh0, dc0, dws = _recurrence_backward(dy, dh, dc, None, hs_prev, cs_prev, acts, tanh_cs, gemms,
                                                 (w, None, None, None), saved, need_state=True, need_w=True)
        results.append([*fwd[:7], da, dh0, dc0, dws[0]])
        assert counts == ([1, 0, 1] if dgrad_weight is None else [1, 1, 0])
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        assert torch.equal(a, b), i


# (precision fields, described device, the kernel fprop and dgrad run on, the activation dtype, which of
# wgrad's operands the loops keep from the steps: `RecurrentGemms.steps_operands`): unscaled casts on the
# bf16 tensor cores (each element rounded alone: wgrad takes the steps' gradient operands, and with bf16
# activations their input operands too); int8 inputs with a scale per token (a row reduction); FP8 with
# per-tensor scales (a whole-tensor amax: the stacked steps take one scale of their own) on the FP8
# tensor cores (torch._scaled_mm runs on the CPU too)
CELL_OPERANDS = {
    "bf16": ({"weight": "bf16", "input": "bf16", "grad": "bf16"}, "sm80", "bf16_tensorcore", torch.float32,
             (True, False)),
    "fp16": ({"weight": "fp16", "input": "fp16", "grad": "fp16"}, "sm80", "bf16_tensorcore", torch.float32,
             (True, False)),
    "fp16-bf16-activations": ({"weight": "fp16", "input": "fp16", "grad": "fp16"}, "sm80", "bf16_tensorcore",
                              torch.bfloat16, (True, True)),
    "int8-per-token": ({"weight": "int8", "input": "int8", "grad": "bf16"}, "sm80", "bf16_tensorcore",
                       torch.float32, (True, False)),
    "fp8-per-tensor": ({"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
                        "grad": {"format": "fp8_e5m2", "granularity": "tensor"}}, "sm90", "fp8_tensorwise",
                       torch.float32, (False, False)),
}


@pytest.mark.parametrize("fused", [False, True], ids=["eager-cells", "compiled-cells"])
@pytest.mark.parametrize("fmt", list(CELL_OPERANDS))
def test_the_cells_compute_the_next_gemm_operand(fmt, fused, device):
    """The recurrent GEMMs offer their input and gradient operands as functions of the step's
    output (on the CPU: plans described for a GPU, run on CPU tensors), and each step's cell
    computes the next GEMM's operand (compiled: inside the cell's graph, the amax reduction of a
    scaled format included); where each element is rounded alone, wgrad takes the steps' operands
    stacked. Forward outputs, saved tensors and every gradient are bit-identical to the loop in
    which the GEMMs quantize their operands themselves (a kept input operand: the operand of the
    input that loop keeps), with the cells as eager functions and compiled (inductor's C++ kernels
    on the CPU, Triton's on CUDA; with Triton a scaled format's to a few fp32 ulps, see below)."""
    from hybrid.rnn import _recurrence_backward, _recurrence_forward
    from lowprec.gemm import RecurrentGemms

    cpu = device.type == "cpu"
    if fused and cpu and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        pytest.skip("compiling the cells on the CPU needs a C++ compiler")

    class CastsItself(RecurrentGemms):
        input_cast = grad_cast = None

    fields, described, kernel, ad, kept = CELL_OPERANDS[fmt]
    if not cpu and kernel.startswith("fp8") and torch.cuda.get_device_capability(device) < (8, 9):
        pytest.skip("FP8 tensor cores need compute capability 8.9")
    torch.manual_seed(0)
    d = 16
    layer = QLinear(d, 4 * d, bias=False, precision=LayerPrecision.from_fields(fields), device=device)
    plan = layer.plan_for(described if cpu else device)
    assert plan.fprop.kernel == plan.dgrad.kernel == kernel
    offers, plain = RecurrentGemms(plan, layer._io), CastsItself(plan, layer._io)
    assert offers.input_cast is not None and offers.grad_cast is not None and plain.input_cast is None
    assert offers.steps_operands(ad) == kept and plain.steps_operands(ad) == (False, False)
    with unittest.mock.patch.object(lowprec.gemm, "RECURRENT_WGRAD_TAKES_STEPS", False):
        assert offers.steps_operands(ad) == (False, False)
    weights = (layer.weight.detach(), None, None, None)
    gx, h, c = (torch.randn(*shape, device=device) for shape in ((3, 5, 4 * d), (3, d), (3, d)))
    valid = torch.arange(5, device=device) < 4
    dy, dh, dc = (torch.randn(*shape, device=device) for shape in ((3, 5, d), (3, d), (3, d)))
    results = []
    for gemms in (offers, plain):
        fwd = _recurrence_forward(gx, h, c, valid, ad, gemms, weights, fused)
        hs_prev, cs_prev, acts, tanh_cs, saved = fwd[3:]
        da, dh0, dc0, dws = _recurrence_backward(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, gemms, weights,
                                                 saved, need_state=True, need_w=True, fused=fused)
        results.append([*fwd[:7], da, dh0, dc0, dws[0]])
    if kept[1]:  # the kept h_{t-1}: their fprop operands, as the GEMM makes them of the kept inputs
        assert results[0][3].dtype == results[1][3].dtype == ad
        results[1][3] = KERNELS[kernel].operand(results[1][3].flatten(0, 1), plan.fprop.a)[0].view_as(results[1][3])
    # Exact, except where Triton's kernels compute a scaled operand: a compiled cell that also reduces
    # its output to a scale evaluates the cell (h_t, da_t) in more than one kernel, which may round
    # an ulp apart (FMA contraction is the backend's choice per kernel). Measured on an H200: at most
    # 4.8e-7 (a few fp32 ulps of values up to 3.4). The bound allows that, not an operand element
    # moved to the neighbouring grid point (1/127 of a row's amax for int8, 2^-3 of the element for
    # E4M3: differences of ~1e-3 and more), nor a wrong scale or operand.
    exact = cpu or not fused or fmt in ("bf16", "fp16", "fp16-bf16-activations")
    for i, (a, b) in enumerate(zip(*results, strict=True)):
        if exact:
            assert torch.equal(a, b), i
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"output {i}")


@pytest.mark.parametrize("fused", [False, True], ids=["eager-cells", "compiled-cells"])
def test_plain_linear_steps_take_their_casts_from_the_cells(fused, device):
    """A plain bf16 `hh` (bf16 activations, fp32 state): each step's cell also writes h_t and da_t
    in bf16, which the loops use as the GEMMs' operands and as the saved h_{t-1} (no cast of their
    own), and dgrad's bf16 dh enters the next cell as it is. Every output, saved tensor and gradient
    is bit-identical to the loop that casts h, da and dh itself (dh widened to fp32 before the
    cell), with the cells eager and compiled."""
    from hybrid.rnn import LinearGemms, _recurrence_backward, _recurrence_forward

    cpu = device.type == "cpu"
    if fused and cpu and not any(shutil.which(c) for c in (os.environ.get("CXX", "g++"), "c++", "clang++")):
        pytest.skip("compiling the cells on the CPU needs a C++ compiler")

    class CastsItself(LinearGemms):
        input_cast = grad_cast = None
        operand_is_input = False

        @staticmethod
        def dgrad(dy, weights, saved, need_dx=True, g=None):
            return (dy @ weights[0]).float() if need_dx else None

    torch.manual_seed(0)
    d, T, B = 16, 6, 3
    weights = (torch.randn(4 * d, d, device=device).to(torch.bfloat16),)
    gx, h, c = (torch.randn(*shape, device=device) for shape in ((B, T, 4 * d), (B, d), (B, d)))
    dy, dh, dc = (torch.randn(*shape, device=device) for shape in ((B, T, d), (B, d), (B, d)))
    for valid in (None, torch.arange(T, device=device) < 4):
        results = []
        for gemms in (LinearGemms(), CastsItself()):
            fwd = _recurrence_forward(gx, h, c, valid, torch.bfloat16, gemms, weights, fused)
            hs_prev, cs_prev, acts, tanh_cs, saved = fwd[3:]
            da, dh0, dc0, dws = _recurrence_backward(dy, dh, dc, valid, hs_prev, cs_prev, acts, tanh_cs, gemms,
                                                     weights, saved, need_state=True, need_w=True, fused=fused)
            results.append([*fwd[:7], da, dh0, dc0, dws[0]])
        assert results[0][8].dtype == torch.float32  # dh_0 in the state dtype
        for i, (a, b) in enumerate(zip(*results, strict=True)):
            assert torch.equal(a, b), i


def test_compiled_cells_take_more_variants_than_the_recompile_limit():
    """The compiled LSTM cell serves more input variants (here mask / no mask, two batch sizes, two
    state dtypes) than torch's recompile limit allows (set to 1 here; a sharded bf16 run exceeds the
    default 8): each call still compiles and gives the eager cell's numbers (fp32: the compiled
    kernel's sigmoid/tanh may differ from ATen's by a few ulps, hence 1e-6)."""
    import torch._dynamo

    from hybrid.rnn import _cell, _compiled_cell

    torch._dynamo.reset()
    cell = _compiled_cell(_cell)
    gen = torch.Generator().manual_seed(0)
    with torch._dynamo.config.patch(recompile_limit=1):
        for B, masked, dtype in [(2, False, torch.float32), (2, True, torch.float32), (3, True, torch.float64)]:
            gx, hh = torch.randn(B, 8, generator=gen, dtype=dtype), torch.randn(B, 8, generator=gen, dtype=dtype)
            h, c = torch.randn(B, 2, generator=gen, dtype=dtype), torch.randn(B, 2, generator=gen, dtype=dtype)
            valid = torch.tensor(True) if masked else None
            got, want = cell(gx, hh, h, c, valid), _cell(gx, hh, h, c, valid)
            for a, b in zip(got[:4], want[:4], strict=True):
                assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
        assert torch._dynamo.config.recompile_limit == 1  # raised for those calls only
    torch._dynamo.reset()


def test_compiled_cell_compiles_once_across_dispatch_contexts():
    """The recurrence's operators reach the compiled cell below autograd, from contexts whose
    dispatch state differs (a CUDA-graph tree warms an operator up and records it differently): the
    cell is compiled once for a given input signature however it is reached, so no compilation can
    fall inside a CUDA graph capture (whose autotuning would break the capture)."""
    import torch._dynamo

    from hybrid.rnn import _cell, _compiled_cell

    torch._dynamo.reset()
    frames = []

    def counting(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    cell = _compiled_cell(_cell)
    gen = torch.Generator().manual_seed(0)
    gx, hh = torch.randn(2, 8, generator=gen), torch.randn(2, 8, generator=gen)
    h, c = torch.randn(2, 2, generator=gen), torch.randn(2, 2, generator=gen)
    contexts = [torch.no_grad, torch._C._AutoDispatchBelowAutograd, torch._C._AutoDispatchBelowADInplaceOrView,
                torch.enable_grad]
    with unittest.mock.patch.object(torch, "compile", lambda f, **kw: torch._dynamo.optimize(counting, nopython=True)(f)):
        cell = _compiled_cell(_cell)
        for context in contexts:
            with context():
                got = cell(gx, hh, h, c, None)
            assert torch.equal(got[0], _cell(gx, hh, h, c, None)[0])  # the counting backend runs the traced graph as is
    assert len(frames) == 1
    torch._dynamo.reset()


def test_a_held_weight_operand_is_taken_only_in_the_capture_that_derived_it(monkeypatch):
    """A CUDA graph records the memory its kernels read: a weight operand derived outside a capture
    (its warm-up, an earlier step) and taken inside it would be read by every replay, never
    refreshed (a later step's weights unseen; garbage once freed). Where the capture scope changes
    (`lowprec.gemm._hold_scope`, stood in for here: the CPU has no captures), fprop and dgrad get
    the weight's operand again (inside a capture: derived by it), and within one scope they take the
    one they hold; the outputs are the same numbers either way."""
    import lowprec.gemm as lg

    d, B = 16, 2
    torch.manual_seed(0)
    fp8 = {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"}, "storage": "native"}
    hh = QLinear.from_float(nn.Linear(d, 4 * d, bias=False), LayerPrecision.from_fields(fp8))
    gemms, weights = hh.recurrent_gemms()
    gemms = dataclasses.replace(gemms, plan=dataclasses.replace(gemms.plan, reuse_weight=False))
    made = []  # the weight operands looked up or derived (a held one is neither)
    real = lg._weight_operand
    monkeypatch.setattr(lg, "_weight_operand", lambda *a, **k: made.append(1) or real(*a, **k))
    scopes = {"now": None}
    monkeypatch.setattr(lg, "_hold_scope", lambda t: scopes["now"])
    x, dy = torch.randn(B, d), torch.randn(B, 4 * d)
    with torch.no_grad():
        counts, outputs = [], []
        for scope in (None, None, "capture-1", "capture-1", "capture-2", None):
            scopes["now"] = scope
            y, saved = gemms.fprop(x, weights)
            dx = gemms.dgrad(dy, weights, saved)
            counts.append(len(made))
            outputs.append((y, dx))
    # fprop holds its operand until the loop ends (not ended here), dgrad its own: one each at the
    # first step, none in the same scope, one each again at every change of scope
    assert counts == [2, 2, 4, 4, 6, 8]
    for y, dx in outputs[1:]:
        assert torch.equal(y, outputs[0][0]) and torch.equal(dx, outputs[0][1])


@pytest.mark.parametrize("native", [False, True], ids=["latent", "native"])
def test_recurrence_derives_fprop_weight_operand_once(monkeypatch, native):
    """Where dgrad does not take fprop's weight operand (on a GPU: FP8 per-tensor fprop, row-wise
    dgrad), no step's ``saved`` keeps it: the forward loop keeps it itself, so T steps quantize the
    weight once (the layer's cache holds it only weakly), with each step's output exactly the
    layer's, and let it go when the loop ends."""
    fp8 = {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
           "storage": "native" if native else "latent"}
    d, T, B = 16, 6, 2
    torch.manual_seed(0)
    hh = QLinear.from_float(nn.Linear(d, 4 * d, bias=False), LayerPrecision.from_fields(fp8))
    gemms, weights = hh.recurrent_gemms()
    assert gemms.plan.reuse_weight  # the CPU plan; the GPU's is built as it would be there:
    gemms = dataclasses.replace(gemms, plan=dataclasses.replace(gemms.plan, reuse_weight=False))
    kernel = KERNELS[gemms.plan.fprop.kernel]
    made = []
    for name in ("operand", "operand_from_qtensor"):
        real = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, real=real, name=name, **k: made.append(name) or real(*a, **k))
    xs = torch.randn(T, B, d)
    with torch.no_grad():
        steps = [gemms.fprop(x, weights) for x in xs]
        n_weight = sum(m == ("operand_from_qtensor" if native else "operand") for m in made) - (0 if native else T)
        assert n_weight == 1, made  # the T input operands (latent: same method) aside
        assert all(saved == (None, None) for _, saved in steps)
        for x, (y, _) in zip(xs, steps):
            assert torch.equal(y, hh(x))
        scope, held = gemms._held_fprop[0]
        assert scope is None  # derived outside any CUDA graph capture
        gemms.end_forward()
        assert gemms._held_fprop == []
    del steps
    ref = weakref.ref(held[0])
    del held
    gc.collect()
    assert ref() is None  # nothing else keeps the operand past the loop
