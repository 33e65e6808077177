"""GPU evidence for the width-16384 model: run on one H100/H200.

    python -m hybrid.gpu_bench                 # both parts
    python -m hybrid.gpu_bench --part lstm     # only the recurrent-step table
    python -m hybrid.gpu_bench --part gemv     # every configuration of the packed ternary GEMV

Part ``lstm``: one LSTM recurrent step at width 16384 — ``hh(h)``, a (B x 16384) @ (16384 x 65536)
GEMV, the sequential part of the memory — per weight format, next to its memory-bandwidth floor
(weight bytes / measured device-to-device copy bandwidth; the step is memory-bound at small B), timed
with calls issued back to back and as replays of a CUDA graph (no host time between kernels).

Part ``gemv`` (not in ``all``): the packed ternary GEMV of that step in each of its configurations, timed
and checked against an fp64 reference.

Part ``step``: one training step of the ``slice16k`` preset (8.96B parameters: 1 block, 1 LSTM
layer, width 16384) under the ``paper`` precision policy, in ``stream`` and in ``chunked`` mode: time,
tokens/s, peak memory. Weights are
bf16 and the optimizer is plain SGD (no state): AdamW's two states (or even one momentum) would not
fit beside 8.96B bf16 weights, their gradients and the weight caches on one 80 GB GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import datetime
import time
from pathlib import Path

import torch

import lowprec
from lowprec import LayerPrecision, gemm
from lowprec.nn import QLinear

from .model import HybridLM
from .presets import preset

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def back_to_back_ms(fn, iters: int = 20, warmup: int = 3) -> float:
    """Mean ms per call of ``fn()`` over ``iters`` calls issued back to back after ``warmup`` calls,
    one device synchronization before and one after (CUDA events), as a training loop runs them: the
    host issues a call while the GPU still runs the one before, so a call whose host time is below its
    GPU time costs only its GPU time."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters


