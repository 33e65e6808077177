"""FP8 operand benchmark: how long making one operand takes on the GPU, against the memory's speed.

    python -m experiments.bench_fp8_cast                           # the 600M model's operand shapes (GPU)
    python -m experiments.bench_fp8_cast --shapes 8192x8192 --layouts both
    python -m experiments.bench_fp8_cast --sweep                   # the passes' tile sizes, per shape
    python -m experiments.bench_fp8_cast --rows                    # per-row scales in one kernel, per tile size
    python -m experiments.bench_fp8_cast --delayed                 # delayed scaling in one pass against two
    python -m experiments.bench_fp8_cast --quotient                # the cast's division: IEEE against reciprocal

For each bf16 tensor shape and layout (``row``: row-major codes for fprop/dgrad; ``transposed``: the
transposed, padded codes for wgrad; ``both``: the two from one read) it prints the GPU time of the
kernels that make the operand (per call: the sum of the kernels' durations under ``torch.profiler``,
the mean over ``--calls`` calls), in two ways:

- ``fp8_operand``: the operator ``lowprec::fp8_operand`` (:mod:`lowprec.fp8_cast`): an amax pass
  and a cast pass in Triton;
- ``compiled``: the general quantizer's tensor operations under ``torch.compile`` (what the FP8
  kernels ran before), ``both`` being the row-major operand then its transposed copy;

with the bytes each must move at least (the amax reads the tensor, the cast reads it again and
writes one byte per code and layout) over ``fp8_operand``'s time, and a bf16 copy of the tensor
(one read, one write) as the memory's yardstick. ``--check`` compares ``fp8_operand``'s codes with
the general quantizer's run eagerly, byte for byte (the compiled one may differ from both in the
last bit of a quotient: the compiler's fp32 division is not IEEE's).

``--delayed`` times a per-tensor operand in both layouts three ways: current scaling (the buffer's fill, the
amax pass, the cast); delayed scaling as two passes, the history's update as compiled tensor operations
(:func:`lowprec.scaling.delayed_amax`) then the operator with that amax (which still takes the tensor's amax
for its NaN rule); and delayed scaling in one pass (:func:`lowprec.fp8_cast.delayed_operands`: the pass, then
one program that finishes it), the history full (the steady state); each way's codes checked against the
others' byte for byte.

``--quotient`` times the operand in both layouts under current scaling (the amax pass and the cast) with the
cast's quotients x / s from IEEE division, from the scale's reciprocal with one correction
(``lowprec.fp8_cast.FAST_QUOTIENT``, the default), the two ways' codes checked against each other byte for
byte, and a bf16 copy of the tensor as the memory's yardstick.

``--sweep`` times each pass alone over a grid of tile sizes (``CAST_SWEEP``, ``AMAX_SWEEP``) for each
shape (default: the operands of the 30M and 600M benchmark models, ``SWEEP_SHAPES``) and layout, and
prints the module's tiles against the fastest found, with the rate of the bytes the pass must move;
every tile size's codes (or amax) are checked against the module's, byte for byte. ``--dtype float32``
sweeps an fp32 tensor (a master weight the FP8 kernels read directly).
"""

from __future__ import annotations

import argparse
import datetime
import itertools

import torch

try:  # the sweep launches the amax kernel itself
    import triton
except ImportError:  # pragma: no cover - a CUDA build of torch ships it
    triton = None

LAYOUTS = {"row": (True, False), "transposed": (False, True), "both": (True, True)}
# the 600M benchmark model's operands: activations and gradients of d 2048 / 4d 8192 over 8192
# tokens, GQA's key/value projections, and the largest weights
SHAPES = ["8192x2048", "8192x8192", "8192x512", "2048x8192", "8192x3072"]
# the sweep's: the 30M model's (16,384 tokens, d 512, GQA's 128-wide key/value, 4d 2048) and the 600M's
SWEEP_SHAPES = ["16384x128", "16384x512", "16384x2048", "8192x512", "8192x2048", "8192x3072", "8192x8192"]
CAST_SWEEP = [dict(BLOCK_M=m, BLOCK_K=k, num_warps=w) for m in (16, 32, 64, 128) for k in (32, 64, 128, 256)
              for w in (2, 4, 8) if 1024 <= m * k <= 16384]
