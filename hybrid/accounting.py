"""Accounting: exact parameters, resident bytes, training FLOPs and state bytes per component.

    (the Hydra app around it: `python -m hybrid.budget model=paper precision=paper`)

Parameters are counted twice — by hand formulas (`param_counts`) and from the model built on the
meta device — and must agree. With d = d_model, V = vocab, P = max_window, H/H_kv/hd the heads,
F = d_ff, L = rnn_layers, h = compressor_hidden:

    embed.tok      V·d                      embed.pos   P·d
    blocks.attn    n_blocks·(2·d·H·hd + 2·d·H_kv·hd)     blocks.ffn  n_blocks·2·d·F
    blocks.norm    n_blocks·4d              (two LayerNorms, weight + bias)
    rnn.lstm       L·(8d² + 4d + 2d)        (ih 4d² + bias 4d, hh 4d², norm 2d)
    rnn.compressor 2·d·h + h + d            fusion.xattn 4d²      fusion.gate 2d² + d    fusion.norm 2d
    norm_f         2d                       head         V·d (0 when tied)

Resident bytes: Σ weight elements · bits_of(module)/8 for every `nn.Linear`/`nn.Embedding`
weight (bits_of = the policy's `weight.effective_bits`, block scales included), plus biases and
norm parameters at `other_bits` (they are not swapped by `apply_policy`).

Training FLOPs per token (forward + backward = 3 × forward, a matmul of n weights = 2n forward):

    matmuls   6 · Σ weights · uses per token      uses: 1 for token-level layers; LSTM ih/hh 1 (stream)
              or 1 + 1/C (chunked: tokens, then the chunk summaries); compressor 1/C;
              xattn k/v (max_memory + T/C)/T (the bank is re-projected every segment); embeddings 0
    attention 12 · n_blocks · H·hd · (T+1)/2       QKᵀ and AV over the mean causal context of a segment
              + 12 · d · (max_memory + 1)           cross-attention to a full bank plus the null slot
    (LSTM gate elementwise work, norms and softmax are left out: O(d) per token.)

State bytes per sequence: KV cache at window T = 2 · n_blocks · H_kv · hd · T · kv_bits/8;
memory bank = max_memory · d · act_bits/8; LSTM (h, c) = 2 · L · d · 4 (fp32).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from .config import HybridConfig
from .model import HybridLM

# The paper's Table 1, billions of parameters, and its stated memory (GB).
PAPER_TABLE1: dict[str, float] = {
    "transformer blocks": 335.54,
    "token embedding": 1.07,
    "position embedding": 2.15,
    "RNN": 17.18,
    "context fusion": 0.13,
    "output": 1.07,
}
PAPER_TOTAL_B = 357.14
PAPER_GB = 206.1

# component -> paper Table 1 row
PAPER_ROW: dict[str, str] = {
    "blocks.attn": "transformer blocks", "blocks.ffn": "transformer blocks", "blocks.norm": "transformer blocks",
    "embed.tok": "token embedding", "embed.pos": "position embedding",
    "rnn.lstm": "RNN",
    "rnn.compressor": "context fusion", "fusion.xattn": "context fusion", "fusion.gate": "context fusion",
    "fusion.norm": "context fusion",
    "norm_f": "output", "head": "output",
}
COMPONENTS = tuple(PAPER_ROW)

# Why each Table 1 row differs from the spec as built (docs/hybrid.md, "Budget").
PAPER_WHY: dict[str, str] = {
    "transformer blocks": "the spec (q, o d×d; k, v d×(H_kv·hd) for GQA 128/16×128; FFN up+down d×65536) "
                          "gives 2,751,463,424 weights per block = 352.19B for 128 blocks (+8.4M norm "
                          "params); the paper's 335.54B (2.62B per block) is not reproducible from its spec",
    "RNN": "an LSTM layer has an input (ih) AND a recurrent (hh) matrix, 4d² each: 16 layers = 34.36B; "
           "the paper's 17.18B counts one of the two",
    "context fusion": "cross-attention q, k, v, o (4d² = 1.07B) + gate on [h; ctx] (2d² = 0.54B) + compressor "
                      "d→d/2→d (d² = 0.27B); the paper's 0.13B equals one 16384×8192 matrix "
                      "(the compressor's fc1 alone)",
}


@dataclass(frozen=True)
class WeightModule:
    """One module of the model as the budget sees it."""

    name: str            # module name in HybridLM (what a policy glob matches)
    component: str       # one of COMPONENTS
    weight: int          # elements of its weight matrix (0 for a norm)
    other: int           # bias / norm parameters
    uses_per_token: float = 0.0  # matmul applications per token (training FLOPs = 6·weight·uses)


def component_of(name: str) -> str:
    """Component of a module or parameter name: 'blocks.3.attn.q.weight' -> 'blocks.attn'."""
    parts = [p for p in name.split(".") if not p.isdigit()]
    if parts[0] == "blocks":
        return "blocks.norm" if parts[1].startswith("norm") else f"blocks.{parts[1]}"
    if parts[0] in ("embed", "rnn", "fusion"):
        return f"{parts[0]}.{parts[1]}"
    return parts[0]


def weight_modules(cfg: HybridConfig, window: int | None = None) -> list[WeightModule]:
    """Every parameterized module of `HybridLM(cfg)`, by hand (no model is built)."""
    d, T, C = cfg.d_model, cfg.window if window is None else window, cfg.chunk
    qd, kvd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    mods = [WeightModule("embed.tok", "embed.tok", cfg.vocab_size * d, 0),
            WeightModule("embed.pos", "embed.pos", cfg.max_window * d, 0)]
    if cfg.memory:
        lstm_uses = 1.0 if cfg.rnn_mode == "stream" else 1.0 + 1.0 / C
        for n in range(cfg.rnn_layers):
            p = f"rnn.lstm.{n}"
            mods += [WeightModule(f"{p}.ih", "rnn.lstm", 4 * d * d, 4 * d, lstm_uses),
                     WeightModule(f"{p}.hh", "rnn.lstm", 4 * d * d, 0, lstm_uses),
                     WeightModule(f"{p}.norm", "rnn.lstm", 0, 2 * d)]
        h = cfg.compressor_hidden
        mods += [WeightModule("rnn.compressor.fc1", "rnn.compressor", d * h, h, 1.0 / C),
                 WeightModule("rnn.compressor.fc2", "rnn.compressor", h * d, d, 1.0 / C),
                 WeightModule("fusion.norm", "fusion.norm", 0, 2 * d)]
        kv_uses = (cfg.max_memory + T / C) / T
        for m, uses in (("q", 1.0), ("k", kv_uses), ("v", kv_uses), ("o", 1.0)):
            mods.append(WeightModule(f"fusion.xattn.{m}", "fusion.xattn", d * d, 0, uses))
        mods.append(WeightModule("fusion.gate", "fusion.gate", 2 * d * d, d, 1.0))
    for b in range(cfg.n_blocks):
        p = f"blocks.{b}"
        mods += [WeightModule(f"{p}.norm1", "blocks.norm", 0, 2 * d),
                 WeightModule(f"{p}.attn.q", "blocks.attn", d * qd, 0, 1.0),
                 WeightModule(f"{p}.attn.k", "blocks.attn", d * kvd, 0, 1.0),
                 WeightModule(f"{p}.attn.v", "blocks.attn", d * kvd, 0, 1.0),
                 WeightModule(f"{p}.attn.o", "blocks.attn", qd * d, 0, 1.0),
                 WeightModule(f"{p}.norm2", "blocks.norm", 0, 2 * d),
                 WeightModule(f"{p}.ffn.up", "blocks.ffn", d * cfg.d_ff, 0, 1.0),
                 WeightModule(f"{p}.ffn.down", "blocks.ffn", cfg.d_ff * d, 0, 1.0)]
    mods += [WeightModule("norm_f", "norm_f", 0, 2 * d),
             WeightModule("head", "head", 0 if cfg.tie_embeddings else cfg.vocab_size * d, 0, 1.0)]
    return mods


def param_counts(cfg: HybridConfig) -> dict[str, int]:
    """Exact parameters per component by hand formulas (weights + biases + norms)."""
    out = {c: 0 for c in COMPONENTS if cfg.memory or not c.startswith(("rnn", "fusion"))}
    for m in weight_modules(cfg):
        out[m.component] += m.weight + m.other
    return out


def model_param_counts(model) -> dict[str, int]:
    """Parameters per component of a built model (meta or real), tied parameters counted once."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        c = component_of(name)
        out[c] = out.get(c, 0) + p.numel()
    return out


