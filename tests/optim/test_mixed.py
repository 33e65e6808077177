"""build_optimizer / MixedOptimizer: routing, exact checkpoints, loss scaling, update in backward, configs."""

import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

import lowprec
import optim

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class Toy(nn.Module):
    """Every route once: a quantized embedding, latent and native layers, a norm, a float head."""

    def __init__(self, d: int = 32, vocab: int = 16):
        super().__init__()
        self.embed = nn.ModuleDict({"tok": nn.Embedding(vocab, d)})
        self.a, self.norm = nn.Linear(d, d), nn.LayerNorm(d)
        self.b, self.c, self.e = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx):
        x = self.norm(self.a(self.embed["tok"](idx)))
        x = torch.relu(self.b(x)) + self.c(x)
        return self.head(self.e(x))


POLICY = {"default": {}, "rules": [
    {"match": "a", "weight": "ternary"},                                   # latent, STE
    {"match": "b", "weight": "binary", "storage": "native"},
    {"match": "c", "weight": "ternary", "storage": "native"},
    {"match": ["e", "embed.tok"], "weight": "fp8_e4m3", "storage": "native"},
]}
# SR noise everywhere it can be: bf16 momenta (Bop, TernaryBop), fp8 moments (SRAdamW)
CFG = {"lr": 1e-2, "weight_decay": 0.1, "seed": 7, "bop": {"gamma": 0.1, "threshold": 1e-6},
       "ternary": {"gamma": 0.1, "threshold": 1e-6}, "sr": {"moment_dtype": "fp8", "moment_block": 64}}


def make(seed: int = 0, policy=POLICY) -> Toy:
    torch.manual_seed(seed)
    model = Toy()
    lowprec.apply_policy(model, policy)
    return model


def batch(i: int):
    """Tokens and their labels under a fixed permutation (learnable: the label is a function of the token)."""
    idx = torch.randint(0, 16, (8, 12), generator=torch.Generator().manual_seed(100 + i))
    return idx, (5 * idx + 3) % 16


def loss_of(model, i: int) -> torch.Tensor:
    idx, tgt = batch(i)
    return F.cross_entropy(model(idx).reshape(-1, 16), tgt.reshape(-1))


def train(model, opt, steps, start=0):
    for i in range(start, start + steps):
        loss_of(model, i).backward()
        opt.step()
        opt.zero_grad()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_identical(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(bits(a), bits(b)), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_bit_identical(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_bit_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_routing_follows_the_layers():
    model = make()
    opt = optim.build_optimizer(model, CFG)
    assert opt.names["latent"] == ["a.weight"]
    assert opt.names["bop"] == ["b"] and opt.names["ternary"] == ["c"]
    assert opt.names["sr"] == ["embed.tok", "e"]
    assert set(opt.names["other"]) == {"a.bias", "norm.weight", "norm.bias", "b.bias", "c.bias", "e.bias",
                                       "head.weight", "head.bias"}
    types = {k: type(v).__name__ for k, v in opt.parts.items()}
    assert types == {"latent": "AdamW", "other": "AdamW", "bop": "Bop", "ternary": "TernaryBop", "sr": "SRAdamW"}
    other = opt.parts["other"].param_groups
    assert [g["weight_decay"] for g in other] == [0.1, 0.0]  # decay only the >= 2-D weight
    assert [tuple(p.shape) for p in other[0]["params"]] == [(16, 32)]
    assert {g["route"] for g in opt.param_groups} == set(optim.mixed.PARTS)
    assert "| bop | Bop | 1 | 1,024 |" in opt.describe()


def test_mixed_model_learns():
    """The whole toy learns a token -> label permutation through every route. Cross-entropy starts
    near ln 16 = 2.77 and can reach 0; a tenth of the start in 60 steps is far from chance (a model
    that learned nothing stays at ln 16) and leaves margin for the noisy latent-free rules."""
    model = make()
    opt = optim.build_optimizer(model, CFG)
    first = loss_of(model, 0).item()
    for i in range(60):
        loss_of(model, i).backward()
        opt.step()
        opt.zero_grad()
    assert loss_of(model, 60).item() < 0.1 * first


def test_state_dict_round_trip_gives_a_bit_identical_next_step():
    model = make(0)
    opt = optim.build_optimizer(model, CFG)
    sched = optim.build_scheduler(opt, {"name": "cosine", "warmup_steps": 2}, total_steps=20)
    for i in range(3):
        loss_of(model, i).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "sched": sched.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)  # weights_only: plain tensors and numbers, nothing pickled

    fresh = make(1)  # a different init: everything must come from the checkpoint
    assert not torch.equal(fresh.b.w_data, model.b.w_data)
    opt2 = optim.build_optimizer(fresh, CFG)
    sched2 = optim.build_scheduler(opt2, {"name": "cosine", "warmup_steps": 2}, total_steps=20)
    fresh.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["optim"])
    sched2.load_state_dict(ckpt["sched"])
    for m, o, s in ((model, opt, sched), (fresh, opt2, sched2)):
        loss_of(m, 3).backward()
        o.step()
        s.step()
        o.zero_grad()
    assert_bit_identical(model.state_dict(), fresh.state_dict(), "model")
    assert_bit_identical(opt.state_dict(), opt2.state_dict(), "optim")
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in opt2.param_groups]


