"""Precision policies: rule order and overrides, globs, load-time errors, the shipped presets,
command-line overrides through Hydra, and apply_policy's swap and report."""

import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from lowprec.formats import FORMATS, format
from lowprec.nn import QEmbedding, QLinear
from lowprec.policy import PolicyReport, PrecisionPolicy, apply_policy
from lowprec.precision import FULL_PRECISION, LayerPrecision

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(p.stem for p in (CONFIGS / "precision").glob("*.yaml"))
E4M3, E5M2 = FORMATS["fp8_e4m3"], FORMATS["fp8_e5m2"]
ROW = dict(granularity="row")


def load(name: str) -> PrecisionPolicy:
    return PrecisionPolicy.from_config(OmegaConf.load(CONFIGS / "precision" / f"{name}.yaml"))


# ---- resolution ---------------------------------------------------------------------------------

def test_default_is_folded_over_full_precision():
    p = PrecisionPolicy(default={"weight": "bf16"})
    assert p.resolve("anything") == LayerPrecision(weight=FORMATS["bf16"])
    assert PrecisionPolicy().resolve("x") == FULL_PRECISION


def test_later_rule_wins_field_by_field():
    p = PrecisionPolicy.from_config({
        "default": {"weight": "bf16", "input": "bf16"},
        "rules": [
            {"match": "blocks.*", "weight": "fp8_e4m3", "grad": "fp8_e5m2", "backend": "emulated"},
            {"match": "blocks.*.ffn.*", "weight": "ternary", "input": "int8"},
        ]})
    ffn = p.resolve("blocks.3.ffn.up")
    assert ffn.weight == FORMATS["ternary"]                  # second rule overrides the first
    assert ffn.input == format("int8", **ROW)                 # bare activation name: per token
    assert ffn.grad == format("fp8_e5m2", **ROW)              # kept from the first rule
    assert ffn.backend == "emulated"                          # kept from the first rule
    attn = p.resolve("blocks.3.attn.q")
    assert (attn.weight, attn.input) == (E4M3, FORMATS["bf16"])
    assert p.resolve("head").weight == FORMATS["bf16"]         # default only
    assert [r.source for r in p.matching("blocks.3.ffn.up")] == ["rules[0]", "rules[1]"]


def test_order_matters():
    a = {"match": "head", "weight": "fp8_e4m3"}
    b = {"match": "*", "weight": "ternary"}
    assert PrecisionPolicy(rules=[a, b]).resolve("head").weight == FORMATS["ternary"]
    assert PrecisionPolicy(rules=[b, a]).resolve("head").weight == E4M3


def test_null_resets_an_operand_to_full_precision():
    p = PrecisionPolicy(default={"weight": "fp8_e4m3", "input": "fp8_e4m3"},
                        rules=[{"match": "embed.*", "input": None}])
    assert p.resolve("embed.tok").input is None and p.resolve("embed.tok").weight == E4M3


@pytest.mark.parametrize("glob, hits, misses", [
    # fnmatch's * crosses dots
    ("blocks.*.ffn.*", ["blocks.0.ffn.up", "blocks.127.ffn.down"], ["blocks.0.attn.q", "head", "blocks.ffn.up"]),
    ("blocks.1*", ["blocks.1.attn.q", "blocks.10.ffn.up", "blocks.127.attn.o"], ["blocks.2.attn.q"]),
    ("blocks.[0-3].attn.?", ["blocks.3.attn.q"], ["blocks.4.attn.q", "blocks.13.attn.q", "blocks.3.attn.qq"]),
    ("head", ["head"], ["head.x", "heads", "Head"]),               # whole name, case-sensitive
    ("rnn.lstm.*.hh", ["rnn.lstm.0.hh", "rnn.lstm.15.hh"], ["rnn.lstm.0.ih"]),
])
def test_globs(glob, hits, misses):
    rule = PrecisionPolicy(rules=[{"match": glob, "weight": "ternary"}]).rules[0]
    assert all(rule.matches(n) for n in hits)
    assert not any(rule.matches(n) for n in misses)


