"""Bop and TernaryBop: exact transitions from hand-made momenta, the scale's gradient, learning."""

import pytest
import torch
from torch import nn

import lowprec
import optim

from . import conftest


def native_layer(kind: str, out_f: int = 8, in_f: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(in_f, out_f, bias=False))
    lowprec.apply_policy(model, {"default": {"weight": kind, "storage": "native"}})
    return model[0]


def codes_of(layer) -> torch.Tensor:
    """The layer's element codes (-1/+1 or -1/0/+1) in its logical shape."""
    q = layer.native_weight
    return q.values().reshape(q.shape)


def hand_momentum(layer, opt, m0: torch.Tensor) -> None:
    """Install momentum ``m0`` (fp32, logical shape; tensor-scaled formats have G = 1)."""
    s = layer.native_weight.group_scales()
    opt.state[layer] = {"step": 0, "momentum": m0.reshape(1, -1).clone(),
                        "scale_exp_avg": torch.zeros_like(s), "scale_exp_avg_sq": torch.zeros_like(s)}
    layer.native_grad = torch.zeros(layer.native_weight.shape)  # g = 0: m1 = (1 - gamma) m0


def momenta_around(tau: float, gamma: float, shape, gen) -> torch.Tensor:
    """|m0| from {0.5, 0.9, 1.1, 3} x tau / (1 - gamma), random signs: after one step with g = 0,
    |m1| = (1 - gamma) |m0| lies at 0.5/0.9/1.1/3 x tau, never within 10% of the threshold (so
    float rounding in the EMA cannot decide a crossing)."""
    mags = torch.tensor([0.5, 0.9, 1.1, 3.0])[torch.randint(0, 4, shape, generator=gen)]
    signs = torch.where(torch.rand(shape, generator=gen) < 0.5, -1.0, 1.0)
    return signs * mags * tau / (1 - gamma)


def test_bop_flips_exactly_the_weights_whose_momentum_crosses_tau():
    layer = native_layer("binary")
    gamma, tau = 0.25, 1e-3
    opt = optim.Bop([layer], gamma=gamma, threshold=tau, lr=0.0, momentum_dtype="fp32")
    gen = torch.Generator().manual_seed(1)
    m0 = momenta_around(tau, gamma, layer.native_weight.shape, gen)
    c0 = codes_of(layer)
    hand_momentum(layer, opt, m0)
    scale0 = layer.w_scale.clone()
    opt.step()
    m1 = (1 - gamma) * m0
    flip = (m1.abs() > tau) & (torch.sign(m1) == torch.sign(c0))
    assert flip.any() and (~flip).any()
    assert torch.equal(codes_of(layer), torch.where(flip, -c0, c0))
    # Bop keeps the momentum of flipped weights (its hysteresis needs it)
    torch.testing.assert_close(opt.state[layer]["momentum"].reshape(m0.shape), m1, rtol=1e-6, atol=0)
    assert torch.equal(layer.w_scale, scale0)  # lr = 0: fixed scale


def test_ternary_bop_steps_one_state_along_minus_sign_m_and_resets_moved_momentum():
    layer = native_layer("ternary", 12, 16)
    gamma, tau = 0.1, 1e-3
    opt = optim.TernaryBop([layer], gamma=gamma, threshold=tau, lr=0.0, momentum_dtype="fp32")
    gen = torch.Generator().manual_seed(2)
    m0 = momenta_around(tau, gamma, layer.native_weight.shape, gen)
    c0 = codes_of(layer)
    assert set(c0.unique().tolist()) == {-1.0, 0.0, 1.0}
    hand_momentum(layer, opt, m0)
    opt.step()
    m1 = (1 - gamma) * m0
    push = torch.where(m1.abs() > tau, -torch.sign(m1), 0.0)
    expected = (c0 + push).clamp(-1, 1)
    moved = expected != c0
    # every transition kind happens: +1 -> 0, 0 -> +-1, -1 -> 0, and a clipped push keeps +-1
    for a, b in [(1, 0), (0, 1), (0, -1), (-1, 0)]:
        assert ((c0 == a) & (expected == b)).any(), (a, b)
    assert ((push != 0) & ~moved).any()
    assert torch.equal(codes_of(layer), expected)
    m_after = opt.state[layer]["momentum"].reshape(m0.shape)
    assert torch.equal(m_after[moved], torch.zeros_like(m_after[moved]))
    torch.testing.assert_close(m_after[~moved], m1[~moved], rtol=1e-6, atol=0)


