"""Memory per GPU of training `HybridLM` with FSDP over ``dp`` GPUs and tensor parallelism over ``tp``,
and the smallest number of GPUs that fits.

    python -m hybrid.budget model=paper precision=paper parallel.gpus=auto     # smallest count + breakdown
    python -m hybrid.budget model=paper parallel.gpus=auto window=32768         # every shipped policy

Sharding (as `experiments.parallel` applies it): tensor-parallel weights (attention q/k/v/o, FFN up/down,
LSTM ih/hh) are split over ``tp`` and FSDP-sharded over ``dp``: 1/(dp·tp) of each per GPU; every
other parameter (embeddings, head, memory path, norms, biases) is sharded over ``dp`` only. Per
GPU, for one micro-batch of ``micro_batch`` sequences of ``T`` = window tokens:

    weights     latent: fp32 master (4 B); native: the format's bits (scales included)
    grads       fp32 (4 B), kept until the step (reduce-scattered, so sharded like the weights)
    optimizer   latent and other parameters: AdamW, 8 B (fp32 moments); native binary/ternary:
                Bop/TernaryBop, 2 B (bf16 momentum); native float/int: SRAdamW, 8 B (fp32 moments)
    gathered    FSDP's working set: the largest unit's weights twice (the one computing, the next
                prefetched) in the format they travel in (native: packed; latent: the weight
                format where it can be all-gathered in it, else bf16), its fp32 gradient before
                the reduce-scatter, and the root (embeddings, head), gathered for the whole step
    activations full activation checkpointing at unit boundaries, sequence-parallel over tp:
                the inputs of every block and LSTM layer (T·d bf16 each), one unit recomputed
                (34·T·d bytes: Megatron's per-layer count with flash attention), the logits of
                the loss (T·V fp32, vocabulary-parallel), the memory bank and its k/v projections
                (bf16; (max_memory + T/C)·d each), the LSTM state (fp32)

A GPU holds ``gpu_gb`` GB; the layout searched is tp in {1, 2, 4, 8} (one NVLink node) and dp the
rest. Everything that is not in this list (CUDA context, allocator fragmentation, communication
buffers) is left to the margin ``reserve_gb``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .accounting import weight_modules
from .config import HybridConfig

TP_SPLIT = ("blocks.attn", "blocks.ffn", "rnn.lstm")  # components split over tp (their weights)
ADAMW_BYTES, MOMENTUM_BYTES, FP32 = 8.0, 2.0, 4.0
GB = 1e9


@dataclass(frozen=True)
class Layout:
    dp: int
    tp: int

    @property
    def gpus(self) -> int:
        return self.dp * self.tp


@dataclass
class GPUBudget:
    layout: Layout
    parts: dict[str, float] = field(default_factory=dict)  # name -> bytes per GPU

    @property
    def total(self) -> float:
        return sum(self.parts.values())


def _routes(cfg: HybridConfig, policy) -> dict[str, tuple[float, float, float]]:
    """module name -> (resident bytes/weight, optimizer bytes/weight, bytes/weight as gathered)."""
    from lowprec.fsdp import check_lowbit_gather_support

    out = {}
    for m in weight_modules(cfg):
        if not m.weight:
            continue
        p = policy.resolve(m.name)
        fmt = p.weight
        if p.storage == "native":
            kind = fmt.kind
            opt = MOMENTUM_BYTES if kind in ("binary", "ternary") else ADAMW_BYTES
            out[m.name] = (fmt.effective_bits / 8, opt, fmt.effective_bits / 8)
        else:
            ok, _ = check_lowbit_gather_support(p, 1, 1)
            gathered = min(fmt.effective_bits, 16) / 8 if ok and fmt is not None else 2.0
            out[m.name] = (FP32, ADAMW_BYTES, gathered)
    return out


def _units(cfg: HybridConfig) -> dict[str, list]:
    """FSDP units (as experiments.parallel.units) -> their modules."""
    units: dict[str, list] = {}
    for m in weight_modules(cfg):
        parts = m.name.split(".")
        if parts[0] == "blocks" or (parts[0] == "rnn" and parts[1] == "lstm"):
            unit = ".".join(parts[:3] if parts[0] == "rnn" else parts[:2])
        elif parts[0] == "rnn":
            unit = "rnn.compressor"
        elif parts[0] == "fusion":
            unit = "fusion"
        else:
            unit = ""
        units.setdefault(unit, []).append(m)
    return units


def gpu_budget(cfg: HybridConfig, policy, layout: Layout, *, window: int | None = None,
               micro_batch: int = 1) -> GPUBudget:
    """Bytes per GPU of training ``cfg`` under ``policy`` (a lowprec.PrecisionPolicy) on ``layout``."""
    T = cfg.window if window is None else window
    d, dp, tp = cfg.d_model, layout.dp, layout.tp
    routes = _routes(cfg, policy)
    b = GPUBudget(layout, {"weights": 0.0, "grads": 0.0, "optimizer": 0.0})
    for m in weight_modules(cfg):
        shard = dp * (tp if m.component in TP_SPLIT else 1)
        resident, opt, _ = routes.get(m.name, (FP32, ADAMW_BYTES, 2.0))
        b.parts["weights"] += (m.weight * resident + m.other * FP32) / shard
        b.parts["grads"] += (m.weight + m.other) * FP32 / shard
        b.parts["optimizer"] += (m.weight * opt + m.other * ADAMW_BYTES) / shard

    def gathered(mods) -> tuple[float, float]:
        w = sum(m.weight * routes[m.name][2] / (tp if m.component in TP_SPLIT else 1) for m in mods if m.weight)
        g = sum((m.weight + m.other) * FP32 / (tp if m.component in TP_SPLIT else 1) for m in mods)
        return w + sum(m.other * 2.0 for m in mods), g

    units = _units(cfg)
    root = units.pop("")
    inner = [gathered(mods) for mods in units.values()]
    biggest_w = max((w for w, _ in inner), default=0.0)
    biggest_g = max((g for _, g in inner), default=0.0)
    b.parts["gathered"] = 2 * biggest_w + biggest_g + gathered(root)[0]
    n_saved = cfg.n_blocks + (cfg.rnn_layers + 2 if cfg.memory else 0)
    act = micro_batch * T * d * 2.0 * n_saved / tp
    act += micro_batch * 34.0 * T * d / tp
    act += micro_batch * T * cfg.vocab_size * FP32 / tp
    if cfg.memory:
        act += micro_batch * 3 * (cfg.max_memory + T / cfg.chunk) * d * 2.0
        act += micro_batch * 2 * cfg.rnn_layers * d * FP32
    b.parts["activations"] = act
    return b


def layouts(gpus: int, tps: Iterable[int] = (1, 2, 4, 8)) -> list[Layout]:
    return [Layout(gpus // tp, tp) for tp in tps if gpus % tp == 0]


def smallest_layout(cfg: HybridConfig, policy, *, gpu_gb: float = 80.0, reserve_gb: float = 4.0,
                    window: int | None = None, micro_batch: int = 1, tps: Iterable[int] = (1, 2, 4, 8),
                    max_gpus: int = 1 << 16) -> GPUBudget | None:
    """The layout with the fewest GPUs (then the smallest tp) whose every GPU fits ``gpu_gb - reserve_gb``;
    None when no tp in ``tps`` fits (the activations of one sequence alone exceed a GPU)."""
    cap = (gpu_gb - reserve_gb) * GB
    tps = tuple(tps)
    # per GPU: sharded states fall as 1/gpus; the rest does not depend on dp: solve per tp
    best = None
    for tp in tps:
        fixed = gpu_budget(cfg, policy, Layout(1 << 40, tp), window=window, micro_batch=micro_batch)
        if fixed.total > cap:
            continue
        lo, hi = 1, max_gpus // tp
        if gpu_budget(cfg, policy, Layout(hi, tp), window=window, micro_batch=micro_batch).total > cap:
            continue
        while lo < hi:  # the smallest dp that fits (the budget falls as dp grows)
            mid = (lo + hi) // 2
            if gpu_budget(cfg, policy, Layout(mid, tp), window=window, micro_batch=micro_batch).total <= cap:
                hi = mid
            else:
                lo = mid + 1
        found = gpu_budget(cfg, policy, Layout(lo, tp), window=window, micro_batch=micro_batch)
        if best is None or found.layout.gpus < best.layout.gpus:
            best = found
    return best


def format_parallel_report(cfg: HybridConfig, policies: dict[str, object], *, gpus: int | str = "auto",
                           gpu_gb: float = 80.0, reserve_gb: float = 4.0, window: int | None = None,
                           micro_batch: int = 1) -> str:
    """Markdown: per policy the smallest layout (or the best tp at ``gpus`` GPUs), and the per-GPU
    breakdown of each."""
    T = cfg.window if window is None else window
    lines = [f"training memory per GPU ({gpu_gb:g} GB, {reserve_gb:g} GB reserved), window T={T}, "
             f"micro-batch {micro_batch}; FSDP over dp, tensor parallel over tp (module doc: hybrid.parallel_budget)",
             "", "| policy | GPUs | dp x tp | weights | grads | optimizer | gathered | activations | per GPU |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, policy in policies.items():
        if gpus == "auto":
            b = smallest_layout(cfg, policy, gpu_gb=gpu_gb, reserve_gb=reserve_gb, window=T, micro_batch=micro_batch)
        else:
            options = [gpu_budget(cfg, policy, lay, window=T, micro_batch=micro_batch) for lay in layouts(int(gpus))]
            b = min(options, key=lambda o: o.total) if options else None
        if b is None:
            w, fit = T // 2, None
            while w >= cfg.chunk and fit is None:  # the longest window (TBPTT segment) that fits
                fit = smallest_layout(cfg, policy, gpu_gb=gpu_gb, reserve_gb=reserve_gb, window=w,
                                      micro_batch=micro_batch)
                w = w // 2 if fit is None else w
            hint = f"; window {w} fits on {fit.layout.gpus} ({fit.layout.dp} x {fit.layout.tp})" if fit else ""
            lines.append(f"| {name} | none | — | | | | | | one sequence's activations exceed a GPU at tp <= 8{hint} |")
            continue
        p = b.parts
        fits = "" if b.total <= (gpu_gb - reserve_gb) * GB else " (does not fit)"
        lines.append(f"| {name} | {b.layout.gpus} | {b.layout.dp} x {b.layout.tp} | "
                     + " | ".join(f"{p[k] / GB:.1f} GB" for k in ("weights", "grads", "optimizer", "gathered",
                                                                    "activations"))
                     + f" | {b.total / GB:.1f} GB{fits} |")
    return "\n".join(lines)
