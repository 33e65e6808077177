"""Parameter counts (model vs hand formulas), module names, the meta build and the budget report."""
import sys
import time

import pytest
import torch
from torch import nn

from hybrid import HybridLM, component_budget, param_counts, preset, presets
from lowprec import FORMATS
from hybrid.accounting import PAPER_TABLE1, format_report, model_param_counts, state_bytes


def hand_total(c) -> int:
    """Written out independently of hybrid.accounting."""
    d, V = c.d_model, c.vocab_size
    block = d * c.n_heads * c.head_dim * 2 + d * c.n_kv_heads * c.head_dim * 2 + 2 * d * c.d_ff + 4 * d
    n = V * d + c.max_window * d + c.n_blocks * block + 2 * d + (0 if c.tie_embeddings else V * d)
    if c.memory:
        lstm = 4 * d * d + 4 * d + 4 * d * d + 2 * d
        comp = d * c.compressor_hidden + c.compressor_hidden + c.compressor_hidden * d + d
        fusion = 4 * d * d + 2 * d * d + d + 2 * d
        n += c.rnn_layers * lstm + comp + fusion
    return n


@pytest.mark.parametrize("name", list(presets))
def test_meta_counts_match_hand_formulas(name):
    cfg = presets[name]
    with torch.device("meta"):
        model = HybridLM(cfg)
    assert model_param_counts(model) == param_counts(cfg)
    assert model.num_params() == hand_total(cfg) == sum(param_counts(cfg).values())


def test_paper_exact_counts_and_fast_meta_build():
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = HybridLM(preset("paper"))
    assert time.perf_counter() - t0 < 10
    assert all(p.is_meta for p in model.parameters())
    c = param_counts(preset("paper"))
    # the audit of docs/hybrid.md: 352.20B blocks, 34.36B LSTM, 1.07 + 0.54 + 0.27B fusion, 392.73B total
    assert c["blocks.attn"] + c["blocks.ffn"] == 128 * 2_751_463_424 == 352_187_318_272
    assert c["blocks.norm"] == 128 * 4 * 16384
    assert c["rnn.lstm"] == 16 * (8 * 16384**2 + 6 * 16384) == 34_361_311_232
    assert c["fusion.xattn"] == 1_073_741_824
    assert c["fusion.gate"] == 536_870_912 + 16384
    assert c["rnn.compressor"] == 268_435_456 + 8192 + 16384
    assert c["embed.tok"] == c["head"] == 1_073_741_824 and c["embed.pos"] == 2_147_483_648
    assert sum(c.values()) == model.num_params() == 392_731_140_096
    assert round(sum(PAPER_TABLE1.values()), 2) == 357.14


def test_tiny_module_names_are_the_papers_words():
    model = HybridLM(preset("tiny"))
    names = {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding, nn.LayerNorm))}
    expect = {"embed.tok", "embed.pos", "fusion.norm", "fusion.gate", "norm_f", "head",
              "rnn.compressor.fc1", "rnn.compressor.fc2"}
    expect |= {f"fusion.xattn.{x}" for x in "qkvo"}
    expect |= {f"rnn.lstm.{n}.{x}" for n in range(2) for x in ("ih", "hh", "norm")}
    expect |= {f"blocks.{b}.{x}" for b in range(2) for x in
               ("norm1", "attn.q", "attn.k", "attn.v", "attn.o", "norm2", "ffn.up", "ffn.down")}
    assert names == expect
    # every parameter lives in a Linear, an Embedding or a LayerNorm (what apply_policy can see)
    owners = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    assert owners <= names
    assert type(model.embed["tok"]) is nn.Embedding and type(model.rnn.lstm[0].hh) is nn.Linear
    assert model.rnn.lstm[0].ih.bias is not None and model.rnn.lstm[0].hh.bias is None


def test_memory_off_has_no_rnn_or_fusion():
    model = HybridLM(preset("tiny").replace(memory=False))
    assert not any(n.startswith(("rnn", "fusion")) for n, _ in model.named_modules())
    logits, state = model(torch.randint(0, 32, (2, 16)))
    assert logits.shape == (2, 16, 32) and state.pos == 16 and state.nbytes == 8  # only the position