def meta_param_counts(cfg: HybridConfig) -> dict[str, int]:
    """Build `HybridLM(cfg)` on the meta device (no memory) and count its parameters."""
    with torch.device("meta"):
        model = HybridLM(cfg)
    return model_param_counts(model)


@dataclass(frozen=True)
class ComponentBudget:
    component: str
    params: int            # weights + biases + norms
    weights: int           # weight-matrix elements only
    nbytes: float          # resident bytes at the policy's formats
    matmul_flops: float    # training (fwd + bwd) FLOPs per token in weight matmuls
    attention_flops: float = 0.0  # training FLOPs per token in QKᵀ and AV

    @property
    def flops_per_token(self) -> float:
        return self.matmul_flops + self.attention_flops


def component_budget(cfg: HybridConfig, bits_of: Callable[[str], float], *, window: int | None = None,
                     other_bits: float = 32.0) -> list[ComponentBudget]:
    """Per-component parameters, resident bytes and training FLOPs/token (formulas: module docstring).

    `bits_of(module_name)` gives the bits per weight element of that module (block scales included).
    """
    T = cfg.window if window is None else window
    acc: dict[str, list[float]] = {}
    for m in weight_modules(cfg, T):
        a = acc.setdefault(m.component, [0, 0, 0.0, 0.0, 0.0])
        a[0] += m.weight + m.other
        a[1] += m.weight
        a[2] += (m.weight * bits_of(m.name) if m.weight else 0.0) / 8 + m.other * other_bits / 8
        a[3] += 6.0 * m.weight * m.uses_per_token
    acc["blocks.attn"][4] += 12.0 * cfg.n_blocks * cfg.n_heads * cfg.head_dim * (T + 1) / 2
    if cfg.memory:
        acc["fusion.xattn"][4] += 12.0 * cfg.d_model * (cfg.max_memory + 1)
    return [ComponentBudget(c, int(a[0]), int(a[1]), a[2], a[3], a[4]) for c, a in acc.items()]


