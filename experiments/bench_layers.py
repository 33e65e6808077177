"""FFN block benchmark: Linear d->4d, GELU, Linear 4d->d, forward + backward, per precision.

    python -m experiments.bench_layers                       # the default grid (GPU)
    python -m experiments.bench_layers --dims 1024 4096 --tokens 8192 --precisions bf16 fp8

Prints a markdown table: ms per fwd+bwd, TFLOP/s (GEMM FLOPs only: 3 GEMMs x 2 layers x
2*T*d*4d), speedup vs bf16 of the same (d, tokens). Everything runs compiled (torch.compile), as
the torchao figures it is compared with. torchao float8 (tensorwise) runs in the same process
when torchao is importable.

Precisions (weights in bf16 master storage; activations/grads per-tensor scaled, as torchao):
  fp8             weight e4m3, input e4m3, grad e5m2 (backend auto: FP8 tensor cores for all GEMMs)
  ternary         BitNet absmean ternary weights (exact in E4M3), e4m3 inputs, e5m2 grads
  ternary-native  the same with the weight stored as packed 2-bit codes (no float master)
  binary          sign weights with mean-|w| scale, e4m3 inputs, e5m2 grads
  nvfp4           NVFP4 weights, inputs and grads (no FP4 tensor cores on Hopper: bf16 tensor cores
                  on the exact FP4 values)
Each row's note is the layers' GemmPlan. The header records the versions and the GPU clocks the
figures depend on.
"""

from __future__ import annotations

import argparse
import datetime
import gc

import torch
import torch.nn as nn

ACT = {"input": {"format": "fp8_e4m3", "granularity": "tensor"}, "grad": {"format": "fp8_e5m2", "granularity": "tensor"}}
PRECISIONS = {
    "fp8": {"weight": "fp8_e4m3", **ACT},
    "ternary": {"weight": "ternary", **ACT},
    "ternary-native": {"weight": "ternary", **ACT, "storage": "native"},
    "binary": {"weight": "binary", **ACT},
    "nvfp4": {"weight": "nvfp4", "input": "nvfp4", "grad": "nvfp4"},
}
ALL = ["bf16", "torchao", *PRECISIONS]


def ffn(d: int) -> nn.Module:
    return nn.Sequential(nn.Linear(d, 4 * d, bias=False), nn.GELU(), nn.Linear(4 * d, d, bias=False))


def build(name: str, d: int) -> nn.Module | None:
    model = ffn(d).to("cuda", torch.bfloat16)
    if name == "bf16":
        return model
    if name == "torchao":
        try:
            from torchao.float8 import convert_to_float8_training
        except ImportError:
            return None
        convert_to_float8_training(model)
        return model
    from lowprec import LayerPrecision
    from lowprec.nn import QLinear

    p = LayerPrecision.from_fields(PRECISIONS[name])
    for i in (0, 2):
        model[i] = QLinear.from_float(model[i], p)
    return model


def environment() -> str:
    """Device, library versions and the GPU's clocks as found (figures depend on all of them)."""
    import importlib.metadata as md
    import subprocess

    parts = [torch.cuda.get_device_name(), f"torch {torch.__version__}", f"CUDA {torch.version.cuda}"]
    for pkg in ("triton", "torchao"):
        try:
            parts.append(f"{pkg} {md.version(pkg)}")
        except md.PackageNotFoundError:
            parts.append(f"{pkg} absent")
    try:
        q = "clocks.sm,clocks.max.sm,clocks.mem,power.limit"
        out = subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=10).stdout.strip().splitlines()[0]
        parts.append(f"clocks sm/max sm/mem, power limit: {out}")
    except (OSError, IndexError, subprocess.SubprocessError):
        parts.append("clocks unknown")
    return ", ".join(parts)


def median_ms(step, iters: int, warmup: int = 3) -> float:
    """Median ms of ``step()`` over ``iters`` timed calls (CUDA events), after ``warmup`` calls (which
    include compilation)."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        step()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def time_step(model, x, iters: int) -> float:
    """Median ms of one forward+backward (after warm-up, which includes compilation)."""
    return median_ms(lambda: model(x).sum().backward(), iters)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--precisions", nargs="+", default=ALL, choices=ALL)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-compile", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_layers needs a CUDA GPU")
    print(f"# FFN fwd+bwd, {environment()}, {datetime.date.today()}, {'eager' if args.no_compile else 'compiled'}")
    print("| d | tokens | precision | ms | TFLOP/s | vs bf16 | note |")
    print("|---|---|---|---|---|---|---|")
    for d in args.dims:
        for t in args.tokens:
            flops = 3 * 2 * 2 * t * d * 4 * d
            base = None
            for name in args.precisions:
                torch.manual_seed(0)
                model = build(name, d)
                if model is None:
                    print(f"| {d} | {t} | {name} | - | - | - | torchao not installed |")
                    continue
                note = ""
                if hasattr(model[0], "plan"):
                    note = model[0].plan.describe()
                run = model if args.no_compile else torch.compile(model)
                x = torch.randn(t, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                try:
                    ms = time_step(run, x, args.iters)
                except torch.OutOfMemoryError:
                    print(f"| {d} | {t} | {name} | OOM | - | - | |")
                    ms = None
                if ms is not None:
                    base = ms if name == "bf16" else base
                    speed = f"{base / ms:.2f}x" if base else "-"
                    print(f"| {d} | {t} | {name} | {ms:.2f} | {flops / ms / 1e9:.0f} | {speed} | {note} |", flush=True)
                del model, run, x
                gc.collect()
                torch.cuda.empty_cache()
                torch._dynamo.reset()


if __name__ == "__main__":
    main()