def graph_ms(fn, iters: int = 20, calls: int = 8, scope=contextlib.nullcontext) -> float | None:
    """Mean ms per call of ``fn()`` replayed from CUDA graphs (after the warm-up calls of ``back_to_back_ms``,
    which autotune), replays issued back to back: the device's time with no host work between kernels, as
    a captured training step runs them. A graph of ``calls`` calls and one of ``2 calls``; the difference
    of their replay times over ``calls``, so that work done once per capture (a weight operand derived by
    a recurrence's first step in the graph, then taken by the others, within ``scope()``) is not counted
    per call. None where ``fn`` cannot be captured."""
    fn()
    torch.cuda.synchronize()
    times = []
    for n in (calls, 2 * calls):
        g = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(g), scope():
                for _ in range(n):
                    fn()
        except RuntimeError:  # an operation that synchronizes or allocates on the host's side of a capture
            torch.cuda.synchronize()
            return None
        times.append(back_to_back_ms(g.replay, iters=iters, warmup=2))
        del g
    return (times[1] - times[0]) / calls


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write counted)."""
    src = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = back_to_back_ms(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() / (ms / 1e3)


@torch.no_grad()
def lstm_table(batch_sizes=(1, 16), d=16384):
    bw = copy_bandwidth()
    print(f"\n## LSTM recurrent step hh(h) at width {d} (16384 -> 65536), {torch.cuda.get_device_name()}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s, {datetime.date.today()}\n")
    print("| weights | B | ms / step | ms / step, CUDA graph | weight bytes | floor ms (bytes / bandwidth) | "
          "% of floor (graph) | path |")
    print("|---|---|---|---|---|---|---|---|")
    base = torch.nn.Linear(d, 4 * d, bias=False, device="cuda", dtype=torch.bfloat16)
    variants = {
        "bf16": None,
        "fp8 (latent, e4m3 codes cached)": {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
                                            "backend": "tensorcore"},
        "fp8 (native)": {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
                         "storage": "native", "backend": "tensorcore"},
        "ternary (native, packed 2-bit kernel)": {"weight": "ternary", "storage": "native", "backend": "tensorcore"},
        "ternary (native, packed 2-bit kernel, CUDA-core modes only)": {"weight": "ternary", "storage": "native",
                                                                         "backend": "tensorcore"},
        "binary (native, e4m3 codes)": {"weight": "binary", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
                                        "storage": "native", "backend": "tensorcore"},
    }
    from lowprec import gemv
    decode = gemv.TENSOR_CORE_DECODE
    for name, fields in variants.items():
        layer = base if fields is None else QLinear.from_float(base, LayerPrecision.from_fields(fields))
        # the packed GEMV: the faster of the autotuner's picks of MODE 6 (codes decoded on the way to the
        # tensor cores) and of the modes that decode them on CUDA cores, or, in the row that says so, the latter
        gemv.TENSOR_CORE_DECODE = decode and "CUDA-core modes only" not in name
        for B in batch_sizes:
            h = torch.randn(B, d, device="cuda", dtype=torch.bfloat16)
            if fields is None:
                ms = back_to_back_ms(lambda: layer(h))
                graph = graph_ms(lambda: layer(h))
            else:
                # a step of the recurrence: the GEMMs the LSTM calls per token, with the weight's
                # operand derived at the first step and kept for the rest, as its forward loop does
                gemms, weights = layer.recurrent_gemms()
                steps = []  # the last step's outputs, with its ``saved`` (a step's keeps the operand)

                def step():
                    steps[:] = [gemms.fprop(h, weights)]
                ms = back_to_back_ms(step)
                # captured as the LSTM's loop is: its steps share the operand its first step derives
                graph = graph_ms(step, scope=lambda: gemm.loop_scope(h))
                gemms.end_forward()
                del steps
            if fields is None:
                nbytes, path = base.weight.numel() * 2, "cuBLAS bf16"
            elif "packed" in name:
                # the autotuner's pick for this shape
                on_tc = gemv.decodes_on_tensor_cores(h, 4 * d)
                cfg = (gemv.tensor_core_config(h, 4 * d) if on_tc else gemv._ternary_gemv_kernel.best_config).kwargs
                split = f", K in {cfg['SPLIT']} parts" if cfg["SPLIT"] > 1 else ""
                nbytes = layer.native_nbytes()
                path = f"Triton 2-bit GEMV (MODE {cfg['MODE']}, {cfg['BLOCK_N']} rows a program{split})"
            elif layer.is_native:
                nbytes, path = layer.out_features * layer.in_features, "FP8 GEMM on cached E4M3 codes (1 B/weight read)"
            else:
                nbytes, path = base.weight.numel(), "FP8 GEMM (cached E4M3 weight)"
            floor = nbytes / bw * 1e3
            g = "–" if graph is None else f"{graph:.3f}"
            pct = "–" if graph is None else f"{100 * floor / graph:.0f}%"
            print(f"| {name} | {B} | {ms:.3f} | {g} | {nbytes / 2**20:.0f} MiB | {floor:.3f} | {pct} | {path} |",
                  flush=True)
        del layer
        torch.cuda.empty_cache()
    gemv.TENSOR_CORE_DECODE = decode


@torch.no_grad()
def gemv_table(batch_sizes=(1, 16), d=16384, check_rows=256):
    """Every configuration of the packed ternary GEMV (``lowprec.gemv``: MODES 0 to 5 and MODE 6) on the
    recurrent step's shape, called through ``ternary_gemv`` with that configuration: its time back to back
    and as a CUDA graph (the median of three), against the floor, and its error on the first ``check_rows``
    outputs against an fp64 reference over the bound of fp32 summation (1 or less: within it)."""
    from lowprec import gemv
    from lowprec.packing import pack_codes, unpack_codes

    bw = copy_bandwidth()
    N, K = 4 * d, d
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = pack_codes(torch.randint(0, 3, (N, K), device="cuda", dtype=torch.uint8, generator=g), 2).view(N, K // 4)
    t = unpack_codes(packed[:check_rows], 2, check_rows * K).reshape(check_rows, K).double() - 1
    floor = packed.numel() / bw * 1e3
    u = 2.0 ** -24
    print(f"\n## Packed ternary GEMV, every configuration: ({d} x B) -> {N}, {torch.cuda.get_device_name()}, "
          f"copy bandwidth {bw / 1e12:.2f} TB/s, floor {floor:.3f} ms, {datetime.date.today()}\n")
    print("| B | configuration | ms | ms, CUDA graph | % of floor (graph) | error / bound |")
    print("|---|---|---|---|---|---|")
    scale = torch.tensor(1.0, device="cuda")
    for B in batch_sizes:
        x = torch.randn(B, K, device="cuda", generator=g)
        xb = x.bfloat16().double()
        ref = xb @ t.t()
        bound = K * u / (1 - K * u) * (xb.abs() @ t.abs().t())
        for cfg in gemv._CONFIGS + gemv._TC_CONFIGS:
            kw = cfg.kwargs
            if kw["MODE"] in gemv.ONE_ROW_MODES and B != 1:
                continue
            if kw["MODE"] == 6 and gemv._tc_fits(cfg, max(16, gemv.triton.next_power_of_2(B)), x.device):
                continue

            def call():
                return gemv.ternary_gemv(x, packed, scale, N, config=cfg)
            err = ((call()[:, :check_rows].double() - ref).abs() / bound.clamp(min=1e-300)).max().item()
            ms = back_to_back_ms(call)
            # the median of three graph timings: configurations within a few percent of each other trade
            # places from one timing to the next
            graphs = [graph_ms(call) for _ in range(3)]
            graph = None if None in graphs else sorted(graphs)[1]
            desc = ", ".join(f"{k} {v}" for k, v in kw.items()) + f", warps {cfg.num_warps}, stages {cfg.num_stages}"
            gs, pct = ("–", "–") if graph is None else (f"{graph:.3f}", f"{100 * floor / graph:.0f}%")
            print(f"| {B} | {desc} | {ms:.3f} | {gs} | {pct} | {err:.2f} |", flush=True)


def slice_step(tokens=2048, policy="paper", rnn_mode="stream"):
    from omegaconf import OmegaConf  # the [train] extra: the hybrid core does not depend on it

    cfg = preset("slice16k").replace(rnn_mode=rnn_mode)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = HybridLM(cfg)
    torch.set_default_dtype(torch.float32)
    pol = lowprec.PrecisionPolicy.from_config(OmegaConf.load(CONFIGS / "precision" / f"{policy}.yaml"))
    report = lowprec.apply_policy(model, pol)
    notes = {}
    for name, mod in model.named_modules():
        if hasattr(mod, "backend_note"):
            notes.setdefault(mod.backend_note(), []).append(name)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    x = torch.randint(0, cfg.vocab_size, (1, tokens + 1), device="cuda")

    def step():
        logits, _ = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().reshape(-1, cfg.vocab_size), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    t0 = time.perf_counter()
    step()  # warm-up: allocations, optimizer state, autotuning
    torch.cuda.synchronize()
    warm = time.perf_counter() - t0
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loss = step()
    torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated()
    print(f"\n## slice16k training step under precision={policy}, {torch.cuda.get_device_name()}, {datetime.date.today()}\n")
    print(f"- parameters: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B (+ native buffers), "
          f"weights at the policy's formats: {report.total_format_bytes / 2**30:.1f} GiB")
    print(f"- tokens per step: {tokens} (batch 1, rnn_mode={cfg.rnn_mode}), loss {loss.item():.3f}")
    print(f"- step time: {dt:.2f} s ({tokens / dt:.0f} tokens/s); first step {warm:.2f} s")
    print(f"- peak memory: {peak / 2**30:.1f} GiB (torch.cuda.max_memory_allocated over the step)")
    for note, names in notes.items():
        print(f"- {len(names)} layers: {note}")
    del model, opt, loss
    gc.collect()
    torch.cuda.empty_cache()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["lstm", "gemv", "step", "all"], default="all")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--rnn-modes", nargs="+", choices=["stream", "chunked"], default=["stream", "chunked"],
                    help="part step: the memory's rnn_mode of each measured step")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("hybrid.gpu_bench needs a CUDA GPU")
    if args.part in ("lstm", "all"):
        lstm_table()
    if args.part == "gemv":
        gemv_table()
    if args.part in ("step", "all"):
        for mode in args.rnn_modes:
            slice_step(args.tokens, rnn_mode=mode)


if __name__ == "__main__":
    main()