AMAX_SWEEP = [dict(BLOCK_M=m, BLOCK_K=k, CHUNKS=c, num_warps=w) for m in (8, 16, 32, 64) for k in (128, 256, 512)
              for c in (1, 2, 4, 8) for w in (4, 8) if m * k <= 16384]


def parse_shape(text: str) -> tuple[int, int]:
    """``"MxK"`` -> ``(M, K)``; ``ValueError`` for anything else."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"a shape is ROWSxCOLS with positive integers, e.g. 8192x2048, not {text!r}")
    return int(parts[0]), int(parts[1])


def min_bytes(rows: int, cols: int, layout: str, element_bytes: int = 2) -> int:
    """What making the operand must move at least: two reads of the tensor (amax, cast), one byte
    per code in each layout written (the transposed one padded to 16 columns)."""
    rowmajor, transposed = LAYOUTS[layout]
    written = rowmajor * rows * cols + transposed * cols * (rows + (-rows) % 16)
    return 2 * rows * cols * element_bytes + written


def kernel_us(fn, calls: int) -> float:
    """Mean GPU time of ``fn()``'s kernels per call, from ``torch.profiler`` over ``calls`` calls
    (after two calls that compile and warm up)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kernels) / calls


def _general(fmt, layout: str):
    """The general quantizer's operand in ``layout`` (``both``: the row-major one, then its
    transposed copy), as a function of the tensor."""
    from lowprec.kernels import KERNELS, _CodesKernel

    k = KERNELS["fp8_tensorwise"]

    def make(x):
        if layout == "transposed":
            return _CodesKernel.operand(k, x, fmt, transposed=True)
        op = _CodesKernel.operand(k, x, fmt)
        return (op, k.transposed(op)) if layout == "both" else op
    return make


def _codes(out, layout: str) -> list[torch.Tensor]:
    """The code tensors of an operand result, row-major first."""
    if layout == "both":
        return [out[0][0], out[1][0]]
    return [out[0]]


def tiles(cfg: dict) -> str:
    """A tile configuration as text: ``64x64 w8`` (``x4`` chunks for the amax pass)."""
    chunks = f" x{cfg['CHUNKS']}" if "CHUNKS" in cfg else ""
    return f"{cfg['BLOCK_M']}x{cfg['BLOCK_K']}{chunks} w{cfg['num_warps']}"


def _timed_tilings(make, configs: list[dict], want: list[torch.Tensor], calls: int, what: str) -> dict[str, float]:
    """``{tiles: µs}`` of ``make(cfg)`` for each of ``configs``, each tiling's codes (its first two
    results) checked against ``want`` byte for byte."""
    times = {}
    for cfg in configs:
        if not all(torch.equal(a.view(torch.uint8), b) for a, b in zip(make(cfg)[:2], want)):
            raise SystemExit(f"{what}: tiles {tiles(cfg)} give other codes")
        times[tiles(cfg)] = kernel_us(lambda cfg=cfg: make(cfg), calls)
    return times


