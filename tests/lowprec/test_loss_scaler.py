"""LossScaler: skipped steps leave weights bit-identical, exact growth/backoff, exact unscaling."""
import math

import pytest
import torch

from lowprec.loss_scaler import LossScaler

# The lead exports LossScaler from lowprec/__init__.py; import it from there once it does.
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def linear(device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return torch.nn.Linear(8, 4).to(device=device, dtype=dtype)


def fill_grads(model, scaler, seed=1):
    """Backward of a scaled loss; gradients are S * g."""
    torch.manual_seed(seed)
    x = torch.randn(16, 8, device=model.weight.device, dtype=model.weight.dtype)
    scaler.scale(model(x).float().pow(2).mean()).backward()


def snapshot(model):
    return [p.detach().clone() for p in model.parameters()]


def bits_equal(a, b):
    return a.dtype == b.dtype and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nonfinite_gradient_skips_step_and_backs_off(device, dtype, bad):
    model = linear(device, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    scaler = LossScaler(init_scale=2.0**10)
    fill_grads(model, scaler)
    model.bias.grad[1] = bad
    before = snapshot(model)
    assert scaler.step(opt) is False
    assert all(bits_equal(a, b) for a, b in zip(before, snapshot(model)))
    assert opt.state[model.weight] == {}  # the optimizer never ran
    assert scaler.loss_scale == 2.0**9  # exactly S * backoff_factor
    assert (scaler.skipped_steps, scaler.good_steps, scaler.consecutive_bad) == (1, 0, 1)
    assert scaler.last_step_skipped
    assert model.weight.grad is not None  # skipping zeroes nothing


def test_good_step_matches_plain_optimizer_on_unscaled_grads(device):
    ref, model = linear(device), linear(device)
    scaler, plain = LossScaler(init_scale=2.0**12), LossScaler("none")
    fill_grads(model, scaler)
    fill_grads(ref, plain)
    for opt, m, s in ((torch.optim.SGD(model.parameters(), lr=0.1), model, scaler),
                      (torch.optim.SGD(ref.parameters(), lr=0.1), ref, plain)):
        assert s.step(opt) is True
    # S is a power of two and S * g stays far from overflow, so S * g / S == g bit for bit.
    assert all(bits_equal(a, b) for a, b in zip(snapshot(ref), snapshot(model)))
    assert not scaler.last_step_skipped and scaler.good_steps == 1


def test_growth_after_exactly_growth_interval_good_steps(device):
    model = linear(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = LossScaler(init_scale=4.0, growth_interval=3, growth_factor=2.0)
    scales = []
    for _ in range(7):
        fill_grads(model, scaler)
        assert scaler.step(opt)
        opt.zero_grad()
        scales.append(scaler.loss_scale)
    assert scales == [4.0, 4.0, 8.0, 8.0, 8.0, 16.0, 16.0]


def test_bad_step_resets_growth_count(device):
    model = linear(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = LossScaler(init_scale=4.0, growth_interval=2)
    pattern = [True, False, True, True, True]  # good, bad, good, good(grow), good
    scales = []
    for good in pattern:
        fill_grads(model, scaler)
        if not good:
            model.weight.grad[0, 0] = math.nan
        assert scaler.step(opt) is good
        opt.zero_grad()
        scales.append(scaler.loss_scale)
    assert scales == [4.0, 2.0, 2.0, 4.0, 4.0]
    assert (scaler.good_steps, scaler.skipped_steps, scaler.consecutive_bad) == (4, 1, 0)


def test_consecutive_bad_counts_a_run(device):
    g = torch.ones(3, device=device)
    scaler = LossScaler(init_scale=8.0)
    runs = []
    for v in (math.inf, math.inf, 1.0, math.nan):
        g.fill_(v)
        scaler.step(lambda: None, grads=[g])
        runs.append(scaler.consecutive_bad)
    assert runs == [1, 2, 0, 1]


def test_scale_clamped_to_min_and_max(device):
    g = torch.ones(2, device=device)
    scaler = LossScaler(init_scale=4.0, min_scale=2.0, max_scale=16.0, growth_interval=1, growth_factor=3.0,
                        backoff_factor=0.25)
    for expect in (12.0, 16.0, 16.0):  # 4*3, min(36, 16), stays at max
        g.fill_(1.0)
        assert scaler.step(lambda: None, grads=[g])
        assert scaler.loss_scale == expect
    for expect in (4.0, 2.0, 2.0):  # 16/4, max(1, 2), stays at min
        g.fill_(math.inf)
        assert not scaler.step(lambda: None, grads=[g])
        assert scaler.loss_scale == expect


def test_static_never_changes_and_still_skips(device):
    model = linear(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = LossScaler("static", init_scale=128.0, growth_interval=1)
    for i in range(4):
        fill_grads(model, scaler, seed=i)
        if i % 2:
            model.weight.grad[1, 2] = math.inf
        before = snapshot(model)
        assert scaler.step(opt) is (i % 2 == 0)
        if i % 2:
            assert all(bits_equal(a, b) for a, b in zip(before, snapshot(model)))
        opt.zero_grad()
        assert scaler.loss_scale == 128.0
    assert (scaler.good_steps, scaler.skipped_steps) == (2, 2)


def test_none_mode_is_identity_and_still_skips(device):
    scaler = LossScaler("none")
    loss = torch.tensor(3.0, device=device)
    assert scaler.scale(loss) is loss and scaler.loss_scale == 1.0
    g = torch.tensor([1.5, math.nan], device=device)
    assert not scaler.step(lambda: pytest.fail("stepped on NaN"), grads=[g])
    assert scaler.loss_scale == 1.0 and bits_equal(g[:1], torch.tensor([1.5], device=device))


@pytest.mark.parametrize("dtype", DTYPES)
def test_unscale_is_exact_division_for_power_of_two_scales(device, dtype):
    torch.manual_seed(0)
    # Values spanning the dtype's range (subnormal results included): x / 2^k is the correctly
    # rounded quotient, and multiplying by the exact float32 2^-k must give the same bits.
    finfo = torch.finfo(dtype)
    raw = torch.randn(4096, dtype=torch.float64) * torch.exp2(torch.randint(-30, 30, (4096,)).double())
    raw = torch.cat([raw, torch.tensor([finfo.max, -finfo.max, finfo.tiny, finfo.smallest_normal * 0.5, 0.0, -0.0],
                                       dtype=torch.float64)])
    base = raw.clamp(-finfo.max, finfo.max).to(dtype).to(device)
    for k in (0, 1, 7, 16, 24):
        scaler = LossScaler(init_scale=2.0**k, max_scale=2.0**24)
        g = base.clone()
        assert scaler.unscale_([g]) is False
        assert bits_equal(g, base / 2.0**k), (dtype, k)


def test_unscale_twice_divides_once(device):
    model = linear(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler = LossScaler(init_scale=2.0**8)
    fill_grads(model, scaler)
    scaled = model.weight.grad.clone()
    scaler.unscale_(opt)
    once = model.weight.grad.clone()
    scaler.unscale_(opt)
    scaler.unscale_(model.parameters())
    scaler.unscale_([model.weight.grad, model.weight.grad.view(-1)])  # same storage
    assert bits_equal(model.weight.grad, once) and bits_equal(once, scaled / 2.0**8)
    assert scaler.step(opt)  # step does not divide a third time
    assert bits_equal(model.weight.grad, once)
    # A new step divides again.
    model.weight.grad.copy_(scaled)
    scaler.unscale_(opt)
    assert bits_equal(model.weight.grad, scaled / 2.0**8)


def test_unscale_verdict_accumulates_over_calls(device):
    scaler = LossScaler(init_scale=4.0)
    a, b = torch.ones(2, device=device), torch.tensor([math.inf], device=device)
    assert scaler.unscale_([a]) is False
    assert scaler.unscale_([b]) is True
    assert scaler.step(lambda: pytest.fail("stepped on inf")) is False


class PackedSign:
    """A custom optimizer whose gradients live in a module attribute, not in ``param.grad``."""

    def __init__(self, layer, lr):
        self.layer, self.lr = layer, lr

    def step(self):
        self.layer.weight_codes.sub_(self.lr * self.layer.weight_grad.sign())


def test_custom_gradient_tensors(device):
    layer = torch.nn.Module()
    layer.weight_codes = torch.zeros(5, device=device)
    layer.weight_grad = torch.tensor([8.0, -4.0, 0.0, 2.0, -16.0], device=device)
    opt = PackedSign(layer, lr=1.0)
    scaler = LossScaler(init_scale=2.0)
    assert scaler.step(opt.step, grads=[layer.weight_grad])
    assert torch.equal(layer.weight_grad, torch.tensor([4.0, -2.0, 0.0, 1.0, -8.0], device=device))
    assert torch.equal(layer.weight_codes, torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0], device=device))
    # Same protocol with unscale_ first; an inf in the custom tensor skips the custom step.
    layer.weight_grad[2] = math.inf
    scaler.unscale_([layer.weight_grad])
    assert scaler.step(opt) is False
    assert torch.equal(layer.weight_codes, torch.tensor([-1.0, 1.0, 0.0, -1.0, 1.0], device=device))
    # A bare callable with no gradients named cannot be stepped safely.
    with pytest.raises(ValueError, match="cannot find the gradients"):
        scaler.step(opt.step)
    # An object that has step() but no param_groups and whose gradients were never shown.
    with pytest.raises(ValueError, match="cannot find the gradients"):
        scaler.step(opt)


def test_optimizer_without_any_gradient_raises(device):
    model = linear(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="no gradients"):
        LossScaler().step(opt)


def test_state_dict_round_trip_then_identical_behaviour(device):
    kw = {"init_scale": 2.0**6, "growth_interval": 3, "backoff_factor": 0.25, "min_scale": 0.5, "max_scale": 2.0**10}
    a = LossScaler(**kw)
    g = torch.ones(4, device=device)
    for v in (1.0, 1.0, math.nan, 1.0, 1.0):
        g.fill_(v)
        a.step(lambda: None, grads=[g])
    state = a.state_dict()
    b = LossScaler(**{**kw, "init_scale": 1.0, "growth_interval": 99})  # the state overrides these
    b.load_state_dict(state)
    assert b.state_dict() == state and repr(b) == repr(a)
    trace = {}
    for name, s in (("a", a), ("b", b)):
        out = []
        for v in (1.0, 1.0, 1.0, math.inf, math.inf, 1.0, 1.0, 1.0):
            g.fill_(v)
            out.append((s.step(lambda: None, grads=[g]), s.loss_scale, s.good_steps, s.skipped_steps,
                        s.consecutive_bad))
        trace[name] = out
    assert trace["a"] == trace["b"]
    # torch.save/load with weights_only works (plain Python values).
    import io
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    assert torch.load(buf, weights_only=True) == a.state_dict()


def test_load_state_dict_rejects_mismatches():
    state = LossScaler("dynamic").state_dict()
    with pytest.raises(ValueError, match="'dynamic' loss-scaler state into a 'static'"):
        LossScaler("static").load_state_dict(state)
    with pytest.raises(ValueError, match="unknown keys \\['extra'\\]"):
        LossScaler().load_state_dict({**state, "extra": 1})
    missing = dict(state)
    del missing["good_steps"]
    with pytest.raises(ValueError, match="lacks \\['good_steps'\\]"):
        LossScaler().load_state_dict(missing)
    with pytest.raises(ValueError, match="backoff_factor=2.0"):
        LossScaler().load_state_dict({**state, "backoff_factor": 2.0})
    with pytest.raises(ValueError, match="skipped_steps=-1"):
        LossScaler().load_state_dict({**state, "skipped_steps": -1})


@pytest.mark.parametrize("kwargs, match", [
    ({"mode": "dynamik"}, "unknown loss-scaling mode 'dynamik'; choose one of"),
    ({"init_scale": 0.0}, "init_scale=0.0 is invalid"),
    ({"init_scale": math.inf}, "init_scale=inf is invalid"),
    ({"init_scale": 2.0**30}, "init_scale=1073741824.0 is outside \\[min_scale, max_scale\\]"),
    ({"init_scale": 0.5}, "init_scale=0.5 is outside"),
    ({"growth_factor": 1.0}, "growth_factor=1.0 is invalid; growth_factor must be a finite number > 1"),
    ({"growth_factor": "2"}, "growth_factor='2' is invalid"),
    ({"backoff_factor": 1.0}, "backoff_factor=1.0 is invalid; .* in \\(0, 1\\)"),
    ({"backoff_factor": 0.0}, "backoff_factor=0.0 is invalid"),
    ({"growth_interval": 0}, "growth_interval=0 is invalid; it must be an int >= 1"),
    ({"growth_interval": 2.5}, "growth_interval=2.5 is invalid"),
    ({"growth_interval": True}, "growth_interval=True is invalid"),
    ({"min_scale": -1.0}, "min_scale=-1.0 is invalid; min_scale must be a finite number > 0"),
    ({"min_scale": math.nan}, "min_scale=nan is invalid"),
    ({"max_scale": 0.5}, "max_scale=0.5 is invalid; max_scale must be a finite number >= min_scale \\(1.0\\)"),
])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LossScaler(**kwargs)


def test_bad_inputs():
    scaler = LossScaler()
    with pytest.raises(TypeError, match="loss tensor"):
        scaler.scale(1.0)
    with pytest.raises(TypeError, match="cannot unscale a torch.int8 gradient"):
        scaler.unscale_([torch.ones(2, dtype=torch.int8)])
    with pytest.raises(TypeError, match="optimizer or a callable"):
        scaler.step(3)


def test_small_scale_overflow_on_unscale_is_caught(device):
    # S < 1 multiplies by 1/S > 1, which can overflow a finite fp16 gradient: it must be caught.
    scaler = LossScaler(init_scale=0.25, min_scale=0.125)
    g = torch.tensor([30000.0, 1.0], dtype=torch.float16, device=device)
    assert not scaler.step(lambda: pytest.fail("stepped on an overflowed gradient"), grads=[g])
    assert scaler.loss_scale == 0.125


def test_repr():
    assert repr(LossScaler("static", init_scale=8.0)) == (
        "LossScaler(mode='static', scale=8.0, growth_factor=2.0, backoff_factor=0.5, growth_interval=2000, "
        "min_scale=1.0, max_scale=16777216.0, good_steps=0, skipped_steps=0, consecutive_bad=0)")


def test_fp16_training_backs_off_from_overflow_then_learns(device):
    """fp32 master weights, fp16 forward/backward; S = 2^24 overflows fp16 (max 65504) at first."""
    torch.manual_seed(0)
    x = torch.randn(256, 16, device=device)
    w_true = torch.randn(16, 1, device=device)
    y = x @ w_true
    w = torch.zeros(16, 1, device=device, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.1)
    scaler = LossScaler(init_scale=2.0**24, max_scale=2.0**24, growth_interval=1000)
    losses, taken = [], []
    for _ in range(60):
        pred = x.half() @ w.half()
        loss = (pred.float() - y).pow(2).mean()
        scaler.scale(loss.half()).backward()  # the fp16 backward overflows while S is large
        taken.append(scaler.step(opt))
        opt.zero_grad()
        assert torch.isfinite(w).all()
        losses.append(loss.item())
    k = scaler.skipped_steps
    assert k >= 1 and taken == [False] * k + [True] * (60 - k)  # backs off first, then every step is good
    assert scaler.loss_scale == 2.0**24 * 0.5**k
    assert losses[k] == losses[0]  # weights untouched while steps were skipped
    assert losses[-1] < 0.01 * losses[0]


def test_mixed_dtypes_in_one_call(device):
    grads = [torch.full((3,), 8.0, device=device, dtype=dt) for dt in DTYPES]
    scaler = LossScaler(init_scale=4.0)
    assert scaler.unscale_(grads) is False
    assert all(torch.equal(g, torch.full_like(g, 2.0)) for g in grads)
    grads[1][0] = math.inf  # only the bf16 one
    assert LossScaler(init_scale=4.0).unscale_(grads) is True


def test_device_protocol_follows_the_same_scale_and_counters(device):
    """unscale_and_check_ + update_ (no host read) step for step as step(): the same verdicts, the
    same scale (halved on inf/NaN, doubled after growth_interval good steps), the same counters."""
    kw = {"init_scale": 2.0**6, "growth_interval": 2, "min_scale": 2.0, "max_scale": 2.0**8}
    host, dev = LossScaler(**kw), LossScaler(**kw)
    g_host, g_dev = torch.ones(4, device=device), torch.ones(4, device=device)
    for v in (1.0, 1.0, 1.0, math.inf, math.nan, 1.0, 1.0, 1.0, 1.0, 1.0, math.inf, 1.0, 1.0):
        g_host.fill_(v * host.loss_scale)
        g_dev.fill_(v * dev.loss_scale)
        taken = host.step(lambda: None, grads=[g_host])
        found_inf = dev.unscale_and_check_([g_dev])
        assert found_inf.device == g_dev.device and found_inf.dtype == torch.float32 and found_inf.dim() == 0
        assert float(found_inf) == (0.0 if taken else 1.0)
        dev.update_(found_inf)
        assert dev.state_dict() == host.state_dict()
        assert bits_equal(g_dev, g_host)
    assert host.state_dict()["skipped_steps"] == 3