@pytest.mark.parametrize("kind,cls", [("binary", optim.Bop), ("ternary", optim.TernaryBop)])
def test_scale_gradient_is_sum_of_grad_times_codes(kind, cls):
    """dL/ds = sum(dL/dW * c); the scale learns log s, so after one Adam step from zero
    scale_exp_avg = (1 - beta1) dL/dlog s = (1 - beta1) s dL/ds."""
    layer = native_layer(kind)
    x = torch.randn(5, 16)
    s = layer.native_weight.group_scales().reshape(()).clone().requires_grad_(True)
    c = codes_of(layer)
    (torch.sin(x @ (s * c).T)).sum().backward()
    layer(x).sin().sum().backward()
    opt = cls([layer], gamma=0.5, threshold=1.0, lr=1e-3, betas=(0.9, 0.999), momentum_dtype="fp32")
    opt.step()
    torch.testing.assert_close(opt.state[layer]["scale_exp_avg"].reshape(()), 0.1 * s.detach() * s.grad,
                               rtol=1e-5, atol=0)
    # Adam's first step moves log s by lr against the sign of its gradient
    expected = s.detach() * torch.exp(-1e-3 * torch.sign(s.grad))
    torch.testing.assert_close(layer.native_weight.group_scales().reshape(()), expected, rtol=1e-6, atol=0)