def sweep(shapes: list[tuple[int, int]], layouts: list[str], dtype: torch.dtype, calls: int,
          device: str = "cuda") -> None:
    """The ``--sweep`` table (module doc)."""
    from lowprec import fp8_cast

    size = torch.tensor([], dtype=dtype).element_size()
    print("| shape | dtype | pass | layout | module's tiles | µs | fastest tiles | µs | its minimum bytes at |")
    print("|---|---|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        x = torch.randn(rows, cols, device=device, dtype=dtype)
        amax = x.abs().amax().float()
        for layout in layouts:
            rowmajor, transposed = LAYOUTS[layout]

            def cast(cfg=None):
                return fp8_cast.triton_operand(x, None, False, False, rowmajor, transposed, measured=amax,
                                               cast_blocks=cfg)
            want = [c.view(torch.uint8) for c in cast()[:2]]
            default = fp8_cast.CAST_BLOCKS_TRANSPOSED if transposed else fp8_cast.CAST_BLOCKS
            times = _timed_tilings(cast, CAST_SWEEP, want, calls, f"{rows}x{cols} {layout}")
            t_default = kernel_us(cast, calls)
            best = min(times, key=times.get)
            moved = rows * cols * size + rowmajor * rows * cols + transposed * cols * (rows + (-rows) % 16)
            print(f"| {rows}x{cols} | {str(dtype).removeprefix('torch.')} | cast | {layout} | {tiles(default)} | "
                  f"{t_default:.1f} | {best} | {times[best]:.1f} | {moved / times[best] / 1e3:,.0f} GB/s |", flush=True)
        out = torch.zeros(1, dtype=torch.int32, device=device)

        def amax_pass(cfg):
            out.zero_()
            grid = (triton.cdiv(rows, cfg["BLOCK_M"]), triton.cdiv(cols, cfg["BLOCK_K"] * cfg["CHUNKS"]))
            fp8_cast._amax_kernel[grid](x, out, rows, cols, x.stride(0), x.stride(1), PER_ROW=False, **cfg)
            return out
        times = {}
        for cfg in AMAX_SWEEP:
            if not torch.equal(amax_pass(cfg).view(torch.float32), amax.reshape(1)):
                raise SystemExit(f"{rows}x{cols}: amax tiles {tiles(cfg)} give another amax")
            times[tiles(cfg)] = kernel_us(lambda cfg=cfg: amax_pass(cfg), calls)
        t_default = kernel_us(lambda: amax_pass(fp8_cast.AMAX_BLOCKS), calls)
        best = min(times, key=times.get)
        print(f"| {rows}x{cols} | {str(dtype).removeprefix('torch.')} | amax (with its buffer's fill) | | "
              f"{tiles(fp8_cast.AMAX_BLOCKS)} | {t_default:.1f} | {best} | {times[best]:.1f} | "
              f"{rows * cols * size / times[best] / 1e3:,.0f} GB/s |", flush=True)


ROWS_SWEEP = [dict(BLOCK_M=m, BLOCK_K=k, num_warps=w) for m, k, w in ((8, 256, 4), (4, 256, 4), (16, 256, 8),
                                                                       (8, 512, 8), (4, 512, 4), (16, 128, 4))]


def row_scales(shapes: list[tuple[int, int]], calls: int, device: str = "cuda") -> None:
    """The ``--rows`` table: an E4M3 operand with per-row scales (row-major codes) in one kernel
    (``fp8_cast.ROWS_IN_ONE_KERNEL``, over ``ROWS_SWEEP``'s tiles) against the amax pass (into a cleared
    buffer) and the cast; each tiling's codes checked against the two kernels' (scales too)."""
    from lowprec import fp8_cast

    print("| shape | amax + cast µs | one kernel, module's tiles | µs | fastest tiles | µs | vs two kernels |")
    print("|---|---|---|---|---|---|---|")
    before = fp8_cast.ROWS_IN_ONE_KERNEL
    try:
        for rows, cols in shapes:
            x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)

            def run(one: bool, cfg=None):
                fp8_cast.ROWS_IN_ONE_KERNEL = one
                out = fp8_cast.triton_operand(x, None, False, True, True, False, rows_blocks=cfg)
                return out[0], out[2].view(torch.uint8)  # the codes and the scales' bytes
            want = [t.view(torch.uint8) for t in run(False)]
            times = _timed_tilings(lambda cfg: run(True, cfg), ROWS_SWEEP, want, calls, f"{rows}x{cols} rows")
            t_two, t_default = kernel_us(lambda: run(False), calls), kernel_us(lambda: run(True), calls)
            best = min(times, key=times.get)
            print(f"| {rows}x{cols} | {t_two:.1f} | {tiles(fp8_cast.ROWS_BLOCKS)} | {t_default:.1f} | {best} | "
                  f"{times[best]:.1f} | {t_two / t_default:.2f}x |", flush=True)
    finally:
        fp8_cast.ROWS_IN_ONE_KERNEL = before