def test_list_of_globs_matches_any():
    p = PrecisionPolicy(rules=[{"match": ["embed.*", "head"], "weight": "bf16"}])
    assert p.resolve("embed.pos").weight == FORMATS["bf16"]
    assert p.resolve("head").weight == FORMATS["bf16"]
    assert p.resolve("blocks.0.attn.q").weight is None


def test_override_key_appends_rules_last():
    base = {"name": "t", "default": {"weight": "bf16"},
            "rules": [{"match": "blocks.*.ffn.*", "weight": "fp8_e4m3"}, {"match": "*", "grad": "fp8_e5m2"}]}
    one = PrecisionPolicy.from_config({**base, "override": {"match": "blocks.*.ffn.*", "weight": "ternary"}})
    assert one.rules[-1].source == "override"
    assert one.resolve("blocks.0.ffn.up").weight == FORMATS["ternary"]
    assert one.resolve("blocks.0.ffn.up").grad == format("fp8_e5m2", **ROW)
    two = PrecisionPolicy.from_config({**base, "override": [{"match": "head", "weight": "binary"},
                                                            {"match": "head", "ste": "clipped"}]})
    assert [r.source for r in two.rules[-2:]] == ["override[0]", "override[1]"]
    assert (two.resolve("head").weight, two.resolve("head").ste) == (FORMATS["binary"], "clipped")


def test_to_config_round_trips():
    p = load("paper")
    q = PrecisionPolicy.from_config(p.to_config())
    for n in ("embed.tok", "blocks.0.ffn.up", "rnn.lstm.0.hh", "head", "norm_f"):
        assert p.resolve(n) == q.resolve(n)


# ---- load-time errors name the rule and the bad value -------------------------------------------

@pytest.mark.parametrize("cfg, needles", [
    ({"rules": [{"match": "a", "weight": "bf16"}, {"match": "blocks.*.ffn.*", "weight": "fp9"}]},
     ["rules[1]", "'blocks.*.ffn.*'", "'fp9'", "fp8_e4m3"]),
    ({"rules": [{"match": "head", "wieght": "bf16"}]}, ["rules[0]", "'head'", "wieght", "weight"]),
    ({"rules": [{"match": "head", "storage": "packed"}]}, ["rules[0]", "'packed'", "native"]),
    ({"rules": [{"match": "head", "weight": {"format": "fp8_e4m3", "granularity": "rows"}}]},
     ["rules[0]", "'rows'", "block"]),
    ({"rules": [{"weight": "bf16"}]}, ["rules[0]", "no 'match'", "weight"]),
    ({"rules": [{"match": [], "weight": "bf16"}]}, ["rules[0]", "'match'"]),
    ({"rules": [{"match": "x"}], "override": {"match": ["a", "b"], "grad": "e5m2"}},
     ["override", "['a', 'b']", "'e5m2'"]),
    ({"name": "mine", "rule": []}, ["'mine'", "'rule'", "rules"]),
    ({"default": {"weight": "fp7"}}, ["default", "'fp7'"]),
    ({"rules": [{"match": "h", "weight": "fp8_e4m3", "ste": "approx_sign"}]}, ["rules[0]", "approx_sign", "binary"]),
])
def test_load_errors_name_rule_and_value(cfg, needles):
    with pytest.raises(ValueError) as e:
        PrecisionPolicy.from_config(cfg)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_a_rule_is_checked_alone_then_in_combination_at_resolve():
    # storage: native alone is a valid rule (an earlier rule may give the weight format) ...
    p = PrecisionPolicy(rules=[{"match": "blocks.*", "weight": "ternary"}, {"match": "*", "storage": "native"}])
    assert p.resolve("blocks.0.ffn.up").storage == "native"
    # ... but a module that no rule gives a weight format cannot be native: named at resolve
    with pytest.raises(ValueError, match=r"module 'head'.*rules\[1\].*needs a weight format"):
        p.resolve("head")