def teacher_student(kind: str, opt_fn, steps: int = 200, seed: int = 0):
    """Full-batch regression y = X W*^T with W* = 0.1 x codes of ``kind``; the student is a native
    layer from a different random init. Returns (losses, student codes, teacher codes)."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, 64, generator=g)
    if kind == "binary":
        teacher = torch.where(torch.rand(16, 64, generator=g) < 0.5, -1.0, 1.0)
    else:
        teacher = torch.randint(0, 3, (16, 64), generator=g) - 1.0
    y = X @ (0.1 * teacher).T
    layer = native_layer(kind, 16, 64, seed=seed + 1)
    losses = conftest.fit(layer, opt_fn(layer), X, y, steps)
    return losses, codes_of(layer), teacher


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("momentum_dtype", ["bf16", "fp32"])
def test_bop_learns_the_teachers_signs(seed, momentum_dtype):
    losses, codes, teacher = teacher_student(
        "binary", lambda l: optim.Bop([l], gamma=0.05, threshold=1e-5, lr=1e-2, momentum_dtype=momentum_dtype),
        seed=seed)
    # A random student has about half its signs wrong (loss ~ 2 x the signal); the teacher is
    # exactly representable, so recovering its signs and scale drives the loss to ~0: 1% of the
    # start leaves room for a few wrong signs.
    assert losses[-1] < 0.01 * losses[0]
    assert (codes == teacher).float().mean() >= 0.99


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("momentum_dtype", ["bf16", "fp32"])
def test_ternary_bop_learns_the_teachers_codes(seed, momentum_dtype):
    losses, codes, teacher = teacher_student(
        "ternary", lambda l: optim.TernaryBop([l], gamma=0.05, threshold=1e-4, lr=1e-2,
                                              momentum_dtype=momentum_dtype), seed=seed)
    # as for Bop: the ternary teacher is representable, 1% of the start allows a few wrong codes
    assert losses[-1] < 0.01 * losses[0]
    assert (codes == teacher).float().mean() >= 0.98


@pytest.mark.parametrize("cls", [optim.Bop, optim.TernaryBop])
@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": -1e-8}, "threshold=-1e-08"),
    ({"gamma": 0.0}, "gamma=0.0"),
    ({"gamma": 1.5}, "gamma=1.5"),
    ({"gamma": float("nan")}, "gamma=nan"),
    ({"lr": -1.0}, "lr=-1.0"),
    ({"betas": (0.9, 1.0)}, r"betas\[1\]=1.0"),
    ({"momentum_dtype": "fp16"}, "unknown momentum_dtype 'fp16'; choose one of"),
])
def test_bad_hyperparameters_raise_naming_the_value(cls, kwargs, match):
    kind = "binary" if cls is optim.Bop else "ternary"
    with pytest.raises(ValueError, match=match):
        cls([native_layer(kind)], **kwargs)


def test_wrong_targets_raise():
    binary, ternary = native_layer("binary"), native_layer("ternary")
    with pytest.raises(TypeError, match="latent weight: give it to AdamW"):
        optim.Bop([nn.Parameter(torch.zeros(3))])
    with pytest.raises(TypeError, match="Bop updates binary weights"):
        optim.Bop([ternary])
    with pytest.raises(TypeError, match="TernaryBop updates ternary weights"):
        optim.TernaryBop([binary])
    latent = nn.Sequential(nn.Linear(4, 4))
    lowprec.apply_policy(latent, {"default": {"weight": "binary", "storage": "latent"}})
    with pytest.raises(TypeError, match="native binary layers"):
        optim.Bop([latent[0]])


def reference_update(kind, q, g, m, u, gamma, tau):
    """The module doc's rule written out op by op (per-tensor scale, G = 1), its momentum rounded
    stochastically to bf16 by bit arithmetic: U[0, 1) noise ``u`` of 24-bit resolution adds
    ``floor(u 2^16)`` to the fp32 magnitude's 16 bits that bf16 drops, and the sum is truncated
    (the carry rounds up with probability equal to the dropped fraction) -> (codes, bf16 momentum)."""
    c = q.values().reshape(1, -1)
    s = q.group_scales()
    m = m.float().lerp(g.reshape(1, -1) * s, gamma)
    if kind == "binary":
        new = torch.where((m.abs() > tau) & (m * c > 0), -c, c)
    else:
        new = (c + torch.where(m.abs() > tau, -torch.sign(m), 0.0)).clamp(-1, 1)
        m = m.masked_fill(new != c, 0.0)
    bits = m.view(torch.int32) + (u.reshape(m.shape) * 2**16).to(torch.int32)  # exact: u 2^16 < 2^16
    return new, (bits & ~0xFFFF).view(torch.float32).to(torch.bfloat16)


@pytest.mark.parametrize("kind,cls", [("binary", optim.Bop), ("ternary", optim.TernaryBop)])
def test_update_equals_the_rule_with_stored_bf16_momentum(kind, cls):
    """Three steps from random gradients with the bf16 momentum: each step's codes and stored
    momentum are bit-identical to the rule written out op by op, its stochastic rounding done on
    the bits with the noise the layer's key and count of updates give
    (:func:`lowprec.rounding.counter_uniform`, keyed by the optimizer's seed and class and the
    layer's position); the key and count are in the state (a checkpoint carries them)."""
    from lowprec.rounding import counter_uniform
    from optim.moments import noise_seed

    layer = native_layer(kind, 32, 64)
    gamma, tau = 0.3, 2e-3
    opt = cls([layer], gamma=gamma, threshold=tau, lr=1e-3, momentum_dtype="bf16", seed=5)
    key = torch.tensor(noise_seed(5, cls.__name__, 0, 0))
    gen = torch.Generator().manual_seed(0)
    moved = 0
    for step in range(1, 4):
        m = opt.state[layer]["momentum"].clone() if opt.state.get(layer) else torch.zeros(1, 2048)
        q = layer.native_weight
        layer.native_grad = torch.randn(32, 64, generator=gen) * 0.1
        u = counter_uniform((1, 32 * 64), key, torch.tensor(step))
        want_codes, want_m = reference_update(kind, q, layer.native_grad, m, u, gamma, tau)
        before = codes_of(layer).reshape(1, -1).clone()
        opt.step()
        got = codes_of(layer).reshape(1, -1)
        moved += int((got != before).sum())
        assert torch.equal(got, want_codes)
        assert opt.state[layer]["momentum"].dtype == torch.bfloat16
        assert torch.equal(opt.state[layer]["momentum"], want_m)
        assert int(opt.state[layer]["draws"]) == step and int(opt.state[layer]["noise_key"]) == int(key)
    assert moved > 0  # the steps moved codes: the transitions were exercised


def test_compiled_rules_trace_whole_and_equal_eager(monkeypatch):
    """A layer's update (the noise and the skip on the device flag inside) traces as one graph
    (fullgraph) with the rule's constants. A group of layers of three shapes compiles two graphs
    (the first layer's shapes; at the second shape once more, with the shapes symbolic, which the
    third reuses), fp32 momentum one more (its dtype, shapes already symbolic), nothing on later
    steps; Bop and TernaryBop in one process. Under `aot_eager` (the traced ATen ops run as they
    are) the codes, momenta, scales, step and draw counts equal the eager update's bit for bit,
    a skipped step's included."""
    import copy

    import torch._dynamo
    from torch._dynamo.utils import counters

    import optim.bop

    torch._dynamo.reset()
    counters.clear()
    traced = []

    def counting(gm, example_inputs):  # aot_eager, counting the graphs (a graph break would fall back to eager)
        traced.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)
    monkeypatch.setattr(optim.bop, "BACKEND", counting)
    monkeypatch.setattr(optim.bop, "_COMPILED", {})
    for kind, cls in [("binary", optim.Bop), ("ternary", optim.TernaryBop)]:
        graphs = []
        for momentum_dtype in ("bf16", "fp32"):
            layers = [native_layer(kind, 32, 64), native_layer(kind, 48, 128, seed=1), native_layer(kind, 16, 256, 2)]
            twins = copy.deepcopy(layers)
            opts = [cls(ls, gamma=0.3, threshold=2e-3, lr=1e-3, momentum_dtype=momentum_dtype, seed=5)
                    for ls in (layers, twins)]
            gen = torch.Generator().manual_seed(0)
            for flag in (0.0, 1.0, 0.0):  # the middle step skipped on the device flag
                for a, b in zip(layers, twins):
                    a.native_grad = torch.randn(a.native_weight.shape, generator=gen) * 0.1
                    b.native_grad = a.native_grad.clone()
                with monkeypatch.context() as mp:  # the compiled path, on the CPU
                    mp.setattr(optim.bop, "COMPILE_ON", ("cpu",))
                    opts[0].step(found_inf=torch.tensor(flag))
                opts[1].step(found_inf=torch.tensor(flag))
                for a, b in zip(layers, twins):
                    assert torch.equal(a.native_weight.data, b.native_weight.data)
                    assert torch.equal(a.native_weight.scale, b.native_weight.scale)
                    for k in ("momentum", "step", "draws", "scale_exp_avg"):
                        assert torch.equal(opts[0].state[a][k], opts[1].state[b][k]), k
                    # traced, `addcmul_` is decomposed into a multiply and an add, rounded twice: one ulp
                    torch.testing.assert_close(opts[0].state[a]["scale_exp_avg_sq"],
                                               opts[1].state[b]["scale_exp_avg_sq"], rtol=2.0**-23, atol=0)
                graphs.append(counters["stats"]["unique_graphs"])
            assert all(int(opts[0].state[a]["step"]) == 2 for a in layers)  # the skipped step not counted
            assert all(int(opts[0].state[a]["draws"]) == 3 for a in layers)  # but tried: new noise after it
        assert traced, cls  # this rule's update ran compiled
        # (the backend may be called twice for one graph: dynamo restarts a trace once to
        # specialize its float constants; unique_graphs counts graphs)
        assert graphs == [2, 2, 2, 3, 3, 3], (cls, graphs)
        traced.clear()
        counters.clear()
    assert len(optim.bop._COMPILED) == 2
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("kind,cls", [("binary", optim.Bop), ("ternary", optim.TernaryBop)])
@pytest.mark.parametrize("momentum_dtype", ["bf16", "fp32"])
def test_compiled_update_on_cuda_equals_eager(kind, cls, momentum_dtype):
    """On CUDA each layer's update runs compiled (`optim.bop.layer_step`) and the group's update is
    replayed as one CUDA graph from its second step (step 1 compiles, step 2 captures while doing its
    work, steps 3 and 4 replay): in each of 4 steps of two layers of different shapes, from the same
    state, the codes equal the eager function's exactly, the noise's draw counts too, the stored
    momentum is within one bf16 ulp (rtol 2^-7, bf16) / 1e-6 (fp32) of the element or of the
    layer's largest momentum, and the scales within rtol 1e-5 (the fused
    kernels may round the fp32 lerp, the scale gradient's sum and the scale's Adam arithmetic
    differently in the last bit; a flip needs |m| to cross tau, which no draw here puts within an
    ulp of it)."""
    import copy

    import optim.bop

    layers = [native_layer(kind, 32, 64).cuda(), native_layer(kind, 48, 128, seed=1).cuda()]
    twins = copy.deepcopy(layers)
    opts = [cls(ls, gamma=0.3, threshold=2e-3, lr=1e-3, momentum_dtype=momentum_dtype, seed=5)
            for ls in (layers, twins)]
    gen = torch.Generator(device="cuda").manual_seed(0)
    for step in range(4):
        for a, b in zip(layers, twins):
            a.native_grad = torch.randn(a.native_weight.shape, generator=gen, device="cuda") * 0.1
            b.native_grad = a.native_grad.clone()
        opts[0].step()  # compiled, replayed as a graph from the second step
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(optim.bop, "COMPILE_ON", ())
            opts[1].step()
        assert (opts[0]._graphs.captures, opts[0]._graphs.replays) == ((0, 0), (1, 0), (1, 1), (1, 2))[step]
        for a, b in zip(layers, twins):
            assert torch.equal(codes_of(a), codes_of(b))
            assert int(opts[0].state[a]["draws"]) == int(opts[1].state[b]["draws"]) == step + 1
            ma, mb = opts[0].state[a]["momentum"].float(), opts[1].state[b]["momentum"].float()
            tol = 2.0**-7 if momentum_dtype == "bf16" else 1e-6  # one bf16 ulp / a few fp32 ulps, relative
            diff = (ma - mb).abs()
            # relative to each element, and to the layer's largest momentum: a lerp whose result
            # nears zero cancels, keeping the absolute rounding error of its larger operands
            assert (diff <= tol * (torch.maximum(ma.abs(), mb.abs()) + ma.abs().max())).all()
            if momentum_dtype == "bf16":  # an fp32 ulp apart changes the bf16 rounding at a few elements only
                assert (diff > 0).float().mean() < 0.01  # (fp32: the fused lerp may be an ulp off at most elements)
            torch.testing.assert_close(a.native_weight.group_scales(), b.native_weight.group_scales(),
                                       rtol=1e-5, atol=0)
            # the next step starts both from the compiled one's result: each step is compared
            # alone (a scale one ulp apart would shift every momentum of the next step)
            b.set_native_weight(a.native_weight)
            opts[1].state[b].update({k: v.clone() for k, v in opts[0].state[a].items() if torch.is_tensor(v)})