def delayed_ways(fmt, compiled: bool = True) -> dict:
    """The ``--delayed`` table's three ways to make an operand in both layouts, each a function of the
    tensor and its amax history returning ``((codes, s), (codes_t, s))``: current scaling (the history
    unused), delayed scaling as two passes (the history's update as tensor operations, compiled unless
    ``compiled`` is False, then the operator with that amax) and in one pass. With the tensor's own amax
    in the history the three give the same codes."""
    from lowprec import fp8_cast
    from lowprec.scaling import delayed_amax

    def two_passes(x, h):
        return fp8_cast.operands(x, fmt, amax=delayed_amax(h, x))
    return {"current": lambda x, h: fp8_cast.operands(x, fmt),
            "two passes": torch.compile(two_passes) if compiled else two_passes,
            "one pass": lambda x, h: fp8_cast.delayed_operands(x, fmt, h)[:2]}


def delayed(shapes: list[tuple[int, int]], fmt, calls: int, history: int = 16, device: str = "cuda") -> None:
    """The ``--delayed`` table (module doc)."""
    ways = delayed_ways(fmt)
    print("| shape | current scaling µs | delayed, two passes µs | delayed, one pass µs | one pass vs current | "
          "one pass vs two | one pass's bytes at |")
    print("|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        x = torch.randn(rows, cols, device=device, dtype=torch.bfloat16)
        h = torch.full((history,), float(x.abs().amax()), device=device)
        outs = [way(x, h) for way in ways.values()]
        for layout in (0, 1):
            if not all(torch.equal(o[layout][0].view(torch.uint8), outs[0][layout][0].view(torch.uint8)) for o in outs):
                raise SystemExit(f"{rows}x{cols}: the delayed codes differ")
        t_cur, t_two, t_one = (kernel_us(lambda way=way: way(x, h), calls) for way in ways.values())
        moved = min_bytes(rows, cols, "both") - rows * cols * 2  # one read of the tensor, not two
        print(f"| {rows}x{cols} | {t_cur:.1f} | {t_two:.1f} | {t_one:.1f} | {t_cur / t_one:.2f}x | "
              f"{t_two / t_one:.2f}x | {moved / t_one / 1e3:,.0f} GB/s |", flush=True)


def quotients(shapes: list[tuple[int, int]], fmt, calls: int, device: str = "cuda") -> None:
    """The ``--quotient`` table (module doc)."""
    from lowprec import fp8_cast

    print("| shape | input | IEEE division µs | reciprocal µs | reciprocal vs IEEE | minimum bytes at (reciprocal) | "
          "bf16 copy's bytes at |")
    print("|---|---|---|---|---|---|---|")
    before = fp8_cast.FAST_QUOTIENT
    try:
        for (rows, cols), dtype in itertools.product(shapes, (torch.bfloat16, torch.float32)):
            x = torch.randn(rows, cols, device=device, dtype=dtype)
            times, codes = [], []
            for fast in (False, True):
                fp8_cast.FAST_QUOTIENT = fast
                codes.append(_codes(fp8_cast.operands(x, fmt), "both"))
                times.append(kernel_us(lambda: fp8_cast.operands(x, fmt), calls))
            if not all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(*codes)):
                raise SystemExit(f"{rows}x{cols} {dtype}: the codes differ between the ways")
            copy_us = kernel_us(lambda: x.to(torch.bfloat16, copy=True), calls)
            rate = min_bytes(rows, cols, "both", x.element_size()) / times[1] / 1e3
            copy_rate = (x.element_size() + 2) * rows * cols / copy_us / 1e3
            print(f"| {rows}x{cols} | {str(dtype)[6:]} | {times[0]:.1f} | {times[1]:.1f} | {times[0] / times[1]:.2f}x | "
                  f"{rate:,.0f} GB/s | {copy_rate:,.0f} GB/s |", flush=True)
    finally:
        fp8_cast.FAST_QUOTIENT = before


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=SHAPES, help="ROWSxCOLS of the bf16 tensor")
    ap.add_argument("--layouts", nargs="+", default=list(LAYOUTS), choices=list(LAYOUTS))
    ap.add_argument("--format", default="fp8_e4m3", choices=["fp8_e4m3", "fp8_e5m2"])
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--check", action="store_true", help="compare both ways' codes byte for byte")
    ap.add_argument("--sweep", action="store_true", help="time each pass over a grid of tile sizes (module doc)")
    ap.add_argument("--rows", action="store_true", help="per-row scales in one kernel against amax + cast")
    ap.add_argument("--delayed", action="store_true", help="delayed scaling in one pass against two (module doc)")
    ap.add_argument("--quotient", action="store_true", help="the cast's division: IEEE against reciprocal (module doc)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="the tensor's dtype (--sweep)")
    args = ap.parse_args(argv)
    wide = (args.sweep or args.rows or args.delayed or args.quotient) and args.shapes == SHAPES
    shapes = [parse_shape(s) for s in (SWEEP_SHAPES if wide else args.shapes)]
    if not torch.cuda.is_available():
        raise SystemExit("bench_fp8_cast needs a CUDA GPU")
    import lowprec
    from lowprec import fp8_cast

    from .bench_layers import environment

    fmt = lowprec.format(args.format, granularity="tensor")
    if args.rows:
        print(f"# FP8 operand with per-row scales in one kernel (E4M3), {environment()}, {datetime.date.today()}")
        row_scales(shapes, args.calls)
        return
    if args.delayed:
        print(f"# FP8 operand ({args.format}, per-tensor scale, both layouts) of a bf16 tensor under delayed scaling, "
              f"{environment()}, {datetime.date.today()}")
        delayed(shapes, fmt, args.calls)
        return
    if args.quotient:
        print(f"# FP8 operand ({args.format}, per-tensor scale, both layouts) of bf16 and fp32 tensors, IEEE division "
              f"against the reciprocal, {environment()}, {datetime.date.today()}")
        quotients(shapes, fmt, args.calls)
        return
    if args.sweep:
        print(f"# FP8 operand passes' tile sizes (E4M3, per-tensor scale), {environment()}, {datetime.date.today()}")
        sweep(shapes, args.layouts, getattr(torch, args.dtype), args.calls)
        return
    print(f"# FP8 operand ({args.format}, per-tensor scale) of a bf16 tensor, {environment()}, {datetime.date.today()}")
    print("| shape | layout | fp8_operand µs | its minimum bytes at | compiled µs | vs compiled | bf16 copy µs (GB/s) |")
    print("|---|---|---|---|---|---|---|")
    for rows, cols in shapes:
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
        copy_us = kernel_us(lambda: x.clone(), args.calls)
        for layout in args.layouts:
            transposed_only = layout == "transposed"
            ours = (lambda: fp8_cast.operands(x, fmt)) if layout == "both" else \
                (lambda: fp8_cast.operand(x, fmt, transposed=transposed_only))
            torch._dynamo.reset()  # each case compiles afresh (the same function would soon hit dynamo's recompile limit)
            general = torch.compile(_general(fmt, layout))
            t_ours = kernel_us(ours, args.calls)
            t_general = kernel_us(lambda: general(x), args.calls)
            if args.check:
                for a, b in zip(_codes(ours(), layout), _codes(_general(fmt, layout)(x), layout)):
                    if not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                        raise SystemExit(f"{rows}x{cols} {layout}: the codes differ")
            rate = min_bytes(rows, cols, layout) / t_ours / 1e3
            print(f"| {rows}x{cols} | {layout} | {t_ours:.1f} | {rate:,.0f} GB/s | {t_general:.1f} | "
                  f"{t_general / t_ours:.2f}x | {copy_us:.1f} ({4 * rows * cols / copy_us / 1e3:,.0f}) |", flush=True)


if __name__ == "__main__":
    main()
