"""The LSTM recurrence with a plain `hh` (`LSTMRecurrence`: hand-written backward, the weight
gradient of all steps in one GEMM) against the same layer with `hh` called per step and
differentiated by autograd."""
import pytest
import torch
from torch import nn

from hybrid.rnn import LSTMLayer, LSTMRecurrence


class PerStep(nn.Linear):
    """An `hh` that is not a plain nn.Linear: the layer calls it once per step (as it does a policy's layer)."""


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
def test_recurrence_equals_per_step_autograd(held):
    """float64: the forward is the same ops (bit-identical outputs); gradients agree to 1e-12
    because the weight gradient sums its T·B products in one GEMM instead of T GEMMs added up,
    and the gate derivatives multiply in another order than autograd's. `held`: steps 6.. hold
    the state (the chunk-level recurrence's placeholder steps)."""
    d, T, B = 16, 9, 3
    fused, per_step = layer_pair(d, torch.float64)
    assert fused.hh.__class__ is nn.Linear and per_step.hh.__class__ is PerStep
    x = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, d, dtype=torch.float64, requires_grad=True)
    valid = torch.arange(T) < 6 if held else None
    (out_f, grads_f), (out_p, grads_p) = run(fused, x, h0, c0, valid), run(per_step, x, h0, c0, valid)
    for a, b in zip(out_f, out_p, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(grads_f, grads_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if held:
        assert torch.equal(out_f[1], out_f[0][:, 5]) and torch.equal(out_f[0][:, 5:], out_f[0][:, 5:6].expand(-1, 4, -1))


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


def test_recurrence_runs_for_a_plain_linear_only(monkeypatch):
    """A policy's layer (here: any subclass) and autocast keep the per-step calls."""
    torch.manual_seed(0)
    layer = LSTMLayer(8)
    x, h = torch.randn(2, 3, 8), torch.zeros(2, 8)
    calls = []
    apply = LSTMRecurrence.apply
    monkeypatch.setattr(LSTMRecurrence, "apply", lambda *a: calls.append(1) or apply(*a))
    layer(x, h, h)
    with torch.autocast("cpu", torch.bfloat16):
        layer(x, h, h)
    layer.hh = PerStep(8, 32, bias=False)
    layer(x, h, h)
    assert len(calls) == 1
