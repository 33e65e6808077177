"""Precision ablations: a sweep of training runs and one summary (table, CSV, plots).

    python -m experiments.ablate                              # configs/sweep/small_cpu.yaml, on CPU
    python -m experiments.ablate sweep=h100 jobs=8            # the GPU ablation (docs/benchmarks.md)
    python -m experiments.ablate sweep=small_cpu seeds=[0] variants=[bf16,ternary]
    python -m experiments.ablate summarize=runs/sweeps/small_cpu   # re-summarize existing runs
    python -m experiments.ablate sweep=small_cpu launcher='torchrun --standalone --nproc-per-node 2'

A sweep file (``configs/sweep/<name>.yaml``) lists ``base`` overrides applied to every run,
``variants`` (name -> list of overrides: precision, optimizer, learning rate, model...) and
``seeds``. Every (variant, seed) is one ``python -m experiments.train`` process writing its own
run directory ``<out>/<variant>/seed<k>`` (``out`` relative to the current directory); ``jobs`` of them run at once (small models leave a
GPU mostly idle). A run whose ``summary.json`` exists is not run again, so an interrupted sweep
continues where it stopped. ``launcher`` (argument or sweep key) starts each run with that command
instead of ``python``, e.g. ``torchrun --standalone --nproc-per-node 2`` (``--standalone`` gives
concurrent jobs their own ports): the run then trains on that many processes at the same global
batch, and its ``summary.json`` (global tokens and tokens/s, ``processes``) reads as any other.

The summary (``summary.md``, ``summary.csv``, ``val_loss.png``, ``retrieval.png``) reports per
variant, over seeds (mean ± sample std): the BEST validation loss and bits/char along the curve
(not the last: small corpora overfit, so low precision can look like a regularizer), the gap to ``bf16`` in %, tokens/s, weight
bytes at the policy's formats, training bytes per parameter (weights + optimizer state), and
long-context retrieval accuracy when the runs measured it. The validation curves come from each
run's ``summary.json`` (``curve``), plotted against training tokens.
"""

from __future__ import annotations

import csv
import json
import math
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

from .plot import line_plot

SWEEPS = Path(__file__).resolve().parents[1] / "configs" / "sweep"  # installed beside this package


def load_sweep(name: str):
    path = SWEEPS / f"{name}.yaml"
    if not path.exists():
        choices = sorted(p.stem for p in SWEEPS.glob("*.yaml"))
        raise ValueError(f"unknown sweep {name!r}; choose one of {choices}")
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    unknown = set(cfg) - {"name", "base", "variants", "seeds", "jobs", "out", "baseline", "launcher"}
    if unknown:
        raise ValueError(f"sweep {name!r}: unknown keys {sorted(unknown)}")
    if not cfg.get("variants"):
        raise ValueError(f"sweep {name!r} lists no variants")
    return cfg