# ---- shipped presets -----------------------------------------------------------------------------

def test_every_preset_ships():
    assert set(PRESETS) >= {"bf16", "fp8", "fp8_delayed", "paper", "ternary", "binary", "nvfp4", "ternary_native",
                            "binary_native"}


@pytest.mark.parametrize("name", PRESETS)
def test_preset_loads_and_resolves_hybrid_names(name):
    p = load(name)
    assert p.name == name
    for n in ("embed.tok", "embed.pos", "rnn.lstm.0.ih", "rnn.lstm.15.hh", "rnn.compressor.fc1",
              "fusion.xattn.q", "fusion.gate", "blocks.0.attn.q", "blocks.127.ffn.down", "head"):
        prec = p.resolve(n)
        assert prec.weight is not None, (name, n)   # hybrid.budget reads weight.effective_bits


def test_paper_preset_allocation():
    """FP8 attention, embeddings and fusion, FP4 E2M1 feed-forward and head weights with a scale per output
    row, FP8 activations and gradients with one scale per tensor, fp16 RNN."""
    p = load("paper")
    tensor = dict(granularity="tensor")
    for n in ("blocks.5.attn.q", "blocks.5.attn.o", "fusion.xattn.k", "fusion.gate", "embed.tok", "embed.pos"):
        prec = p.resolve(n)
        assert (prec.weight, prec.grad) == (E4M3, format("fp8_e5m2", **tensor)), n
        assert prec.input == (None if n.startswith("embed") else format("fp8_e4m3", **tensor)), n
    for n in ("blocks.5.ffn.up", "blocks.5.ffn.down", "head"):
        prec = p.resolve(n)
        assert prec.weight == format("fp4_e2m1", **ROW) and prec.weight.effective_bits == 4
        assert (prec.input, prec.grad) == (format("fp8_e4m3", **tensor), format("fp8_e5m2", **tensor))
    for n in ("rnn.lstm.3.ih", "rnn.lstm.3.hh", "rnn.compressor.fc2"):
        prec = p.resolve(n)
        assert (prec.weight, prec.input, prec.grad) == (FORMATS["fp16"],) * 3


def test_fp8_preset_is_te_hybrid_tensorwise():
    p = load("fp8")
    tensor = dict(granularity="tensor")
    for n in ("blocks.0.attn.q", "blocks.0.ffn.up", "rnn.lstm.0.hh", "head"):
        assert p.resolve(n).describe() == "w=fp8_e4m3[absmax/tensor] x=fp8_e4m3[absmax/tensor] g=fp8_e5m2[absmax/tensor]"
    assert p.resolve("embed.tok").weight == E4M3 and p.resolve("embed.tok").input is None
    assert p.resolve("head").grad == format("fp8_e5m2", **tensor)


def test_fp8_delayed_preset_is_fp8_with_the_history():
    """fp8_delayed: every layer as under fp8 (formats, embeddings' input), with delayed scaling over 16 steps."""
    fp8, delayed = load("fp8"), load("fp8_delayed")
    for n in ("blocks.0.attn.q", "blocks.0.ffn.up", "rnn.lstm.0.hh", "fusion.gate", "embed.tok", "head"):
        a, b = fp8.resolve(n), delayed.resolve(n)
        assert (b.weight, b.input, b.grad) == (a.weight, a.input, a.grad), n
        assert (a.scaling, b.scaling, b.amax_history) == ("current", "delayed", 16), n


