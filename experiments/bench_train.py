"""Training throughput on one GPU, in one process: a plain reference GPT, torchao float8, and ours.

    python -m experiments.bench_train                       # both sizes, every variant
    python -m experiments.bench_train --sizes 30m --variants ref ref-torchao windowed:bf16 hybrid:paper

One training step = forward, cross-entropy, backward, optimizer step (bf16 autocast for the
reference; our models' precision from the policy, their activations in fp32, or with ``--param-dtype
bf16`` parameters and activations in bf16 from fp32 masters), over random byte tokens (the speed of a step does
not depend on the text). Every variant runs under ``torch.compile`` (``--mode eager``: none does).

Reported per variant: tokens/s over ``--iters`` steps issued back to back as a training loop issues
them, one device synchronization before and after, the median of ``--repeats`` such windows (one
window can catch a pause of the host, a garbage collection, that the others do not; the windows'
range is in the row's notes); the first step, which compiles, as "first step s"; "synced": the median
of ``--iters`` steps each followed by a synchronization, which also pay the host's time to reach the
device with the step's first kernel; model FLOPs utilization (6 x parameters x tokens/s over the
H100's 989 TFLOP/s dense bf16 peak, attention FLOPs not counted), peak memory, and the speed relative
to the reference in the same process.

Sizes: ``30m`` = d 512, 10 blocks, T 128, B 128 (16K tokens/step); ``600m`` = d 2048, 12 blocks,
T 1024, B 8 (8K tokens/step). Variants: ``ref`` (the reference GPT of :mod:`experiments.reference_gpt`
at this size, fused AdamW), ``ref-torchao`` (the same with torchao float8 tensorwise linears, when
torchao is installed), and ``windowed:<policy>`` / ``hybrid:<policy>`` (``HybridLM`` without / with
its RNN memory, the same width, depth and heads, segment = T, state not carried) for the policies
of ``configs/precision``; ``...:ternary@int8`` / ``...:ternary_native@int8``: the same with int8
tensor cores tried before bf16 (``lowprec.kernels.AUTO_ORDER_INT8``: BitNet's int8 x ternary fprop);
``...:fp8@amax-pass`` / ``@amax-stored`` / ``@amax-inline``: where the FP8 operands' amax is taken;
``...:paper@rows-one-kernel``: per-row FP8 operands in one kernel each; ``...:paper@bf16-values``: the bf16
GEMMs' FP8 operands from the FP8 passes; ``...:paper@bf16-stored``: their per-row operands read from the stored
tensor; ``...:paper@e2m1-general``: the FP4 E2M1 weights' operands from the general quantizer;
``...:paper@bf16-requantizes``: the bf16 GEMMs quantizing again what an FP8 GEMM quantized;
``windowed:<policy>@multi-kernel`` (and ``hybrid:``): inductor's multi-kernel reductions;
``...:fp8@ieee-division`` (and ``fp8_delayed``, ``paper``): the FP8 casts dividing by IEEE division;
``...:paper@token-activations``: the paper policy with per-token scaled activations and gradients;
``...:paper@dgrad-requantizes``: a bf16 dgrad quantizing again the gradient an FP8 wgrad quantized;
``...:paper@dgrad-scales-product``: the bf16 dgrad scaling its fp32 product, not folding the gradient's scale into the
weight's values; ``...:paper@e2m1-from-copy``: FP4 weights' operands made from their dequantized bf16 copies, not
their masters; ``hybrid:paper@lstm-wgrad-requantizes``: the LSTM's weight gradient quantizing its stacked steps
again instead of taking the operands they made; ``hybrid:paper@plain-cast-ops``: the LSTM's fp16 weight operand
made by tensor operations, not one kernel (see :func:`settings`).
Each of ours prints its layers' plans. ``--profile`` adds, after each row, where one more step's GPU
time went, by kernel and by the operator that launched it (under ``--mode reduce-overhead`` the step's CUDA
graph is one launch: the default mode shows the operators), and which Python lines made the host wait
(:mod:`experiments.gpu_profile`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch._inductor.config
import torch.nn.functional as F
from omegaconf import OmegaConf

import hybrid
import lowprec
import optim
from hybrid.gpu_bench import back_to_back_ms

from .bench_layers import environment, median_ms
from .reference_gpt import GPT

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PEAK_BF16 = 989e12
SIZES = {"30m": dict(d=512, blocks=10, heads=8, T=128, B=128), "600m": dict(d=2048, blocks=12, heads=16, T=1024, B=8)}
POLICIES = ["bf16", "fp8", "fp8_delayed", "paper", "ternary", "ternary_native"]
VARIANTS = ["ref", "ref-torchao", *(f"{m}:{p}" for m in ("windowed", "hybrid") for p in POLICIES)]
VARIANTS += [f"{m}:{p}@int8" for m in ("windowed", "hybrid") for p in ("ternary", "ternary_native")]
VARIANTS += [f"{m}:fp8@{s}" for m in ("windowed", "hybrid")
             for s in ("amax-pass", "amax-stored", "amax-inline")]
VARIANTS += [f"{m}:paper@{s}" for s in ("rows-one-kernel", "bf16-values", "bf16-stored") for m in ("windowed", "hybrid")]
VARIANTS += [f"{m}:{p}@ieee-division" for m in ("windowed", "hybrid") for p in ("fp8", "fp8_delayed", "paper")]
VARIANTS += [f"{m}:paper@e2m1-general" for m in ("windowed", "hybrid")]
VARIANTS += [f"{m}:paper@bf16-requantizes" for m in ("windowed", "hybrid")]
VARIANTS += [f"{m}:{p}@multi-kernel" for m in ("windowed", "hybrid") for p in POLICIES]
VARIANTS += [f"{m}:paper@{s}" for m in ("windowed", "hybrid")
             for s in ("token-activations", "dgrad-requantizes", "dgrad-scales-product", "e2m1-from-copy")]
VARIANTS += ["hybrid:paper@lstm-wgrad-requantizes", "hybrid:paper@plain-cast-ops"]


def per_token_activations(cfg):
    """A policy config whose input and gradient formats scaled per tensor are scaled per token (per row)
    instead."""
    cfg = OmegaConf.to_container(cfg, resolve=True)
    for fields in [cfg.get("default") or {}, *cfg.get("rules", [])]:
        for key in ("input", "grad"):
            if isinstance(fields.get(key), dict) and fields[key].get("granularity") == "tensor":
                fields[key] = {**fields[key], "granularity": "row"}
    return OmegaConf.create(cfg)


@contextlib.contextmanager
def settings(variant: str):
    """The library settings a variant's suffix names, in force while it is built, compiled and timed:
    ``@int8``: int8 tensor cores tried before bf16 (``lowprec.kernels.AUTO_ORDER_INT8``); where a compiled
    FP8 operand's per-tensor amax is taken: ``@amax-pass`` in the operator's own pass (``Fp8.amax_in_graph``
    off, the default), ``@amax-stored`` as a reduction of the graph over the tensor as stored for the operator
    (``amax_in_graph`` on), ``@amax-inline`` the same over the tensor's expression (``amax_reads_stored`` off);
    ``@rows-one-kernel``: FP8 operands with per-row scales made in one kernel each
    (``lowprec.fp8_cast.ROWS_IN_ONE_KERNEL``); ``@bf16-values``: the bf16 tensor-core GEMMs' operands in FP8
    formats made by the FP8 operand's passes (``lowprec.kernels.Bf16TensorCore.fp8_values_from_passes``);
    ``@bf16-stored``: their per-row operands quantized from the tensor as stored
    (``Bf16TensorCore.row_operands_read_stored``); ``@ieee-division``: the FP8 casts' quotients from IEEE
    division everywhere (``lowprec.fp8_cast.FAST_QUOTIENT`` off); ``@e2m1-general``: an FP4 E2M1 weight's
    operands (E4M3 codes, bf16 values) made by the general quantizer's tensor operations instead of the FP8
    operand's passes (``lowprec.kernels.E2M1_FROM_PASSES`` off);
    ``@bf16-requantizes``: a bf16 tensor-core GEMM quantizing its operands itself where an FP8 GEMM of the
    layer quantized the same tensor in the same format (``lowprec.plan.BF16_TAKES_FP8_CODES`` off);
    ``@multi-kernel``: inductor compiles each reduction whose rows fit 16 times its usual limit both as one
    pass over rows held whole and as its usual loops, and keeps the faster on the first call
    (``torch._inductor.config.triton.multi_kernel``: a row quantized with its own amax otherwise takes three
    loops over its producer's inputs); ``@token-activations`` (built by :func:`per_token_activations`):
    the policy with one scale per token for each input and gradient it scales per tensor;
    ``@dgrad-requantizes``: a bf16 dgrad quantizing the gradient itself where its layer's FP8 wgrad quantizes
    it in the same per-tensor format (``lowprec.gemm.BF16_DGRAD_TAKES_WGRAD_CODES`` off); ``@dgrad-scales-product``:
    such a dgrad multiplying its fp32 product by the gradient's per-tensor scale in a pass of its own instead of
    folding the scale into its weight operand's values (``lowprec.gemm.BF16_DGRAD_FOLDS_GRAD_SCALE`` off);
    ``@e2m1-from-copy``: with ``--param-dtype bf16``, an FP4 E2M1 weight's operands made from the dequantized
    copy of its gathered codes instead of from its master (``lowprec.kernels.E2M1_GATHERED_FROM_MASTER`` off);
    ``@lstm-wgrad-requantizes``: the LSTM recurrence's one wgrad GEMM quantizing the stacked steps again instead of
    taking the operands the steps made (``lowprec.gemm.RECURRENT_WGRAD_TAKES_STEPS`` off); ``@plain-cast-ops``: an
    unscaled format's operand values made eagerly on CUDA by a chain of tensor operations instead of one kernel
    (``lowprec.kernels.PLAIN_CAST_IN_ONE_KERNEL`` off: the LSTM's fp16 weight operand, derived once per loop).
    Suffixes combine with ``+`` (``windowed:paper@token-activations+e2m1-general``)."""
    suffixes = variant.partition("@")[2].split("+")
    fp8 = lowprec.kernels.Fp8
    known = {"": [], "int8": [(lowprec.kernels, "AUTO_ORDER", lowprec.kernels.AUTO_ORDER_INT8)],
             "amax-pass": [(fp8, "amax_in_graph", False)],
             "amax-stored": [(fp8, "amax_in_graph", True), (fp8, "amax_reads_stored", True)],
             "amax-inline": [(fp8, "amax_in_graph", True), (fp8, "amax_reads_stored", False)],
             "rows-one-kernel": [(lowprec.fp8_cast, "ROWS_IN_ONE_KERNEL", True)],
             "bf16-values": [(lowprec.kernels.Bf16TensorCore, "fp8_values_from_passes", True)],
             "bf16-stored": [(lowprec.kernels.Bf16TensorCore, "row_operands_read_stored", True)],
             "ieee-division": [(lowprec.fp8_cast, "FAST_QUOTIENT", False)],
             "e2m1-general": [(lowprec.kernels, "E2M1_FROM_PASSES", False)],
             "bf16-requantizes": [(lowprec.plan, "BF16_TAKES_FP8_CODES", False)],
             "multi-kernel": [(torch._inductor.config.triton, "multi_kernel", 1)],
             "dgrad-requantizes": [(lowprec.gemm, "BF16_DGRAD_TAKES_WGRAD_CODES", False)],
             "dgrad-scales-product": [(lowprec.gemm, "BF16_DGRAD_FOLDS_GRAD_SCALE", False)],
             "e2m1-from-copy": [(lowprec.kernels, "E2M1_GATHERED_FROM_MASTER", False)],
             "lstm-wgrad-requantizes": [(lowprec.gemm, "RECURRENT_WGRAD_TAKES_STEPS", False)],
             "plain-cast-ops": [(lowprec.kernels, "PLAIN_CAST_IN_ONE_KERNEL", False)],
             "token-activations": []}  # a policy of its own: _build
    for suffix in suffixes:
        if suffix not in known or (suffix == "" and len(suffixes) > 1):
            raise ValueError(f"{variant}: unknown suffix @{suffix} (known: {', '.join('@' + k for k in known if k)})")
    changes = [change for suffix in suffixes for change in known[suffix]]
    before = [(obj, name, getattr(obj, name)) for obj, name, _ in changes]
    try:
        for obj, name, value in changes:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in before:
            setattr(obj, name, value)


def build(variant: str, size: dict, rnn_graphs: bool = True, param_dtype: str = "master", blocks_once: bool = False):
    """(model, optimizer, step function, parameter count, note). ``param_dtype`` bf16: our models
    compute with their parameters (fp32 masters) cast to bf16, activations in bf16
    (``parallel.param_dtype``; :func:`experiments.parallel.compute_in_param_dtype`). ``blocks_once``:
    ``model.compile_blocks_once``. Built under the variant's :func:`settings` (a setting read when the
    step compiles needs them around the compilation too, as :func:`measure` has them)."""
    with settings(variant):
        return _build(variant, size, rnn_graphs, param_dtype, blocks_once)


def _build(variant: str, size: dict, rnn_graphs: bool, param_dtype: str, blocks_once: bool):
    d, L, H, T = size["d"], size["blocks"], size["heads"], size["T"]
    if variant.startswith("ref"):
        model = GPT(vocab=256, d=d, layers=L, heads=H, context=T).cuda()
        note = ""
        if variant == "ref-torchao":
            from torchao.float8 import convert_to_float8_training  # optional: only this variant needs it

            convert_to_float8_training(model, module_filter_fn=lambda m, name: name != "head")
            note = "torchao float8 tensorwise"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def loss_fn(x, y):
            with torch.autocast("cuda", torch.bfloat16):
                return F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        return model, opt, loss_fn, sum(p.numel() for p in model.parameters()), note
    kind, policy = variant.partition("@")[0].split(":")  # the suffix: settings(), in force around build()
    cfg = hybrid.preset("medium").replace(
        d_model=d, n_blocks=L, n_heads=H, n_kv_heads=H // 4, head_dim=d // H, d_ff=4 * d, window=T, max_window=T,
        memory=kind == "hybrid", dropout=0.0, chunk=64 if T >= 64 else T, compressor_hidden=d // 2, xattn_heads=H,
        rnn_cuda_graphs=rnn_graphs, compile_blocks_once=blocks_once)
    model = hybrid.HybridLM(cfg)
    policy_cfg = OmegaConf.load(CONFIGS / "precision" / f"{policy}.yaml")
    if "token-activations" in variant.partition("@")[2].split("+"):
        policy_cfg = per_token_activations(policy_cfg)
    report = lowprec.apply_policy(model, policy_cfg)
    model.cuda()
    if param_dtype != "master":
        from .parallel import DTYPES, compute_in_param_dtype

        compute_in_param_dtype(model, DTYPES[param_dtype])
    opt_cfg = OmegaConf.load(CONFIGS / "optim" / ("ternary_native.yaml" if policy.endswith("native") else "adamw.yaml"))
    opt = optim.build_optimizer(model, opt_cfg)
    plans = sorted({m.plan.describe() for m in model.modules() if hasattr(m, "plan")})
    n = sum(p.numel() for p in model.parameters()) + sum(
        m.native_weight.numel() for m in model.modules() if getattr(m, "is_native", False))

    def loss_fn(x, y):
        logits, _ = model(x)
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    del report
    note = "; ".join(plans) + ("" if param_dtype == "master" else f"; parameters and activations in {param_dtype}")
    return model, opt, loss_fn, n, note


def measure(variant: str, size: dict, iters: int, mode: str | None = None, rnn_graphs: bool = True,
            param_dtype: str = "master", profile: bool = False, blocks_once: bool = False, regional: bool = False,
            repeats: int = 3) -> dict:
    """One variant's row: tokens/s from the median of ``repeats`` windows of ``iters`` back-to-back
    steps. ``profile``: after the timed steps, one step profiled and one with CUDA's
    sync warnings on; their lines (:mod:`experiments.gpu_profile`) are returned under "profile".
    ``regional``: our models compile their blocks only (``train.compile=blocks``), the reference
    its whole step as always."""
    with settings(variant):
        return _measure(variant, size, iters, mode, rnn_graphs, param_dtype, profile, blocks_once, regional, repeats)


def _measure(variant, size, iters, mode, rnn_graphs, param_dtype, profile, blocks_once, regional, repeats) -> dict:
    torch.manual_seed(0)
    model, opt, loss_fn, n_params, note = build(variant, size, rnn_graphs, param_dtype, blocks_once)
    if regional and mode != "eager" and hasattr(model, "compile_blocks"):  # train.compile=blocks: the blocks compiled, the rest eager
        model.compile_blocks(mode=mode)
        compiled = loss_fn
    else:
        compiled = loss_fn if mode == "eager" else torch.compile(loss_fn, mode=mode)
    B, T = size["B"], size["T"]
    x = torch.randint(0, 256, (B, T + 1), device="cuda")
    x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()

    def step():
        compiled(x, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()  # compiles; the peak is measured over the steps after it
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    synced = median_ms(step, iters, warmup=2) / 1e3
    windows = sorted(back_to_back_ms(step, iters, warmup=0) for _ in range(repeats))  # warmed up by the synced steps
    s = statistics.median(windows) / 1e3
    tps = B * T / s
    note = f"{note}; {repeats} windows of {iters} steps: {windows[0]:.2f}-{windows[-1]:.2f} ms a step"
    rnn = getattr(model, "rnn", None)
    if rnn is not None:  # whether the LSTM's loops ran as CUDA graphs in the timed steps
        caps, reps = sum(m.graphs.captures for m in rnn.lstm), sum(m.graphs.replays for m in rnn.lstm)
        note = f"{note}; LSTM loops: {caps} CUDA graphs captured, {reps} replays"
    row = dict(variant=variant, params=n_params, tokens_per_s=tps, synced_tokens_per_s=B * T / synced,
               mfu=6 * n_params * tps / PEAK_BF16,
               peak_gib=torch.cuda.max_memory_allocated() / 2**30, first_s=first_s, note=note, profile=[])
    if profile:
        from .gpu_profile import host_syncs, operator_report, profile_call, step_report, sync_report

        prof, wall = profile_call(step, torch.cuda.synchronize, shapes=True)
        row["profile"] = step_report(prof, wall) + operator_report(prof)
        syncs = host_syncs(step)
        torch.cuda.synchronize()
        row["profile"] += sync_report(syncs)
    del model, opt, compiled
    gc.collect()
    torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def variant_name(text: str) -> str:
    """``text`` if it names a variant of ``VARIANTS``, or one whose suffixes, each listed with its base,
    are joined with ``+``; else ``argparse.ArgumentTypeError``."""
    base, at, suffix = text.partition("@")
    if (all(s and f"{base}@{s}" in VARIANTS for s in suffix.split("+")) if at else base in VARIANTS):
        return text
    raise argparse.ArgumentTypeError(f"unknown variant {text!r} (known: {', '.join(VARIANTS)}; suffixes combine with '+')")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--variants", nargs="+", default=VARIANTS, type=variant_name,
                    help="variants (default: all); a listed one's suffixes may be combined with '+'")
    ap.add_argument("--iters", type=int, default=10, help="steps in one timed window")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows; tokens/s from the median window")
    ap.add_argument("--mode", default=None,
                    help="torch.compile mode for every variant (default: the default mode); 'eager': not compiled")
    ap.add_argument("--rnn-graphs", action=argparse.BooleanOptionalAction, default=True,
                    help="replay the hybrid's LSTM step loops as CUDA graphs (model.rnn_cuda_graphs)")
    ap.add_argument("--param-dtype", choices=["master", "bf16"], default="master",
                    help="our models: compute in the fp32 masters' dtype, or with parameters and activations in bf16 "
                         "(parallel.param_dtype), as the reference's autocast does for its matmuls")
    ap.add_argument("--compile-blocks-once", action="store_true",
                    help="our models: the blocks as one nested compile region, compiled once (model.compile_blocks_once)")
    ap.add_argument("--regional", action="store_true",
                    help="our models: compile each block's body only, the rest eager (train.compile=blocks)")
    ap.add_argument("--profile", action="store_true",
                    help="after each variant's row, where one step's GPU time went and the Python lines that made "
                         "the host wait (two more steps, not timed)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_train needs a CUDA GPU")
    how = "not compiled" if args.mode == "eager" else f"compiled (mode: {args.mode or 'default'})"
    print(f"# training step, {environment()}, {datetime.date.today()}, {how}, rnn_cuda_graphs={args.rnn_graphs}, "
          f"param_dtype={args.param_dtype}, compile_blocks_once={args.compile_blocks_once}, regional={args.regional}")
    print("| size | variant | params | tokens/s | MFU | peak GiB | vs ref | tokens/s, synced | first step s | plans |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sizes:
        size, ref = SIZES[name], None
        for variant in args.variants:
            try:
                r = measure(variant, size, args.iters, args.mode, args.rnn_graphs, args.param_dtype, args.profile,
                            args.compile_blocks_once, args.regional, args.repeats)
            except ImportError as e:
                print(f"| {name} | {variant} | - | - | - | - | - | - | - | not run: {e} |", flush=True)
                continue
            except Exception as e:  # one failing variant must not hide the others' rows (its traceback: stderr)
                traceback.print_exc(file=sys.stderr)
                print(f"| {name} | {variant} | - | - | - | - | - | - | - | failed: {type(e).__name__}: {str(e)[:160]} |",
                      flush=True)
                gc.collect()
                torch.cuda.empty_cache()
                torch._dynamo.reset()
                continue
            ref = r["tokens_per_s"] if variant == "ref" else ref
            rel = f"{r['tokens_per_s'] / ref:.2f}" if ref else "-"
            print(f"| {name} | {variant} | {r['params'] / 1e6:.1f}M | {r['tokens_per_s']:,.0f} | {100 * r['mfu']:.0f}% "
                  f"| {r['peak_gib']:.1f} | {rel} | {r['synced_tokens_per_s']:,.0f} | {r['first_s']:.0f} | {r['note']} |",
                  flush=True)
            for line in r["profile"]:
                print(f"PROFILE {name} {variant}: {line}", flush=True)


if __name__ == "__main__":
    main()