class _NoWeightLinear(nn.Module):
    """Same call signature as nn.Linear, but no `.weight` attribute: what a swapped layer may look like."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.w = nn.Parameter(lin.weight.detach().clone())
        self.b = None if lin.bias is None else nn.Parameter(lin.bias.detach().clone())

    def forward(self, x):
        return nn.functional.linear(x, self.w, self.b)


@pytest.mark.parametrize("mode", ["stream", "chunked"])
def test_forward_only_calls_linear_modules(mode):
    """apply_policy swaps Linears in place: forward must call them, never read their `.weight`."""
    torch.manual_seed(0)
    model = HybridLM(preset("tiny").replace(rnn_mode=mode))
    x = torch.randint(0, 32, (2, 16))
    ref, _ = model(x)
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, _NoWeightLinear(mod))
    out, _ = model(x)
    # exact: the replacement performs the very same F.linear on the same tensors
    assert torch.equal(out, ref)


def test_component_budget_bits_and_flops():
    cfg = preset("paper")
    bits = {"embed.tok": 8.0}
    rows = {r.component: r for r in component_budget(cfg, lambda n: bits.get(n, 4.5), window=32768)}
    assert rows["embed.tok"].nbytes == 1_073_741_824  # 8 bits per weight, no other params
    assert rows["blocks.ffn"].nbytes == 274_877_906_944 * 4.5 / 8
    assert rows["rnn.lstm"].nbytes == 34_359_738_368 * 4.5 / 8 + 16 * 6 * 16384 * 4  # biases/norms fp32
    assert rows["blocks.ffn"].flops_per_token == 6 * 274_877_906_944
    # self-attention scores: 12 · blocks · H·hd · (T+1)/2
    assert rows["blocks.attn"].attention_flops == 12 * 128 * 16384 * 32769 / 2
    s = state_bytes(cfg, 131072)
    assert s["kv_cache"] == 2 * 128 * 16 * 128 * 131072 * 2 and s["memory_bank"] == 2048 * 16384 * 2
    chunked = {r.component: r for r in component_budget(cfg.replace(rnn_mode="chunked"), lambda n: 16)}
    assert chunked["rnn.lstm"].matmul_flops == 6 * 34_359_738_368 * (1 + 1 / 64)


def test_report_states_every_paper_difference():
    text = format_report(preset("tiny"), lambda n: 16.0)
    assert "meta-built model == hand formulas" in text
    for row in PAPER_TABLE1:
        assert f"| {row} |" in text


def test_budget_app_runs(monkeypatch, capsys):
    """The Hydra app in this process: the model group is hybrid's presets, the policy a config file."""
    from hybrid import budget

    monkeypatch.setattr(sys, "argv", ["hybrid.budget", "model=tiny", "precision=nvfp4", "kv_bits=8"])
    budget.main()
    out = capsys.readouterr().out
    assert "| **total** |" in out and "counts one of the two" in out
    assert "precision: nvfp4; window T=16" in out


def test_bits_from_policy_uses_weight_effective_bits():
    """The report's bits per weight are the real policy's weight format's effective_bits."""
    from hybrid.budget import bits_from_policy

    bits_of = bits_from_policy({"name": "t", "default": {"weight": "fp8_e4m3"},
                                "rules": [{"match": "blocks.*.ffn.*", "weight": "nvfp4"},
                                          {"match": "rnn.*", "weight": "ternary"}]})
    # nvfp4: 4-bit E2M1 + one 8-bit E4M3 scale per 16 elements = 4.5; fp8: 8; ternary: packed 2-bit codes
    assert bits_of("blocks.0.ffn.up") == 4.5
    assert bits_of("head") == bits_of("blocks.3.attn.q") == 8.0
    assert bits_of("rnn.lstm.0.hh") == FORMATS["ternary"].effective_bits
