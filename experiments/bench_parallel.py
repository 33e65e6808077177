"""Training on several GPUs (FSDP2 over N processes): weak scaling, and the width-16384 hybrid with as
many blocks as fit.

    python -m experiments.bench_parallel weak --gpus 1 2 4 --policies bf16 paper
    python -m experiments.bench_parallel weak --gpus 1 2 --policies bf16 --compile --blocks-per-unit 12 1,11 --reduce-dtype bf16
    python -m experiments.bench_parallel weak --gpus 1 2 4 --policies bf16 --compile --blocks-per-unit 12 --reduce-dtype bf16 --prefetch 3 --repeats 3
    python -m experiments.bench_parallel wide --gpus 4 --gpu-gib 79 --reduce-dtype bf16 --policies ternary_native:5 bf16:1
    torchrun --standalone --nproc-per-node 4 -m experiments.bench_parallel one --model wide --policy paper --blocks 1

``weak``: ``HybridLM`` at the ``600m`` shape of :mod:`experiments.bench_train` (d 2048, 12 blocks, 16/4 heads,
FFN 8192, the RNN memory in ``chunked`` mode; byte vocabulary), 8 x 1024 tokens per GPU per step, on 1, 2, 4
... GPUs: the same work per GPU, so tokens/s per GPU stays where the sharding costs nothing. One GPU is
one plain process (no process group, no FSDP2), measured once per policy. Several values of
``--blocks-per-unit``, ``--prefetch``, ``--reduce-dtype`` or ``--reshard`` measure every combination of them
(the layout column) on each number of GPUs above one, all against that one process. ``--repeats R``
measures all of it R times, round after round, each round against its own one process, and then prints the
median and range over the rounds: the same command's ratio can differ by several hundredths from one launch
to the next, more than the layouts differ.

``wide``: the ``slice16k`` preset (width 16384, 128/16 heads, FFN 65536, vocabulary 65536, one 16384-wide
LSTM layer, compressor, cross-attention fusion) with ``blocks`` GQA blocks, one 2048-token sequence per
GPU per step, ``rnn_mode=chunked``. ``policy:K`` tries K blocks first: if K fit, K + 1, and so on up
(``--max-tries``); if K did not fit, K - 1 and down. A run that fails (out of memory, in any rank) is
printed with its error and counted as "does not fit".

``one``: one measurement, started by ``torchrun`` (the two above start it); rank 0 prints one ``RESULT``
line (JSON).

What one measurement does: the model is built on the meta device, the precision policy applied, native
weights quantized from random N(0, 0.02) weights on the GPU, the model sharded
(:func:`experiments.parallel.shard_model`: FSDP2 per block / LSTM layer / memory path, native weights
row-sharded, latent weights all-gathered in their format; ``parallel.param_dtype`` bf16, or with
``--param-dtype master`` the masters' dtype), then its float parameters materialized (``to_empty``)
and drawn N(0, 0.02) (norm weights 1, biases 0) on their shards: no rank ever holds the whole float
model. The optimizer is the one ``configs/optim`` gives the
policy (AdamW; TernaryBop for native ternary) and the step is the trainer's
(:class:`experiments.loop.Stepper`: loss over the global batch, loss scaler, found-inf agreed over the
ranks, clipping over all shards), eager (``--compile``: the trainer's ``train.compile``, FSDP2's hooks
running eagerly between the compiled pieces; ``--compile blocks``: ``train.compile=blocks``, each block's
body compiled), on random tokens. Reported: the step time of ``--iters`` steps issued back to back as
the trainer issues them (one device synchronization after the last: the host issues a step while the
device still runs the one before) and the tokens/s per GPU it gives; beside it the median time of as
many steps each between two device synchronizations ("synced step s", which also pays the host's time
to reach the device with the step's first kernels); peak memory allocated on the
busiest GPU (whole run: build, optimizer state, steps; ``--gpu-gib`` caps what the allocator may take, so a
larger GPU can stand in for a smaller one), the bytes one rank receives in all-gathers
during one step (counted at the collectives), the host's time to issue a step (``host_s``: a step
whose host time reaches its step time is bound by the host, not the GPU), and the last loss (finite:
the steps trained).

``--param-dtype bf16`` (the default): parameters gathered and computed in bf16 from fp32 masters,
activations in bf16, on every number of GPUs (one process through
:func:`experiments.parallel.compute_in_param_dtype`: the ranks' arithmetic); ``--param-dtype master``:
in the masters' dtype (fp32 activations), one process or many.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import nn

import hybrid
import lowprec
import optim

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODELS = ("600m", "wide", "tiny")
SEVERAL = "; weak: several values measure every combination on more than one GPU, against one 1-GPU row"


def model_config(name: str, blocks: int | None, T: int) -> hybrid.HybridConfig:
    """The benchmark's models (see the module doc); ``tiny`` is for the CPU test of this module."""
    if name == "600m":
        cfg = hybrid.preset("medium").replace(
            d_model=2048, n_blocks=12, n_heads=16, n_kv_heads=4, head_dim=128, d_ff=8192, window=T, max_window=T,
            dropout=0.0, rnn_layers=1, chunk=64, compressor_hidden=1024, xattn_heads=16, rnn_mode="chunked")
    elif name == "wide":
        cfg = hybrid.preset("slice16k").replace(window=T, max_window=T, rnn_mode="chunked")
    elif name == "tiny":
        cfg = hybrid.preset("tiny").replace(window=T, max_window=T)
    else:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    return cfg if blocks is None else cfg.replace(n_blocks=blocks)