def test_load_rejects_a_different_model():
    opt = optim.build_optimizer(make(), CFG)
    other = make(policy={"default": {}, "rules": [{"match": "b", "weight": "binary", "storage": "native"}]})
    with pytest.raises(ValueError, match="parts"):
        optim.build_optimizer(other, CFG).load_state_dict(opt.state_dict())


@pytest.mark.parametrize("explicit", [False, True])
def test_loss_scaler_unscales_and_checks_native_grads(explicit):
    model, ref = make(0), make(0)
    opt, ref_opt = optim.build_optimizer(model, CFG), optim.build_optimizer(ref, CFG)
    scaler = lowprec.LossScaler("dynamic", init_scale=2.0**16)
    step = (lambda: scaler.step(opt, grads=list(opt.grads()))) if explicit else (lambda: scaler.step(opt))

    scaler.scale(loss_of(model, 0)).backward()
    assert len(list(opt.grads())) == 13  # 9 Parameters + 4 native layers
    model.c.native_grad[0, 0] = float("nan")  # only a native gradient is bad
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert step() is False
    assert scaler.loss_scale == 2.0**15
    assert_bit_identical(before, model.state_dict(), "skipped step")
    opt.zero_grad()
    assert model.c.native_grad is None

    # a good step: S = 2^15 is a power of two, so unscaled gradients equal unscaled-run ones bit for bit
    scaler.scale(loss_of(model, 1)).backward()
    assert step() is True
    opt.zero_grad()
    train(ref, ref_opt, 1, start=1)
    assert_bit_identical(ref.state_dict(), model.state_dict(), "after a scaled step")
    assert_bit_identical(ref_opt.state_dict(), opt.state_dict(), "optimizer")


FUSED = {"latent": {"fused": True}, "other": {"fused": True}}  # torch's fused AdamW (CPU kernel here)


def without_calls(sd):
    """An optimizer state dict without the counts of updates tried (``calls`` on the host, ``draws``
    on the device: a skip counts too)."""
    if isinstance(sd, dict):
        return {k: without_calls(v) for k, v in sd.items() if k not in ("calls", "draws")}
    return sd


def calls(opt) -> list[int]:
    """Each target's count of updates tried, and a native part's count on the device beside it."""
    return [(st["calls"], int(st["draws"]) if "draws" in st else None)
            for part in opt.parts.values() for st in part.state.values() if "calls" in st]


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_a_step_skipped_on_the_device_flag_changes_nothing(fused):
    """``step(found_inf=1)`` after a real step: every part (AdamW latent and other, Bop, TernaryBop,
    SRAdamW with fp8 moments) leaves its weights, moments and step counters bit-identical; only
    the native parts' count of updates tried moves (it seeds the next rounding noise)."""
    model = make(0)
    opt = optim.build_optimizer(model, {**CFG, **(FUSED if fused else {})})
    assert opt.parts["latent"].defaults["fused"] is (True if fused else None)
    loss_of(model, 0).backward()
    opt.step(found_inf=torch.zeros(()))
    opt.zero_grad()
    loss_of(model, 1).backward()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    state.seek(0)
    before, tried = torch.load(state), calls(opt)
    assert all(isinstance(st["step"], torch.Tensor) for part in opt.parts.values() for st in part.state.values())
    opt.step(found_inf=torch.ones(()))
    assert_bit_identical(weights, model.state_dict(), "weights")
    assert_bit_identical(without_calls(before), without_calls(opt.state_dict()), "optimizer state")
    assert calls(opt) == [(n + 1, None if d is None else d + 1) for n, d in tried]


@pytest.mark.parametrize("fused", [False, True], ids=["adamw", "fused-adamw"])
def test_a_step_taken_on_the_device_flag_is_the_plain_step(fused):
    cfg = {**CFG, **(FUSED if fused else {})}
    a, b = make(0), make(0)
    opt_a, opt_b = optim.build_optimizer(a, cfg), optim.build_optimizer(b, cfg)
    for i in range(3):
        for m, o, flag in ((a, opt_a, None), (b, opt_b, torch.zeros(()))):
            loss_of(m, i).backward()
            o.step(found_inf=flag)
            o.zero_grad()
    assert_bit_identical(a.state_dict(), b.state_dict(), "weights")
    assert_bit_identical(opt_a.state_dict(), opt_b.state_dict(), "optimizer")


class Twice(nn.Module):
    """A native layer called twice per forward (as a recurrent weight is)."""

    def __init__(self, d: int = 24):
        super().__init__()
        self.b, self.c, self.e, self.norm = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)

    def forward(self, x):
        x = torch.tanh(self.b(x))
        x = torch.tanh(self.c(x))
        x = self.c(self.norm(x))
        return self.e(x)


