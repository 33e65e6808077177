"""Compile time of the trainer's step, per ``train.compile`` mode.

    python -m experiments.bench_compile --modes true blocks -- model=medium data=stdlib train.device=cuda train.batch_size=64
    python -m experiments.bench_compile --modes true blocks --backend aot_eager -- model=medium data=stdlib train.device=cpu train.batch_size=2

Builds the trainer's ``Stepper`` from the default config with the given overrides (after ``--``) and
``train.compile`` set to each mode in turn (``false``: eager; ``true``: the step's forward and loss
compiled as one graph; ``blocks``: each GQA block's body compiled, one compilation for all, the
rest eager), then runs ``--steps`` steps and prints each step's wall time (between two device
synchronizations on CUDA), the number of graphs the compiler was given and the median of the
steps after the compiling ones. With TBPTT (the default) the first step has no carried state and
runs eager under ``true`` (its graph is the carried-state one): the compilation falls on step 2.
Under ``blocks`` every step calls the compiled blocks: step 1 compiles.

Each row also gives the compiler's phases over the mode's steps, from its own timers (``PHASES``):
Dynamo's tracing, AOTAutograd's joint trace and partition, inductor (all graphs, its lowering, its
scheduling and code generation, the wait for its kernels' compilation), the guards.

``--backend aot_eager`` traces (Dynamo and AOTAutograd) without generating code: the part of the
compile time that does not depend on the device. Every mode starts from an empty compile cache in
this process (``torch._dynamo.reset``); inductor's on-disk cache is not cleared, so run each
command in a fresh environment (or set ``TORCHINDUCTOR_FORCE_DISABLE_CACHES=1``) for first-time
figures.
"""
from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from .trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
MODES = ("false", "true", "blocks")


# the compiler's own timers (torch._dynamo.utils.compile_times) a row's phases are read from: (label, timer); the
# timers nest (inductor's holds code generation and the kernels' compilation), so the phases overlap
PHASES = (("Dynamo tracing", "bytecode_tracing"), ("AOTAutograd joint trace", "aot_trace_joint_graph"),
          ("partition", "min_cut_rematerialization_partition"), ("inductor, all graphs", "compile_fx_inner"),
          ("lowering", "GraphLowering.run"), ("scheduling and code generation", "GraphLowering.codegen"),
          ("waiting for kernel compiles", "async_compile.wait"), ("C++ compiles", "compile_file"),
          ("guards", "build_guards"))


def phases(timers: dict[str, float]) -> str:
    """The compile's phases, in seconds, from the compiler's timers (``PHASES``; those it did not run are left
    out): one line, nested phases overlapping."""
    return "; ".join(f"{label} {timers[key]:.1f}" for label, key in PHASES if key in timers)


def _timers() -> dict[str, float]:
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return {n: float(v) for n, v in zip(names, values)}


def counting_backend(backend: str, graphs: list):
    """A compiler backend that appends each graph it is given to ``graphs`` and compiles it with ``backend``;
    a ``torch.compile`` call's mode and options (the LSTM cell's) reach inductor as they would without it
    (other backends take none)."""
    def counting(gm, example_inputs, **options):
        graphs.append(gm)
        if backend == "inductor" and options:
            inductor = torch._TorchCompileInductorWrapper(options.get("mode"), options.get("options"), None)
            return inductor(gm, example_inputs)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)
    return counting


def measure(mode: str, overrides: list[str], steps: int, backend: str) -> dict:
    """One mode's step times (s), compiled graph count and the compiler's phases (``phases``)."""
    torch._dynamo.reset()
    torch._dynamo.utils.compilation_time_metrics.clear()
    graphs = []

    counting = counting_backend(backend, graphs)

    original = torch.compile
    torch.compile = lambda fn=None, **kw: original(fn, **{**kw, "backend": counting})
    try:
        with tempfile.TemporaryDirectory() as run_dir, initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
            cfg = compose("config", overrides=[*overrides, f"train.compile={mode}", "train.progress=false",
                                               f"run_dir={run_dir}"])
            stepper = Trainer(cfg).stepper
            sync = torch.cuda.synchronize if stepper.device.type == "cuda" else (lambda: None)
            times = []
            for _ in range(steps):
                sync()
                t = time.perf_counter()
                stepper.step()
                sync()
                times.append(time.perf_counter() - t)
    finally:
        torch.compile = original
    return {"times": times, "graphs": len(graphs), "phases": phases(_timers())}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", nargs="+", default=["true", "blocks"], choices=MODES)
    ap.add_argument("--steps", type=int, default=5, help="steps per mode (at least 3)")
    ap.add_argument("--backend", default="inductor", help="the compiler backend (aot_eager: tracing only)")
    ap.add_argument("overrides", nargs="*", help="config overrides, after --")
    args = ap.parse_args(argv)
    if args.steps < 3:
        ap.error("--steps must be at least 3 (two that may compile, one after)")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    print(f"# compile time, {' '.join(args.overrides) or 'default config'}, backend {args.backend}, torch {torch.__version__}, "
          f"{device}, {datetime.date.today()}")
    print("| train.compile | step 1 s | step 2 s | later steps, median s | graphs compiled | compiler phases, s (nested) |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        r = measure(mode, args.overrides, args.steps, args.backend)
        t = r["times"]
        print(f"| {mode} | {t[0]:.3g} | {t[1]:.3g} | {statistics.median(t[2:]):.3g} | {r['graphs']} | "
              f"{r['phases']} |", flush=True)


if __name__ == "__main__":
    main()