def state_bytes(cfg: HybridConfig, window: int | None = None, *, kv_bits: float = 16,
                act_bits: float = 16) -> dict[str, float]:
    """Per-sequence bytes of the KV cache at the window, the memory bank and the LSTM state."""
    T = cfg.window if window is None else window
    out = {"kv_cache": 2 * cfg.n_blocks * cfg.n_kv_heads * cfg.head_dim * T * kv_bits / 8}
    if cfg.memory:
        out["memory_bank"] = cfg.max_memory * cfg.d_model * act_bits / 8
        out["lstm_state"] = 2 * cfg.rnn_layers * cfg.d_model * 4
    return out


def _si(x: float, unit: str = "") -> str:
    for scale, p in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.2f} {p}{unit}"
    return f"{x:.0f} {unit}"


def _flops(matmul: float, attention: float) -> str:
    if not attention:
        return _si(matmul, "FLOP")
    return f"{_si(matmul + attention, 'FLOP')} ({_si(matmul)} + {_si(attention)})"


def format_report(cfg: HybridConfig, bits_of: Callable[[str], float], *, window: int | None = None,
                  other_bits: float = 32.0, kv_bits: float = 16, act_bits: float = 16,
                  policy_name: str = "", check_meta: bool = True) -> str:
    """The printed report (markdown tables)."""
    T = cfg.window if window is None else window
    rows = component_budget(cfg, bits_of, window=T, other_bits=other_bits)
    hand = param_counts(cfg)
    lines = []
    if check_meta:
        meta = meta_param_counts(cfg)
        if meta != hand:
            raise AssertionError(f"meta model counts {meta} != hand formulas {hand}")
        lines.append("parameter counts: meta-built model == hand formulas (every component)")
    total = sum(r.params for r in rows)
    lines += [f"precision: {policy_name or 'none'}; window T={T}; biases/norms at {other_bits:g} bits", "",
              "| component | params | weight elems | bits/weight | resident | train FLOPs/token "
              "(matmul + attention) |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        bpw = f"{(r.nbytes - (r.params - r.weights) * other_bits / 8) * 8 / r.weights:.3g}" if r.weights else "—"
        lines.append(f"| {r.component} | {r.params:,} | {r.weights:,} | {bpw} | {_si(r.nbytes, 'B')} "
                     f"| {_flops(r.matmul_flops, r.attention_flops)} |")
    tb = sum(r.nbytes for r in rows)
    tm, ta = sum(r.matmul_flops for r in rows), sum(r.attention_flops for r in rows)
    lines.append(f"| **total** | {total:,} | {sum(r.weights for r in rows):,} | {tb * 8 / total:.3g} (mean) "
                 f"| {_si(tb, 'B')} | {_flops(tm, ta)} |")
    lines += ["", "| paper Table 1 row | paper | as built | difference | why |", "|---|---:|---:|---:|---|"]
    built: dict[str, int] = {}
    for r in rows:
        built[PAPER_ROW[r.component]] = built.get(PAPER_ROW[r.component], 0) + r.params
    for row, paper_b in PAPER_TABLE1.items():
        ours = built.get(row, 0) / 1e9
        why = PAPER_WHY.get(row, "agrees" if abs(ours - paper_b) < 0.01 else "—")
        lines.append(f"| {row} | {paper_b:.2f}B | {ours:.2f}B | {ours - paper_b:+.2f}B | {why} |")
    lines.append(f"| total | {PAPER_TOTAL_B:.2f}B | {total / 1e9:.2f}B | {total / 1e9 - PAPER_TOTAL_B:+.2f}B | "
                 f"sum of the above |")
    lines.append(f"| memory | {PAPER_GB:.1f} GB | {tb / 1e9:.1f} GB | {tb / 1e9 - PAPER_GB:+.1f} GB | "
                 f"paper: {PAPER_GB * 8e9 / (PAPER_TOTAL_B * 1e9):.2f} bits/param over its count; "
                 f"here: the policy's formats over every parameter |")
    lines += ["", f"state per sequence (kv_bits={kv_bits:g}, memory bank at {act_bits:g} bits, LSTM state fp32):",
              "| window | KV cache | memory bank | LSTM state | train FLOPs/token |", "|---:|---:|---:|---:|---:|"]
    windows = sorted({T} | {w for w in (32768, 65536, 131072) if w <= cfg.max_window and w % cfg.chunk == 0})
    for w in windows:
        s = state_bytes(cfg, w, kv_bits=kv_bits, act_bits=act_bits)
        f = sum(r.flops_per_token for r in component_budget(cfg, bits_of, window=w, other_bits=other_bits))
        lines.append(f"| {w} | {_si(s['kv_cache'], 'B')} | {_si(s.get('memory_bank', 0), 'B')} "
                     f"| {_si(s.get('lstm_state', 0), 'B')} | {_si(f, 'FLOP')} |")
    return "\n".join(lines)