@torch.no_grad()
def materialize_(model: nn.Module, device: torch.device, std: float = 0.02) -> None:
    """Give a meta-built, policy-applied, sharded model real storage on ``device``: every float
    parameter (a shard under FSDP2) N(0, std), norm weights 1, biases 0, delayed scaling's amax histories
    0. Native layers already hold their codes (see :func:`build`)."""
    from torch.distributed.tensor import DTensor

    kept = {name: b for name, b in model.named_buffers() if b.device.type != "meta"}  # native codes and scales
    model.to_empty(device=device)
    for name, b in kept.items():
        model.get_buffer(name).copy_(b)
    for name, b in model.named_buffers():  # delayed scaling's amax histories start empty
        if name not in kept and name.rpartition(".")[2].startswith("amax_history_"):
            b.zero_()
    for name, p in model.named_parameters():
        local = p.to_local() if isinstance(p, DTensor) else p
        if name.endswith("bias"):
            local.zero_()
        elif p.dim() == 1:
            local.fill_(1.0)
        else:
            local.normal_(0.0, std)


def build(args, dist_info):
    """(model, optimizer, scheduler, scaler, parameter count) of one measurement (see the module doc)."""
    from experiments.build import choose_scaler_mode
    from experiments.parallel import ParallelConfig, shard_model
    from lowprec.nn.native import NativeWeightMixin

    cfg = model_config(args.model, args.blocks, args.T)
    with torch.device("meta"):
        model = hybrid.HybridLM(cfg)
    lowprec.apply_policy(model, OmegaConf.load(CONFIGS / "precision" / f"{args.policy}.yaml"))
    n_params = sum(p.numel() for p in model.parameters())
    device = dist_info.device
    for mod in model.modules():
        if isinstance(mod, NativeWeightMixin) and mod.is_native:
            n_params += mod.native_weight.numel()
            mod.init_native_(torch.randn(mod.native_weight.shape, device=device) * 0.02)
    pcfg = ParallelConfig(param_dtype=None if args.param_dtype == "master" else args.param_dtype,
                          reduce_dtype=args.reduce_dtype, activation_checkpoint=args.checkpoint,
                          prefetch=args.prefetch, reshard_after_forward=args.reshard,
                          blocks_per_unit=args.blocks_per_unit)
    shard_model(model, dist_info.mesh, pcfg)
    materialize_(model, device)
    opt_name = "ternary_native" if args.policy.endswith("native") else "adamw"
    opt_cfg = OmegaConf.load(CONFIGS / "optim" / f"{opt_name}.yaml")
    opt = optim.build_optimizer(model, opt_cfg)
    sched = optim.build_scheduler(opt, {"name": "constant"}, total_steps=args.warmup + args.iters + 1)
    scaler = lowprec.LossScaler(choose_scaler_mode(model, "auto"))
    return model, opt, sched, scaler, n_params