@pytest.mark.parametrize("name, weight, ste", [("ternary", "ternary", "identity"), ("binary", "binary", "clipped")])
@pytest.mark.parametrize("native", [False, True])
def test_bitnet_presets(name, weight, ste, native):
    p = load(name + "_native" * native)
    ffn = p.resolve("blocks.0.ffn.up")
    assert ffn.weight == FORMATS[weight] and ffn.input == format("int8", **ROW) and ffn.grad is None
    assert (ffn.ste, ffn.storage) == (ste, "native" if native else "latent")
    for n in ("embed.tok", "head"):   # kept in bf16 with a float master, as BitNet does
        prec = p.resolve(n)
        assert (prec.weight, prec.storage, prec.ste) == (FORMATS["bf16"], "latent", "identity")


def test_nvfp4_preset():
    p = load("nvfp4")
    prec = p.resolve("blocks.0.ffn.up")
    assert prec.weight == prec.input == prec.grad == FORMATS["nvfp4"]
    assert prec.grad_rounding == "stochastic" and prec.weight.effective_bits == 4.5
    assert p.resolve("head").weight == FORMATS["bf16"] and p.resolve("head").grad_rounding == "nearest"


# ---- command-line overrides through Hydra --------------------------------------------------------

FFN_TERNARY = '+precision.override={match: "blocks.*.ffn.*", weight: ternary}'


def compose(*overrides):
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="_test_policy_app", node={"defaults": ["_self_", {"precision": "bf16"}]})
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return hydra_compose("_test_policy_app", overrides=list(overrides))


@pytest.mark.parametrize("override", [
    FFN_TERNARY,
    '+precision.override={match: blocks.*.ffn.*, weight: ternary}',            # unquoted glob parses too
    '++precision.override={match: "blocks.*.ffn.*", weight: ternary}',
    '+precision.override=[{match: "blocks.*.ffn.*", weight: ternary}]',
])
def test_hydra_override_changes_one_rule(override):
    paper = PrecisionPolicy.from_config(compose("precision=paper").precision)
    p = PrecisionPolicy.from_config(compose("precision=paper", override).precision)
    assert p.name == "paper" and len(p.rules) == len(paper.rules) + 1
    up, ref = p.resolve("blocks.7.ffn.up"), paper.resolve("blocks.7.ffn.up")
    assert up.weight == FORMATS["ternary"]
    assert (up.input, up.grad) == (ref.input, ref.grad)          # the other fields of the rule stay
    for n in ("head", "blocks.7.attn.q", "rnn.lstm.0.ih", "embed.tok"):
        assert p.resolve(n) == paper.resolve(n), n               # FP4 head untouched by the glob


def test_hydra_override_by_rule_index():
    p = PrecisionPolicy.from_config(compose("precision=paper", "precision.rules.3.weight=ternary").precision)
    assert p.resolve("blocks.0.ffn.up").weight == p.resolve("head").weight == FORMATS["ternary"]


def test_hydra_override_with_a_typo_fails_at_load():
    with pytest.raises(ValueError, match=r"override \(match 'blocks\.\*\.ffn\.\*'\).*'ternery'"):
        PrecisionPolicy.from_config(compose(
            "precision=paper", '+precision.override={match: "blocks.*.ffn.*", weight: ternery}').precision)


# ---- apply_policy on a model named like hybrid.HybridLM ------------------------------------------

def _mod(**children) -> nn.Module:
    m = nn.Module()
    for k, v in children.items():
        setattr(m, k, v)
    return m


def _attn(d):
    return _mod(q=nn.Linear(d, d, bias=False), k=nn.Linear(d, d, bias=False), v=nn.Linear(d, d, bias=False),
                o=nn.Linear(d, d, bias=False))