def run_one(out: Path, variant: str, overrides: list[str], seed: int, base: list[str], log,
            launcher: str | None = None) -> dict | None:
    run_dir = out / variant / f"seed{seed}"
    summary = run_dir / "summary.json"
    if summary.exists():
        return json.loads(summary.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    start = _launch_command(launcher)
    cmd = [*start, "-m", "experiments.train", *base, *overrides, f"train.seed={seed}",
           f"hydra.run.dir={run_dir}", "resume=auto", "train.progress=false"]
    t0 = time.perf_counter()
    with open(run_dir / "train.log", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT).returncode
    log(f"{variant} seed {seed}: {'ok' if rc == 0 else f'FAILED (exit {rc}, see {run_dir}/train.log)'} "
        f"in {time.perf_counter() - t0:.0f} s")
    return json.loads(summary.read_text()) if rc == 0 and summary.exists() else None


def _launch_command(launcher: str | None) -> list[str]:
    """The words that start a run: this interpreter, or ``launcher`` (``torchrun`` not on the PATH
    is this interpreter's ``-m torch.distributed.run``, the same program)."""
    if not launcher:
        return [sys.executable]
    words = shlex.split(launcher)
    if words and words[0] == "torchrun" and shutil.which("torchrun") is None:
        words = [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    return words


def _val_curve(summary: dict) -> tuple[list[int], list[float]]:
    """(training tokens, validation loss) along a run, from its ``summary.json``."""
    curve = summary.get("curve") or {}
    return list(curve.get("tokens", [])), list(curve.get("val_loss", []))


def _mean_std(xs: list[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not xs:
        return float("nan"), float("nan")
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(out: Path, baseline: str = "bf16") -> str:
    """Write summary.md / summary.csv / PNGs for every run under ``out``; returns the markdown."""
    rows, curves, retrieval = [], {}, {}
    variants = sorted(p.name for p in out.iterdir() if p.is_dir())
    for v in variants:
        runs = [d for d in sorted((out / v).glob("seed*")) if (d / "summary.json").exists()]
        if not runs:
            continue
        sums = [json.loads((d / "summary.json").read_text()) for d in runs]
        get = lambda k: [s.get(k) for s in sums]  # noqa: E731
        loss, loss_sd = _mean_std(get("best_val_loss"))
        bpc, bpc_sd = _mean_std(get("best_val_bpc"))
        tps, _ = _mean_std(get("tokens_per_s"))
        bpp, _ = _mean_std(get("train_bytes_per_param"))
        rows.append({"variant": v, "seeds": len(runs), "best_val_loss": loss, "loss_std": loss_sd,
                     "best_val_bpc": bpc, "bpc_std": bpc_sd, "tokens_per_s": tps,
                     "weight_bytes": sums[0].get("weight_format_bytes"), "params": sums[0].get("params"),
                     "train_bytes_per_param": bpp})
        steps_curves = [_val_curve(s) for s in sums]
        if steps_curves and steps_curves[0][0]:
            n = min(len(c[0]) for c in steps_curves)
            curves[v] = (steps_curves[0][0][:n], [statistics.fmean(c[1][i] for c in steps_curves) for i in range(n)])
        accs = [s.get("retrieval") for s in sums if s.get("retrieval")]
        if accs:
            keys = sorted({int(k) for a in accs for k in a})
            retrieval[v] = (keys, [statistics.fmean(a.get(str(k), a.get(k, float("nan"))) for a in accs) for k in keys])
    if not rows:
        raise ValueError(f"no finished runs (summary.json) under {out}")
    base = next((r for r in rows if r["variant"] == baseline), None)
    for r in rows:
        r["gap_pct"] = 100 * (r["best_val_loss"] / base["best_val_loss"] - 1) if base else float("nan")
        r["retrieval_mean"] = statistics.fmean(retrieval[r["variant"]][1]) if r["variant"] in retrieval else float("nan")
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    fmt = lambda x, p=4: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{p}f}"  # noqa: E731
    md = ["| variant | seeds | best val loss (nats/token) | best val bits/char | gap to bf16 | tokens/s | "
          "weight bytes | train bytes/param | retrieval acc |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        md.append(f"| {r['variant']} | {r['seeds']} | {fmt(r['best_val_loss'])} ± {fmt(r['loss_std'])} | "
                  f"{fmt(r['best_val_bpc'])} ± {fmt(r['bpc_std'])} | {fmt(r['gap_pct'], 2)}% | {fmt(r['tokens_per_s'], 0)} | "
                  f"{r['weight_bytes'] if r['weight_bytes'] is not None else '-':,} | {fmt(r['train_bytes_per_param'], 2)} | "
                  f"{fmt(r['retrieval_mean'], 3)} |")
    text = "\n".join(md)
    (out / "summary.md").write_text(text + "\n")
    if curves:
        line_plot(out / "val_loss.png", curves, title="validation loss (mean over seeds)", xlabel="training tokens",
                  ylabel="validation loss (nats/token)", logx=True)
    if retrieval:
        line_plot(out / "retrieval.png", retrieval, title="retrieval accuracy, memory on (mean over seeds)",
                  xlabel="distance to the needle (tokens)", ylabel="accuracy", logx=True, ylim=(0, 1))
    return text


def main(argv=None) -> None:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    allowed = {"sweep", "jobs", "seeds", "variants", "out", "summarize", "launcher"}
    unknown = set(args) - allowed
    if unknown:
        raise SystemExit(f"unknown argument(s) {sorted(unknown)}; use key=value with keys {sorted(allowed)}")
    if args.get("summarize"):
        print(summarize(Path(args.summarize)))
        return
    sweep = load_sweep(args.get("sweep", "small_cpu"))
    seeds = list(args.get("seeds", sweep.get("seeds", [0])))
    variants = dict(sweep["variants"])
    if args.get("variants"):
        missing = set(args.variants) - set(variants)
        if missing:
            raise SystemExit(f"unknown variant(s) {sorted(missing)}; this sweep has {sorted(variants)}")
        variants = {k: variants[k] for k in args.variants}
    out = Path(args.get("out", sweep.get("out", f"runs/sweeps/{sweep['name']}")))
    jobs = int(args.get("jobs", sweep.get("jobs", 1)))
    base = list(sweep.get("base", []))
    launcher = args.get("launcher", sweep.get("launcher"))
    todo = [(v, ov, s) for v, ov in variants.items() for s in seeds]
    print(f"sweep {sweep['name']}: {len(variants)} variants x {len(seeds)} seeds = {len(todo)} runs, {jobs} at a time -> {out}")
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda a: run_one(out, a[0], list(a[1]), a[2], base, print, launcher), todo))
    print(summarize(out, sweep.get("baseline", "bf16")))
    print(f"\nwritten: {out}/summary.md, summary.csv, val_loss.png" + (", retrieval.png" if (out / "retrieval.png").exists() else ""))


if __name__ == "__main__":
    main()