def random_batches(rows: int, T: int, vocab: int, device: torch.device, seed: int):
    """(x, y) of ``rows`` random token sequences, forever (the speed of a step does not depend on the text)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    while True:
        x = torch.randint(0, vocab, (rows, T + 1), device=device, generator=gen)
        yield x[:, :-1], x[:, 1:]


def measure(args) -> dict | None:
    """One measurement in this process (one of ``torchrun``'s ranks, or a single process); the result
    on rank 0, None elsewhere."""
    import torch.distributed as dist

    from experiments.parallel import ParallelConfig, init_distributed

    cuda = torch.cuda.is_available() and args.device != "cpu"
    d = init_distributed(ParallelConfig(), device="cuda" if cuda else "cpu")
    if cuda and d.world_size == 1:
        torch.cuda.set_device(0)
    if cuda and args.gpu_gib:  # a GPU of gpu_gib on a larger one: the allocator refuses beyond it
        total = torch.cuda.get_device_properties(d.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.gpu_gib * 2**30 / total), d.device)
    torch.manual_seed(d.rank)
    phase = "build"
    try:
        t0 = time.perf_counter()
        model, opt, sched, scaler, n_params = build(args, d)
        build_s = time.perf_counter() - t0
        phase = "steps"
        row = _steps(args, d, model, opt, sched, scaler, n_params, build_s, cuda)
    except torch.OutOfMemoryError as e:  # where, and how much: the launcher prints this line
        gib = 2**30
        print(f"OOM rank {d.rank} in {phase}: {torch.cuda.memory_allocated() / gib:.1f} GiB allocated, peak "
              f"{torch.cuda.max_memory_allocated() / gib:.1f} GiB; {str(e).splitlines()[0][:160]}", flush=True)
        raise
    if d.world_size > 1:
        dist.barrier()
        dist.destroy_process_group()
    return row if d.rank == 0 else None


def _steps(args, d, model, opt, sched, scaler, n_params, build_s, cuda) -> dict:
    import torch.distributed as dist

    from experiments.loop import Stepper, read_results
    from lowprec.distributed import record_all_gathers

    several = d.world_size > 1
    source = random_batches(args.batch, args.T, model.cfg.vocab_size, d.device, seed=d.rank)
    stepper = Stepper(model, opt, sched, scaler, source, tbptt=False, grad_clip=1.0, device=d.device,
                      parallel=d if several else None, compile=_compile_mode(args.compile))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    results = [stepper.step() for _ in range(args.warmup)]
    sync()
    with record_all_gathers() as rec:
        results.append(stepper.step())
        sync()
    times, issued = [], []
    for _ in range(args.iters):
        t = time.perf_counter()
        results.append(stepper.step())
        issued.append(time.perf_counter() - t)
        sync()
        times.append(time.perf_counter() - t)
    # the same number of steps issued back to back, as the trainer issues them: the host issues a step while
    # the device still runs the one before (each step above first waits for the device to go idle)
    t = time.perf_counter()
    for _ in range(args.iters):
        results.append(stepper.step())
    sync()
    run_s = (time.perf_counter() - t) / max(args.iters, 1)
    if args.profile:
        profile_step(stepper, d, sync, args.trace)
    steps, _ = read_results(results)
    peak = torch.tensor([torch.cuda.max_memory_allocated() if cuda else 0], dtype=torch.float64, device=d.device)
    if several:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    step_s = statistics.median(times)
    row = dict(model=args.model, policy=args.policy, gpus=d.world_size, blocks=model.cfg.n_blocks, params=n_params,
               tokens_per_gpu_step=args.batch * args.T, step_s=step_s, host_s=statistics.median(issued), run_s=run_s,
               tokens_per_s_per_gpu=args.batch * args.T / run_s,
               peak_gib=float(peak) / 2**30, gather_bytes=rec.received_bytes, build_s=build_s,
               loss=steps[-1][0], taken=sum(1 for s in steps if s[2]), steps=len(steps),
               device=torch.cuda.get_device_name(d.device) if cuda else "cpu", checkpoint=args.checkpoint,
               param_dtype=args.param_dtype, reduce_dtype=args.reduce_dtype, prefetch=args.prefetch, compile=args.compile,
               reshard=args.reshard, blocks_per_unit=args.blocks_per_unit)
    return row


def profile_step(stepper, d, sync, trace_dir: str | None = None) -> None:
    """Two more steps on every rank: one under ``torch.profiler``, after which rank 0 prints where its
    GPU time went (:func:`experiments.gpu_profile.step_report`: wall time, GPU idle time, compute and
    collective kernel time, the host's waits for the device, the kernels taking most time), and one
    with CUDA's synchronization warnings on, after which rank 0 prints the Python lines that made its
    host wait (``SYNC``). With ``trace_dir`` every rank writes its trace of the profiled step there
    (``rank<r>.json.gz``, Chrome trace format: chrome://tracing, Perfetto)."""
    from experiments.gpu_profile import host_syncs, profile_call, step_report, sync_report

    prof, wall = profile_call(stepper.step, sync)
    if trace_dir:
        import gzip
        import shutil

        Path(trace_dir).mkdir(parents=True, exist_ok=True)
        raw = Path(trace_dir) / f"rank{d.rank}.json"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(f"{raw}.gz", "wb") as dst:
            shutil.copyfileobj(src, dst)
        raw.unlink()
    syncs = host_syncs(stepper.step)
    sync()
    if d.rank != 0:
        return
    for line in step_report(prof, wall):
        print(f"PROFILE {line}", flush=True)
    if syncs is not None:
        for line in sync_report(syncs):
            print(f"SYNC {line}", flush=True)


# ------------------------------------------------------------------------------------ launchers

def launch(n: int, extra: list[str], timeout: float) -> tuple[dict | None, str]:
    """Run ``one`` on ``n`` processes (torchrun, standalone); (result, error text)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
           "-m", "experiments.bench_parallel", "one", *extra]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=os.environ.copy())
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f} s"
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):]), ""
    text = p.stdout + p.stderr
    ooms = [ln for ln in text.splitlines() if ln.startswith("OOM rank")]
    if ooms:
        return None, "out of memory: " + ooms[0]
    if "out of memory" in text.lower() or "OutOfMemoryError" in text:
        return None, "out of memory"
    raised = [ln.strip() for ln in text.splitlines() if re.match(r"\s*[\w.]*(Error|Exception): ", ln)]
    return None, (raised[0][:300] if raised else f"exit {p.returncode}: {text.strip().splitlines()[-1:]}")


HEADER = ("| model | policy | GPUs | layout | blocks | params | step s | synced step s | host s | tokens/s per GPU "
          "| vs 1 GPU | peak GiB (busiest GPU) | all-gather MB / step / GPU | loss | steps taken |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def layout_text(r: dict, gpus: int) -> str:
    """The layout column: blocks per unit, reduce-scatter dtype, prefetch, resharding ("-" on one process)."""
    if gpus == 1:
        return "-"
    return (f"{_blocks_per_unit_arg(r['blocks_per_unit'])} per unit, {r['reduce_dtype']} reduce, "
            f"prefetch {r['prefetch']}{'' if r['reshard'] else ', no reshard'}")


def table_row(r: dict, base: float | None) -> str:
    rel = f"{r['tokens_per_s_per_gpu'] / base:.2f}" if base else "-"
    return (f"| {r['model']} | {r['policy']} | {r['gpus']} | {layout_text(r, r['gpus'])} | {r['blocks']} "
            f"| {r['params'] / 1e9:.2f}B | {r['run_s']:.3f} | {r['step_s']:.3f} | {r['host_s']:.3f} "
            f"| {r['tokens_per_s_per_gpu']:,.0f} | {rel} | {r['peak_gib']:.1f} | {r['gather_bytes'] / 1e6:,.0f} "
            f"| {r['loss']:.3f} | {r['taken']}/{r['steps']} |")


def common(args) -> list[str]:
    return [*(["--checkpoint"] if args.checkpoint else []), *(["--compile", args.compile] if args.compile else []),
            "--reshard", "on" if args.reshard else "off",
            "--prefetch", str(args.prefetch), "--blocks-per-unit", _blocks_per_unit_arg(args.blocks_per_unit),
            "--param-dtype", args.param_dtype, "--reduce-dtype", args.reduce_dtype, "--gpu-gib", str(args.gpu_gib), "--T", str(args.T), "--batch", str(args.batch), "--warmup", str(args.warmup), "--iters", str(args.iters),
            "--device", args.device]


def _compile_mode(flag) -> bool | str:
    """``--compile`` as ``Stepper(compile=...)``: False, True or "blocks"."""
    return "blocks" if flag == "blocks" else flag == "true"


def _blocks_per_unit(text: str) -> int | list[int]:
    """``--blocks-per-unit``: ``12`` or ``1,11``."""
    parts = [int(p) for p in text.split(",")]
    return parts[0] if len(parts) == 1 else parts


def _on_off(text: str) -> bool:
    """``--reshard``: on or off."""
    if text not in ("on", "off"):
        raise argparse.ArgumentTypeError(f"{text!r}: give on or off")
    return text == "on"


def _blocks_per_unit_arg(v: int | list[int]) -> str:
    return ",".join(map(str, v)) if isinstance(v, list) else str(v)


def layouts(args) -> list[dict]:
    """The sharding layouts ``weak`` measures on more than one GPU: every combination of the values
    given to ``--blocks-per-unit``, ``--prefetch``, ``--reduce-dtype`` and ``--reshard``, in that
    nesting order (the first flag's values outermost)."""
    return [{"blocks_per_unit": b, "prefetch": p, "reduce_dtype": r, "reshard": h}
            for b in args.blocks_per_unit for p in args.prefetch for r in args.reduce_dtype for h in args.reshard]


def weak(args) -> None:
    """Per policy: one process once (no sharding: the layouts do not apply), then each number of GPUs
    above one under each layout of :func:`layouts`, every row against the one process. With
    ``--repeats R`` all of that R times over, round after round (each round against its own one-process
    row), then a summary: the median and range over the rounds per configuration."""
    print(HEADER, flush=True)
    seen: dict[tuple, list[tuple[float, float | None]]] = {}
    for _ in range(args.repeats):
        for policy in args.policies:
            base = None
            for n in args.gpus:
                for layout in args.layouts[:1] if n == 1 else args.layouts:
                    run = argparse.Namespace(**{**vars(args), **layout})
                    r, err = launch(n, ["--model", args.model, "--policy", policy, *common(run)], args.timeout)
                    key = (policy, n, layout_text(layout, n))
                    if r is None:
                        print(f"| {args.model} | {policy} | {n} | {key[2]} | - | - | - | - | - | - | - | - | - | - "
                              f"| failed: {err} |", flush=True)
                        seen.setdefault(key, [])
                        continue
                    base = base or (r["tokens_per_s_per_gpu"] if n == 1 else None)
                    tokens = r["tokens_per_s_per_gpu"]
                    seen.setdefault(key, []).append((tokens, tokens / base if base else None))
                    print(table_row(r, base), flush=True)
    if args.repeats > 1:
        print(summary(args.model, seen, args.repeats))


def _median_range(xs: list[float], fmt: str) -> str:
    """``median (min–max)`` of ``xs`` in ``fmt``; "-" for none."""
    if not xs:
        return "-"
    xs = sorted(xs)
    mid = len(xs) // 2
    med = xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2
    return f"{med:{fmt}} ({xs[0]:{fmt}}–{xs[-1]:{fmt}})"


def summary(model: str, seen: dict[tuple, list[tuple[float, float | None]]], rounds: int) -> str:
    """The table after ``--repeats``: per (policy, GPUs, layout), the rounds that gave a result, and the
    median and range over them of tokens/s per GPU and of the ratio to the round's one process."""
    lines = ["", f"Over {rounds} rounds (each round's ratio against its own 1-GPU row):", "",
             "| model | policy | GPUs | layout | rounds with a result | tokens/s per GPU, median (min–max) "
             "| vs 1 GPU, median (min–max) |", "|---|---|---|---|---|---|---|"]
    for (policy, n, layout), got in seen.items():
        ratios = [q for _, q in got if q is not None]
        lines.append(f"| {model} | {policy} | {n} | {layout} | {len(got)}/{rounds} "
                     f"| {_median_range([t for t, _ in got], ',.0f')} | {_median_range(ratios, '.2f')} |")
    return "\n".join(lines)


def wide(args) -> None:
    print(HEADER, flush=True)
    n = args.gpus[0]
    for spec in args.policies:
        policy, _, k = spec.partition(":")
        k = int(k or 1)
        tried: dict[int, dict | None] = {}
        for _ in range(args.max_tries):
            r, err = launch(n, ["--model", args.model, "--policy", policy, "--blocks", str(k), *common(args)], args.timeout)
            tried[k] = r
            if r is None:
                print(f"| {args.model} | {policy} | {n} | {layout_text(args.layouts[0], n)} | {k} | - | - | - | - | - | - | - "
                      f"| - | - | does not fit / failed: {err} |", flush=True)
            else:
                print(table_row(r, None), flush=True)
            up = r is not None
            nxt = k + 1 if up else k - 1
            if nxt < 1 or nxt in tried:
                break
            k = nxt
        fits = [b for b, r in tried.items() if r is not None]
        print(f"<!-- {policy}: largest that ran: {max(fits) if fits else 'none'} blocks -->", flush=True)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["weak", "wide", "one"])
    ap.add_argument("--model", choices=MODELS, default=None, help="default: 600m for weak, wide for wide")
    ap.add_argument("--policy", default="bf16", help="one: the policy (a name in configs/precision)")
    ap.add_argument("--policies", nargs="+", default=None, help="weak: policies; wide: policy:blocks to start from")
    ap.add_argument("--gpus", nargs="+", type=int, default=None, help="weak: process counts; wide: one count")
    ap.add_argument("--blocks", type=int, default=None)
    ap.add_argument("--T", type=int, default=None, help="tokens per sequence (600m: 1024, wide: 2048)")
    ap.add_argument("--batch", type=int, default=None, help="sequences per GPU per step (600m: 8, wide: 1)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--device", choices=["auto", "cpu"], default="auto")
    ap.add_argument("--gpu-gib", type=float, default=0.0,
                    help="use at most this much of each GPU's memory (e.g. 80 on a 141 GiB H200: an 80 GB H100's room); 0: all")
    ap.add_argument("--checkpoint", action=argparse.BooleanOptionalAction, default=None,
                    help="activation checkpointing per block and LSTM layer (default: on for wide, off for weak)")
    ap.add_argument("--param-dtype", choices=["bf16", "master"], default="bf16",
                    help="parallel.param_dtype: bf16 (parameters gathered and used in bf16, activations in bf16; one "
                         "process too), or master: in the masters' dtype (fp32)")
    ap.add_argument("--reduce-dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"],
                    help="dtype of FSDP2's gradient reduce-scatter (parallel.reduce_dtype)" + SEVERAL)
    ap.add_argument("--prefetch", nargs="+", type=int, default=[1],
                    help="parallel.prefetch: units whose all-gather each unit starts ahead" + SEVERAL)
    ap.add_argument("--blocks-per-unit", nargs="+", type=_blocks_per_unit, default=[1],
                    help="parallel.blocks_per_unit: consecutive blocks FSDP2 gathers together (N), or the sizes of "
                         "consecutive groups (N,M,...: e.g. 1,11)" + SEVERAL)
    ap.add_argument("--reshard", nargs="+", type=_on_off, default=[True],
                    help="parallel.reshard_after_forward: on, or off (each unit stays gathered from its forward to "
                         "its backward)" + SEVERAL)
    ap.add_argument("--compile", nargs="?", const="true", default=False, choices=["true", "blocks"],
                    help="the trainer's train.compile: forward and loss compiled (--compile), or each block's body "
                         "(--compile blocks)")
    ap.add_argument("--profile", action="store_true",
                    help="one: two more steps, profiled and with CUDA's sync warnings on; rank 0 prints where its GPU "
                         "time went and the Python lines that made its host wait")
    ap.add_argument("--trace", default=None, help="one, with --profile: a folder for every rank's trace of the profiled step")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per launched measurement")
    ap.add_argument("--max-tries", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=1,
                    help="weak: measure every row this many times, round after round, then print the median and "
                         "range over the rounds (a run-to-run spread shows up as a range, not as one lucky row)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: give 1 or more")
    if args.repeats > 1 and args.what != "weak":
        ap.error(f"--repeats is for weak ({args.what} measures each row once)")
    args.layouts = layouts(args)
    if len(args.layouts) > 1 and args.what != "weak":
        ap.error(f"{args.what} measures one layout: give one value each to --blocks-per-unit, --prefetch, "
                 "--reduce-dtype and --reshard (several are for weak)")
    for key, value in args.layouts[0].items():
        setattr(args, key, value)
    args.model = args.model or ("wide" if args.what == "wide" else "600m")
    if args.checkpoint is None:
        args.checkpoint = args.model == "wide"
    args.T = args.T or {"600m": 1024, "wide": 2048, "tiny": 16}[args.model]
    args.batch = args.batch or {"600m": 8, "wide": 1, "tiny": 2}[args.model]
    if args.what == "one":
        row = measure(args)
        if row is not None:
            print("RESULT " + json.dumps(row), flush=True)
        return
    args.gpus = args.gpus or ([1, 2, 4] if args.what == "weak" else [4])
    args.policies = args.policies or (["bf16", "paper"] if args.what == "weak" else ["ternary_native:5", "bf16:1", "paper:1"])
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() and args.device != "cpu" else "cpu"
    print(f"# {args.what}: {args.model}, {args.batch} x {args.T} tokens per GPU per step, {dev}, torch {torch.__version__}, "
          f"{datetime.date.today()}; param_dtype {args.param_dtype}, compile {args.compile}", flush=True)
    (weak if args.what == "weak" else wide)(args)


if __name__ == "__main__":
    main()
