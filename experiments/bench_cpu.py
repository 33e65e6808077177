"""Training speed of the main job on the CPU, per precision policy.

    python -m experiments.bench_cpu                      # every policy, 120 steps each, twice
    python -m experiments.bench_cpu --policies bf16 paper --steps 200 --repeats 3

Each run is the main job itself (``experiments.train.train`` on the default config: the ``mini``
hybrid, the plays in BPE, TBPTT) with only the precision policy (and the optimizer it needs)
changed, shortened to ``--steps`` steps with one checkpoint and one validation at the end (of one
batch), no telemetry and no sample. Reported per policy: training tokens/s (tokens over the summed step times, the first
step's included), the median over ``--repeats`` runs taken in rotation (so a slow spell of the
machine falls on every policy alike), and the ratio to bf16 in the same process.

The machine must be otherwise idle: a second process on the same cores halves these figures.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from .train import train

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
# policy -> the optimizer it trains with in the README's commands
POLICIES = {"bf16": "adamw", "fp8": "adamw", "paper": "adamw", "ternary": "bitnet", "ternary_native": "ternary_native"}


def run_once(policy: str, steps: int, threads: int, run_dir: Path) -> float:
    """Training tokens/s of the main job under ``policy`` for ``steps`` steps."""
    overrides = [f"precision={policy}", f"optim={POLICIES[policy]}", f"train.steps={steps}",
                 f"train.eval_every={steps}", "train.eval_batches=1", f"train.ckpt_every={steps}",
                 "train.telemetry_every=0", "train.sample_tokens=0", "train.progress=false",
                 f"train.threads={threads}", f"run_dir={run_dir}"]
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose("config", overrides=overrides)
    with contextlib.redirect_stdout(io.StringIO()):  # the run's own closing lines
        return train(cfg)["tokens_per_s"]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    ap.add_argument("--steps", type=int, default=120)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    policies = args.policies if "bf16" in args.policies else ["bf16", *args.policies]
    speeds: dict[str, list[float]] = {p: [] for p in policies}
    with tempfile.TemporaryDirectory() as tmp:
        run_once("bf16", 3, args.threads, Path(tmp) / "warm-up")  # tokenizer cache, first-call costs: untimed
        for r in range(args.repeats):
            for p in policies:
                speeds[p].append(run_once(p, args.steps, args.threads, Path(tmp) / f"{p}-{r}"))
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {args.threads} threads, "
          f"torch {torch.__version__}; the main job, {args.steps} steps, median of {args.repeats}\n")
    print("| policy | tokens/s | vs bf16 |\n|---|---|---|")
    base = statistics.median(speeds["bf16"])
    for p in policies:
        tps = statistics.median(speeds[p])
        print(f"| {p} | {tps:,.0f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    main()