class MiniHybrid(nn.Module):
    """hybrid.HybridLM's module names (embed.tok, rnn.lstm.N.ih/hh, rnn.compressor.fc1/2,
    fusion.xattn.q/k/v/o, fusion.gate, blocks.N.attn.*, blocks.N.ffn.up/down, head) on toy maths."""

    def __init__(self, d=16, vocab=11, ff=32, blocks=2, rnn_layers=2, window=8):
        super().__init__()
        self.d = d
        self.embed = nn.ModuleDict({"tok": nn.Embedding(vocab, d), "pos": nn.Embedding(window, d)})
        self.rnn = _mod(lstm=nn.ModuleList(_mod(ih=nn.Linear(d, 4 * d), hh=nn.Linear(d, 4 * d, bias=False),
                                                norm=nn.LayerNorm(d)) for _ in range(rnn_layers)),
                        compressor=_mod(fc1=nn.Linear(d, d // 2), fc2=nn.Linear(d // 2, d)))
        self.fusion = _mod(norm=nn.LayerNorm(d), xattn=_attn(d), gate=nn.Linear(2 * d, d))
        self.blocks = nn.ModuleList(_mod(norm1=nn.LayerNorm(d), attn=_attn(d), norm2=nn.LayerNorm(d),
                                         ffn=_mod(up=nn.Linear(d, ff, bias=False), down=nn.Linear(ff, d, bias=False)))
                                    for _ in range(blocks))
        self.norm_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx):
        d = self.d
        h = self.embed.tok(idx) + self.embed.pos(torch.arange(idx.shape[-1]))
        m = h
        for layer in self.rnn.lstm:
            m = layer.norm(m + torch.tanh(layer.ih(m)[..., :d]) * torch.sigmoid(layer.hh(m)[..., :d]))
        m = self.rnn.compressor.fc2(torch.nn.functional.gelu(self.rnn.compressor.fc1(m)))
        x = self.fusion.xattn
        c = x.o(torch.tanh(x.q(self.fusion.norm(h)) * x.k(m)) + x.v(m))
        h = h + torch.sigmoid(self.fusion.gate(torch.cat([h, c], -1))) * c
        for b in self.blocks:
            n = b.norm1(h)
            h = h + b.attn.o(torch.tanh(b.attn.q(n) * b.attn.k(n)) + b.attn.v(n))
            h = h + b.ffn.down(torch.nn.functional.gelu(b.ffn.up(b.norm2(h))))
        return self.head(self.norm_f(h))


def mini(seed=0, **kw):
    torch.manual_seed(seed)
    return MiniHybrid(**kw)


IDX = torch.tensor([[1, 5, 2, 9, 0, 3, 3, 7], [4, 4, 10, 6, 8, 1, 2, 0]])


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, QLinear, QEmbedding))}


def test_apply_swaps_every_layer_and_keeps_parameters():
    model = mini()
    before = layers(model)
    params = {n: (m.weight, getattr(m, "bias", None)) for n, m in before.items()}
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    policy = load("paper")
    report = apply_policy(model, policy, strict=True)
    after = layers(model)
    assert list(after) == list(before) == [r.name for r in report.layers]
    for n, m in after.items():
        assert type(m) is (QEmbedding if n.startswith("embed.") else QLinear), n
        assert m.precision == policy.resolve(n), n
        assert m.weight is params[n][0], n                       # latent: the very same Parameter
        assert getattr(m, "bias", None) is params[n][1], n
    assert [m for m in model.modules() if isinstance(m, nn.LayerNorm)] == norms
    assert report.unmatched_rules == []
    assert model(IDX).shape == (2, 8, 11)


def test_apply_leaves_full_precision_layers_alone():
    model = mini()
    before = layers(model)
    report = apply_policy(model, {"name": "ffn", "rules": [{"match": "blocks.*.ffn.*", "weight": "ternary"}]})
    for n, m in layers(model).items():
        if ".ffn." in n:
            assert isinstance(m, QLinear) and m.weight is before[n].weight
        else:
            assert m is before[n], n
    row = {r.name: r for r in report.layers}
    assert (row["head"].weight, row["head"].storage, row["head"].bits_per_weight) == ("fp32", "float", 32.0)
    assert row["blocks.1.ffn.up"].weight == "ternary[absmean/tensor]"