def make_twice(seed=0):
    torch.manual_seed(seed)
    m = Twice()
    lowprec.apply_policy(m, {"default": {}, "rules": [
        {"match": "b", "weight": "binary", "storage": "native"},
        {"match": "c", "weight": "ternary", "storage": "native"},
        {"match": "e", "weight": "nvfp4", "storage": "native"}]})
    return m


@pytest.mark.parametrize("with_scaler", [False, True])
def test_update_in_backward_equals_the_ordinary_step(with_scaler):
    """Per-target reseeded rounding noise makes the update independent of when it runs, so updating
    each layer inside backward (c only after its second gradient) is bit-identical to step()."""
    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(0))
    ref, model = make_twice(), make_twice()
    ref_opt = optim.build_optimizer(ref, CFG)
    opt = optim.build_optimizer(model, CFG)
    scaler = lowprec.LossScaler("static", init_scale=2.0**10) if with_scaler else None
    handle = optim.attach_in_backward(model, opt, scaler=scaler)
    for _ in range(3):
        ref(x).pow(2).mean().backward()
        ref_opt.step()
        ref_opt.zero_grad()
        loss = model(x).pow(2).mean()
        (scaler.scale(loss) if scaler else loss).backward()
        assert model.b.native_grad is None and model.c.native_grad is None  # consumed in backward
        scaler.step(opt) if scaler else opt.step()
        opt.zero_grad()
    assert handle.updated == 9
    assert_bit_identical(ref.state_dict(), model.state_dict(), "weights")
    assert_bit_identical(ref_opt.state_dict(), opt.state_dict(), "optimizer")
    handle.remove()
    model(x).sum().backward()
    assert model.c.native_grad is not None  # ordinary accumulation again


@pytest.mark.parametrize("cfg,match", [
    ({"native": {"binary": "AdamW"}}, "has no float Parameter.*cannot update it"),
    ({"native": {"ternary": "SGD"}}, "latent optimizer 'SGD' cannot update it"),
    ({"native": {"float": "bop"}}, r"choose one of \('sr_adamw',\)"),
    ({"native": {"ternary": "Bop"}}, r"native.ternary='Bop': choose one of \('ternary_bop', 'sr_adamw'\)"),
    ({"native": {"fp8": "sr_adamw"}}, "unknown weight kind"),
    ({"latent": {"name": "Bop"}}, "updates native layers only"),
    ({"latent": {"name": "Adamm"}}, "'Adamm' is not an optimizer"),
    ({"bop": {"gamma": 2.0}}, "part 'bop'.*gamma=2.0"),
    ({"bop": {"threshold": -1.0}}, "threshold=-1.0"),
    ({"sr": {"moment_dtype": "int4"}}, "unknown moment_dtype 'int4'"),
    ({"bop": {"momentum": 0.9}}, r"Bop has no argument\(s\) \['momentum'\]"),
    ({"lrr": 1.0}, r"unknown optimizer config key\(s\) \['lrr'\]"),
])
def test_bad_configs_raise(cfg, match):
    with pytest.raises(ValueError, match=match):
        optim.build_optimizer(make(), cfg)


PAIRS = {"adamw": POLICY, "bitnet": "ternary", "binary_native": "binary_native",
         "ternary_native": "ternary_native",
         "sr_adamw": {"default": {"weight": "fp8_e4m3", "storage": "native"},
                      "rules": [{"match": "embed.*", "weight": "bf16", "storage": "latent"}]}}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_hydra_configs_build_and_step(name):
    cfg = OmegaConf.load(CONFIGS / "optim" / f"{name}.yaml")
    policy = PAIRS[name]
    if isinstance(policy, str):
        policy = OmegaConf.load(CONFIGS / "precision" / f"{policy}.yaml")
    model = make(policy=policy)
    opt = optim.build_optimizer(model, cfg)
    sched = optim.build_scheduler(opt, cfg, total_steps=1000)
    first = loss_of(model, 0).item()
    for _ in range(2):
        loss_of(model, 0).backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert torch.isfinite(loss_of(model, 0))
    assert set(OmegaConf.load(CONFIGS / "optim" / f"{name}.yaml")) <= set(optim.mixed.CONFIG_KEYS)
    assert first > 0


def test_native_rules_accept_class_names():
    opt = optim.build_optimizer(make(), {"native": {"binary": "SRAdamW", "ternary": "TernaryBop"}})
    assert opt.names["sr"] == ["embed.tok", "b", "e"] and opt.names["ternary"] == ["c"]


def test_all_configs_are_tested():
    assert {p.stem for p in (CONFIGS / "optim").glob("*.yaml")} == set(PAIRS)


def test_a_deep_copy_of_a_native_model_updates_in_backward_too():
    """copy.deepcopy (as PTQ does) gives each native layer its own gradient carrier and hook."""
    import copy

    x = torch.randn(6, 24, generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(make_twice())
    handle = optim.attach_in_backward(model, optim.build_optimizer(model, CFG))
    model(x).pow(2).mean().backward()
    assert handle.updated == 3 and model.b.native_grad is None and model.c.native_grad is None