def test_full_precision_policy_is_exact():
    ref = mini()(IDX)
    model = mini()
    report = apply_policy(model, {"default": {"weight": "fp32", "input": None}, "rules": [{"match": "*", "grad": "none"}]})
    assert not any(isinstance(m, (QLinear, QEmbedding)) for m in model.modules())
    assert torch.equal(model(IDX), ref)                           # nothing changed: bit for bit
    assert report.total_resident_bytes == report.total_format_bytes == 4 * report.total_params


def test_bf16_policy_is_fp32_within_bf16_rounding():
    """Each QLinear computes fp32(bf16(x) @ bf16(W)^T) + b. bf16 keeps 8 significant bits, so
    round-to-nearest moves each operand by at most u = 2^-8 relative, each product by at most
    2u + u^2 = 2^-7 + 2^-16; fp32 accumulation over K terms adds at most K*2^-24 on each side.
    Hence, per element, |y_bf16 - y_fp32| <= (2^-7 + 2^-16 + 2*K*2^-24) * (|x| @ |W|^T).
    Embeddings are exactly bf16(W)[idx], so |delta| <= 2^-8 |w|."""
    model = mini()
    apply_policy(model, load("bf16"), strict=True)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in layers(model).items()]
    model(IDX)
    for h in hooks:
        h.remove()
    assert len(seen) == len(layers(model))
    changed = 0
    for n, (x, y) in seen.items():
        m = layers(model)[n]
        if isinstance(m, QEmbedding):
            ref = torch.nn.functional.embedding(x, m.weight)
            assert torch.equal(y, torch.nn.functional.embedding(x, m.weight.bfloat16().float())), n
            assert ((y - ref).abs() <= 2**-8 * ref.abs()).all(), n
        else:
            ref = torch.nn.functional.linear(x, m.weight, m.bias)
            K = x.shape[-1]
            bound = (2**-7 + 2**-16 + 2 * K * 2**-24) * (x.abs() @ m.weight.abs().t())
            assert ((y - ref).abs() <= bound).all(), n
        changed += not torch.equal(y, ref)
    assert changed > 0                                            # bf16 really was applied


def test_report_bytes_by_hand():
    model = nn.Sequential()
    model.add_module("ffn", _mod(up=nn.Linear(32, 24, bias=True), down=nn.Linear(24, 32, bias=False)))
    report = apply_policy(model, {"name": "t", "rules": [{"match": "ffn.up", "weight": "ternary", "input": "int8"}]})
    up, down = report.layers
    assert up.format_bytes == 24 * 32 // 4 + 4 + 24 * 4            # 2-bit codes + one fp32 scale + fp32 bias
    assert up.resident_bytes == 24 * 32 * 4 + 24 * 4               # latent: the fp32 master is what stays
    assert up.bits_per_weight == 2 + 32 / (24 * 32)
    assert down.format_bytes == down.resident_bytes == 24 * 32 * 4
    assert report.total_params == 24 * 32 + 24 + 24 * 32
    assert report.total_format_bytes == up.format_bytes + down.format_bytes
    assert report.bf16_bytes == 2 * report.total_params
    native = apply_policy(model, {"rules": [{"match": "ffn.up", "weight": "ternary", "storage": "native"}]})
    up_n = native.layers[0]
    assert up_n.resident_bytes == up_n.format_bytes == 24 * 32 // 4 + 4 + 24 * 4
    assert up_n.bits_per_weight == model.ffn.up.weight_bits()
    rows = report.to_rows()
    assert list(rows[0]) == list(PolicyReport.COLUMNS) and rows[0]["format_bytes"] == up.format_bytes
    text = str(report)
    assert "| ffn.up | Linear | ternary[absmean/tensor] | int8[absmax/row] |" in text and "**total**" in text


def test_unmatched_rules_warn_or_fail():
    policy = {"name": "typo", "rules": [{"match": "blocks.*.ffn.*", "weight": "ternary"},
                                        {"match": "block.*.attn.*", "weight": "fp8_e4m3"},
                                        {"match": "blocks.*.attn", "weight": "fp8_e4m3"}]}   # a container, no layer
    with pytest.warns(UserWarning, match=r"rules\[1\] \(match 'block\.\*\.attn\.\*'\), rules\[2\]"):
        report = apply_policy(mini(), policy)
    assert [r.source for r in report.unmatched_rules] == ["rules[1]", "rules[2]"]
    assert "rules that matched no layer: rules[1]" in str(report)
    model = mini()
    before = layers(model)
    with pytest.raises(ValueError, match=r"'typo'.*rules\[1\] \(match 'block\.\*\.attn\.\*'\)"):
        apply_policy(model, policy, strict=True)
    assert layers(model) == before                                # strict fails before swapping anything
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_policy(mini(), load("paper"))                       # every paper rule matches


def test_reapplying_rebuilds_from_the_float_weight():
    model = mini()
    w = model.blocks[0].ffn.up.weight
    apply_policy(model, load("ternary"))
    q = model.blocks[0].ffn.up
    apply_policy(model, load("ternary"))
    assert model.blocks[0].ffn.up is q                            # same precision: kept as is
    apply_policy(model, load("fp8"))
    assert model.blocks[0].ffn.up.precision == load("fp8").resolve("blocks.0.ffn.up")
    assert model.blocks[0].ffn.up.weight is w
    apply_policy(model, {"name": "fp32"})
    assert type(model.blocks[0].ffn.up) is nn.Linear and model.blocks[0].ffn.up.weight is w
    assert type(model.embed.tok) is nn.Embedding
    ref = model(IDX)
    apply_policy(model, load("ternary_native"))
    codes = model.blocks[0].ffn.up.native_weight
    apply_policy(model, {"name": "back", "default": {"weight": "ternary"}})      # native -> latent
    latent = model.blocks[0].ffn.up
    assert latent.precision.storage == "latent"
    assert torch.equal(latent.weight.detach(), codes.dequantize())   # starts from the packed values
    assert model(IDX).shape == ref.shape


def test_shared_modules_and_tied_weights():
    model = mini()
    model.alias = model.blocks[0].ffn                              # one module, two names
    apply_policy(model, {"rules": [{"match": "*.up", "weight": "ternary"}]})
    assert model.alias.up is model.blocks[0].ffn.up and isinstance(model.alias.up, QLinear)
    with pytest.raises(ValueError, match="shared under names"):
        apply_policy(mini_alias(), {"rules": [{"match": "blocks.*", "weight": "ternary"}]})
    tied = mini()
    tied.head.weight = tied.embed.tok.weight
    apply_policy(tied, load("paper"))                              # latent: still tied
    assert tied.head.weight is tied.embed.tok.weight
    tied = mini()
    tied.head.weight = tied.embed.tok.weight
    with pytest.raises(ValueError, match="'embed.tok' and 'head' share one weight"):
        apply_policy(tied, {"rules": [{"match": ["head", "embed.tok"], "weight": "ternary", "storage": "native"}]})


def mini_alias():
    m = mini()
    m.alias = m.blocks[0].ffn
    return m


def test_multihead_attention_out_proj_and_root_layer():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    report = apply_policy(model, {"default": {"weight": "ternary"}})
    assert [r.name for r in report.layers] == ["1"]               # MHA reads out_proj.weight itself
    assert type(model[0].out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
    with pytest.raises(ValueError, match="wrap it"):
        apply_policy(nn.Linear(4, 4), {"default": {"weight": "ternary"}})


def test_meta_model_report_from_shapes():
    """A paper-width slice (d=16384, FFN 65536) on the meta device under the paper policy; every
    byte counted by hand from the formats: FP8 weight 1 byte + one fp32 tensor scale; FP4 rows
    1/2 byte + one fp32 scale per output row; FP16 2 bytes; fp32 biases 4 bytes."""
    d, ff, vocab = 16384, 65536, 65536
    with torch.device("meta"):
        model = MiniHybrid(d=d, vocab=vocab, ff=ff, blocks=1, rnn_layers=1, window=2048)
    report = apply_policy(model, load("paper"), strict=True)
    assert all(p.device.type == "meta" for p in model.parameters())
    fp8 = lambda o, i: o * i + 4                                   # noqa: E731
    fp4_rows = lambda o, i: o * i // 2 + 4 * o                      # noqa: E731
    expect = {
        "embed.tok": fp8(vocab, d), "embed.pos": fp8(2048, d),
        "rnn.lstm.0.ih": 2 * 4 * d * d + 4 * 4 * d, "rnn.lstm.0.hh": 2 * 4 * d * d,
        "rnn.compressor.fc1": 2 * d * d // 2 + 4 * d // 2, "rnn.compressor.fc2": 2 * d * d // 2 + 4 * d,
        **{f"fusion.xattn.{k}": fp8(d, d) for k in "qkvo"}, "fusion.gate": fp8(d, 2 * d) + 4 * d,
        **{f"blocks.0.attn.{k}": fp8(d, d) for k in "qkvo"},
        "blocks.0.ffn.up": fp4_rows(ff, d), "blocks.0.ffn.down": fp4_rows(d, ff), "head": fp4_rows(vocab, d),
    }
    got = {r.name: r.format_bytes for r in report.layers}
    assert got == expect
    assert report.total_format_bytes == sum(expect.values())
    n = sum(p.numel() for name, m in model.named_modules() if isinstance(m, (QLinear, QEmbedding))
            for p in m.parameters(recurse=False))
    assert report.total_params == n and report.total_resident_bytes == 4 * n   # latent fp32 masters
    with torch.device("meta"):
        native = MiniHybrid(d=d, vocab=vocab, ff=ff, blocks=1, rnn_layers=1, window=2048)
    rep = apply_policy(native, load("ternary_native"))
    up = {r.name: r for r in rep.layers}["blocks.0.ffn.up"]
    assert up.resident_bytes == up.format_bytes == ff * d // 4 + 4


def test_meta_and_real_reports_agree():
    with torch.device("meta"):
        fake = MiniHybrid()
    for name in ("paper", "ternary_native", "nvfp4", "binary"):   # re-applied in turn on the meta model
        a, b = apply_policy(mini(), load(name)), apply_policy(fake, load(name))
        for ra, rb in zip(a.layers, b.layers):
            assert (ra.name, ra.format_bytes, ra.resident_bytes, ra.params) == \
                   (rb.name, rb.format_bytes, rb.resident_bytes, rb.params), name


def test_hydra_override_reaches_the_model():
    model = mini()
    report = apply_policy(model, PrecisionPolicy.from_config(compose("precision=paper", FFN_TERNARY).precision))
    rows = {r.name: r for r in report.layers}
    assert rows["blocks.1.ffn.down"].weight == "ternary[absmean/tensor]"
    assert rows["head"].weight == "fp4_e2m1[absmax/row]"


def test_refreshed_report_reads_the_backend_where_the_model_runs():
    """The backend column is filled when the policy is applied (here on the meta device, as before
    a run moves its model); refreshed() re-reads it from the layers once they are placed. The rows
    keep everything else."""
    with torch.device("meta"):
        model = MiniHybrid()
    report = apply_policy(model, load("paper"))
    lin = [r for r in report.layers if r.kind == "Linear" and r.storage == "latent"]
    assert lin and all("not placed yet" in r.backend for r in lin)
    model.to_empty(device="cpu")
    fresh = report.refreshed(model)
    mods = dict(model.named_modules())
    for old, new in zip(report.layers, fresh.layers):
        assert new.backend == mods[old.name].backend_note()
        assert replace(new, backend=old.backend) == old
    assert all(r.backend.startswith("emulated") for r in fresh.layers if r.kind == "Linear")
    assert fresh.unquantized_gemms(model) == []          # no layer has run yet, and the CPU emulates
