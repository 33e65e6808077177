"""The training loop of ``python -m experiments.train``, in named parts:

- :class:`Trainer`: builds the parts around an :class:`~experiments.loop.Stepper` and runs the loop.
- :class:`Metrics`: TensorBoard scalars, per-layer telemetry, the progress bar, throughput windows,
  and reading the steps' numbers from the device.
- :class:`NanGuard`: the ``train.debug`` fault injection, consecutive bad steps, and the diagnosis
  (:class:`NonFiniteError`) naming the layer where inf/NaN began.
- :class:`~experiments.checkpointing.Checkpoints` (:mod:`experiments.checkpointing`): which
  checkpoint a run continues from (``resume``), restoring it, the payload, saving steps; ``init_from``.
- :class:`~experiments.evaluation_loop.Evaluation` (:mod:`experiments.evaluation_loop`): validation
  loss and bits/char, retrieval accuracy by distance, the sample.

When the host waits for the device. A step is queued without waiting (:mod:`experiments.loop`);
the loop reads the queued steps' loss, gradient norm, inf/NaN flag and loss scale in one copy at
*read points*: every ``train.log_every`` steps, at validation and checkpoint steps, and at the last
step. Everything that needs those numbers runs there, for each step read, in order: the loss average
of the progress bar, the warning for a skipped step, the NaN guard, the precision report after the
first update. So the guard stops a run at the first read point where the last
``train.max_bad_steps`` steps were all bad, up to ``log_every - 1`` steps after the limit was
reached (a run of bad steps that has ended by the read point does not stop it). Telemetry
(``train.telemetry_every``) reads its statistics when it logs them. Throughput is tokens over the
wall time of the steps between read points, waiting included, validation and checkpoints excluded.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
from omegaconf import DictConfig
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import lowprec
import optim

from .build import ConfigError, Run, build_run
from .checkpointing import Checkpoints
from .evaluation_loop import Evaluation
from .loop import Stepper, StepResult, nonfinite_tensors, read_results

__all__ = ["Metrics", "NanGuard", "NonFiniteError", "Trainer"]

log = logging.getLogger("experiments.train")


class NonFiniteError(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had inf/NaN; the message names where they began."""


# ---------------------------------------------------------------------------------- NaN guard

class NanGuard:
    """Counts consecutive steps whose update was skipped for inf/NaN gradients (from the steps
    read); at ``train.max_bad_steps`` of them it stops the run with :class:`NonFiniteError`."""

    def __init__(self, run: Run, stepper: Stepper, telemetry: lowprec.Telemetry):
        self.run, self.stepper, self.telemetry = run, stepper, telemetry
        self.limit = run.train["max_bad_steps"]
        self.debug = run.train.get("debug") or {}
        self.bad_run = run.scaler.consecutive_bad  # as restored from a checkpoint

    def inject(self, step: int) -> None:
        """Debug hook (train.debug.nan_at_step, nan_layer): before that step, fill a parameter/buffer,
        or a layer's weight, with NaN."""
        if self.debug.get("nan_at_step") != step:
            return
        name, model = self.debug["nan_layer"], self.run.model
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        for cand in (name, f"{name}.weight", f"{name}.w_scale"):
            if cand in tensors and tensors[cand] is not None and tensors[cand].is_floating_point():
                with torch.no_grad():
                    tensors[cand].fill_(float("nan"))
                log.warning("debug: %s set to NaN before step %d", cand, step)
                return
        raise ConfigError(f"train.debug.nan_layer={name!r} names no floating parameter or layer; "
                          f"e.g. {', '.join(list(tensors)[:6])}, ...")

    def count(self, r: StepRead) -> None:
        """One step read, in order: a skipped one is logged and extends the run of bad steps."""
        if r.taken:
            self.bad_run = 0
            return
        self.bad_run += 1
        log.warning("step %d: inf/NaN (loss %.4g), update skipped (%d in a row, limit %d); "
                    "loss scale now %g", r.step, r.loss, self.bad_run, self.limit, r.scale_after)

    def check(self, last: StepRead, last_good: Path | None) -> None:
        """Stop if the steps up to ``last`` (the newest read) end in ``limit`` bad ones."""
        if self.bad_run >= self.limit:
            raise NonFiniteError(self.diagnose(last.step, last.loss, last_good))

    def diagnose(self, step: int, loss: float, last_good: Path | None) -> str:
        """Re-run the last step's forward and backward with telemetry on; say where inf/NaN began."""
        telemetry = self.telemetry
        telemetry.reset()
        telemetry.enable()
        try:
            self.stepper.rerun_last()
        finally:
            telemetry.disable()
        first = telemetry.first_nonfinite()
        where = (f"first non-finite values in layer {first[0]!r} ({first[1]})" if first else
                 "no quantized layer saw a non-finite operand (the loss or an unquantized module did)")
        bad = nonfinite_tensors(self.run.model)
        params = f"; non-finite parameters/buffers: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}" if bad else ""
        keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
        return (f"stopped at step {step}: {self.limit} consecutive steps with inf/NaN "
                f"(train.max_bad_steps; last loss {loss:.4g}, loss scale {self.run.scaler.loss_scale:g}); "
                f"{where}{params}; {keep}")


# ------------------------------------------------------------------------------------ metrics

class _NoWriter:
    """A SummaryWriter that writes nothing (ranks other than 0)."""

    def add_scalar(self, *args, **kwargs) -> None:
        pass

    add_text = add_scalar
    flush = add_scalar
    close = add_scalar


class StepRead(NamedTuple):
    """One step's numbers, read from the device."""

    step: int
    loss: float
    grad_norm: float
    taken: bool
    loss_scale: float     # used for the step's backward
    scale_after: float    # after the step's update of S


class Metrics:
    """TensorBoard (``run_dir/tb``), per-layer telemetry, the progress bar and throughput; the steps'
    numbers are read here, in one copy per read point."""

    def __init__(self, run: Run, run_dir: Path, start: int, cfg_yaml: str, main: bool = True):
        self.run, self.t = run, run.train
        # of several ranks only rank 0 writes TensorBoard and shows the progress bar
        self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1 if start else None) if main \
            else _NoWriter()
        if start == 0:
            self.writer.add_text("config", "```\n" + cfg_yaml + "\n```", 0)
            self.writer.add_text("precision_report", str(run.report), 0)
        self.telemetry = lowprec.Telemetry(run.model)
        self.bar = tqdm(total=self.t["steps"], initial=start, disable=not (self.t["progress"] and main),
                        dynamic_ncols=True, file=sys.stderr, unit="step", mininterval=1.0)
        self.ema: float | None = None
        self.window_tokens, self.window_s = 0, 0.0
        self._pending: list[tuple[int, StepResult]] = []
        self._clock = time.perf_counter()

    def watch(self, step: int) -> bool:
        """Telemetry on for this step (every ``train.telemetry_every`` steps)?"""
        on = bool(self.t["telemetry_every"]) and step % self.t["telemetry_every"] == 0
        if on:
            self.telemetry.reset()
            self.telemetry.enable()
        return on

    def log_telemetry(self, step: int) -> None:
        self.telemetry.disable()
        for (layer, operand), st in self.telemetry.stats().items():
            for stat, value in st.items():
                self.writer.add_scalar(f"{stat}/{layer}/{operand}", value, step)

    def add(self, step: int, res: StepResult, meta: dict) -> None:
        meta["tokens"] += res.tokens
        self.window_tokens += res.tokens
        self._pending.append((step, res))

    def read(self, meta: dict) -> list[StepRead]:
        """The steps added since the last read, as numbers (waits for them); their wall time joins
        the throughput window and the training time, their losses the progress bar's average."""
        pending, self._pending = self._pending, []
        steps, (scale_now,) = read_results([r for _, r in pending], self.run.scaler.current_scale())
        self.restart_clock(meta)
        after = [s[3] for s in steps[1:]] + [scale_now]  # S changes only in the update
        out = [StepRead(step, *values, scale) for (step, _), values, scale in zip(pending, steps, after)]
        for r in out:
            if r.taken:
                self.ema = r.loss if self.ema is None else 0.9 * self.ema + 0.1 * r.loss
        return out

    def restart_clock(self, meta: dict | None = None) -> None:
        """Add the time since the clock last started to the training time (with ``meta``), or drop
        it (without: validation, checkpoints); start it again."""
        now = time.perf_counter()
        if meta is not None:
            self.window_s += now - self._clock
            meta["train_s"] += now - self._clock
        self._clock = now

    def log(self, r: StepRead) -> None:
        """TensorBoard scalars of step ``r`` and the window's throughput; the progress bar's numbers."""
        lr = self.run.optimizer.param_groups[0]["lr"]
        tps = self.window_tokens / max(self.window_s, 1e-9)
        for tag, v in (("train/loss", r.loss), ("train/lr", lr), ("train/grad_norm", r.grad_norm),
                       ("train/loss_scale", r.loss_scale), ("train/tokens_per_s", tps)):
            self.writer.add_scalar(tag, v, r.step)
        self.bar.set_postfix(loss=f"{self.ema:.3f}" if self.ema is not None else "nan", tok_s=f"{tps:,.0f}",
                             lr=f"{lr:.2e}", refresh=False)
        self.window_tokens, self.window_s = 0, 0.0

    def log_validation(self, step: int, val: dict, retrieval: dict | None) -> None:
        self.writer.add_scalar("val/loss", val["loss"], step)
        self.writer.add_scalar("val/bpc", val["bpc"], step)
        for mode, accs in (retrieval or {}).items():
            for d, acc in accs.items():
                self.writer.add_scalar(f"retrieval_{mode}/d{d}", acc, step)


# ------------------------------------------------------------------------------------ trainer

class Trainer:
    """One training run: ``Trainer(cfg).train()`` returns the summary (see ``experiments.train``).
    Every ``ConfigError`` (config, data, checkpoint) surfaces in the constructor, before anything
    is written."""

    def __init__(self, cfg: DictConfig, parallel=None):
        """``parallel``: the ``experiments.parallel.Distributed`` this process belongs to (from
        ``init_distributed``); None or a single process: the 1-process run."""
        self.t_start = time.perf_counter()
        self.parallel = parallel if parallel is not None and parallel.world_size > 1 else None
        self.main = self.parallel is None or self.parallel.is_main
        self.run = run = build_run(cfg, self.parallel)
        self.t = t = run.train
        self.run_dir = Path(str(cfg.run_dir))
        self.stepper = Stepper(run.model, run.optimizer, run.scheduler, run.scaler, run.source, tbptt=t["tbptt"],
                               k=t["tbptt_segments"] if t["tbptt"] else 1, grad_clip=t["grad_clip"],
                               device=run.device, compile=t["compile"], parallel=self.parallel)
        self.checkpoints = Checkpoints(run, self.stepper, self.run_dir, t["keep_ckpts"], cfg, self.parallel)
        self.start, self.meta = self.checkpoints.start(cfg.get("resume"), cfg.get("init_from"))
        self.evaluation = Evaluation(run)
        self.step = self.start
        self.resumable = False  # after a Ctrl-C: a checkpoint to continue from exists
        self._report_done = False

    # ---- the run's files and header
    def _write_report(self, with_memory: bool) -> bool:
        """``precision_report.md``: the policy's per-layer table, the optimizer's parts and (once the
        optimizer holds its state) the resident bytes per parameter of weights + state."""
        run = self.run
        text = f"# precision report\n\n{run.report}\n\n# optimizer\n\n{run.optimizer.describe()}\n"
        if with_memory:
            text += (f"\n# memory per parameter (weights + optimizer state)\n\n"
                     f"{optim.memory_report(run.model, run.optimizer)}\n")
        (self.run_dir / "precision_report.md").write_text(text)
        return with_memory

    def _after_first_update(self) -> None:
        """The report again with the backends as they ran on the device and the optimizer state;
        a warning when quantized layers run with ``backend: unquantized`` (plain bf16 GEMMs): such a
        run trains those layers at bf16, not at the policy's formats."""
        run = self.run
        run.report = run.report.refreshed(run.model)
        self._report_done = self._write_report(with_memory=True)
        names = run.report.unquantized_gemms(run.model)
        if names:
            log.warning("%d quantized layer(s) have backend 'unquantized': their GEMMs run in plain bf16 and their "
                        "formats are NOT trained: %s%s.", len(names), ", ".join(names[:6]),
                        ", ..." if len(names) > 6 else "")

    def _header(self) -> int:
        """Log what is being trained; returns the number of parameters."""
        run, t, k = self.run, self.t, self.stepper.k
        n_params = sum(p.numel() for p in run.model.parameters()) + sum(
            _native_numel(m) for m in run.model.modules() if getattr(m, "is_native", False))
        ds, mc = run.data.summary(), run.model.cfg
        if self.parallel is not None:
            d = self.parallel
            log.info("data parallel: each of the %d dp ranks reads %d of the %d rows of every batch",
                     d.dp, t["batch_size"] // d.dp, t["batch_size"])
        for line in (
            (f"model: HybridLM d_model={mc.d_model}, {mc.n_blocks} blocks, window {mc.window}, memory "
             f"{'on (' + mc.rnn_mode + ')' if mc.memory else 'off'}: {n_params:,} parameters on {run.device}"),
            (f"precision {run.report.policy!r}: {run.report.total_format_bytes:,} weight bytes at format "
             f"({run.report.total_format_bytes / max(run.report.bf16_bytes, 1):.3f}x bf16), "
             f"{run.report.total_resident_bytes:,} resident; table in {self.run_dir / 'precision_report.md'}"),
            f"loss scaling: {run.scaler.mode}; optimizer parts: {', '.join(run.optimizer.parts)}",
            (f"data: {ds['source']} ({ds['tokenizer']}, vocab {ds['vocab_size']}): train {ds['train']['documents']} "
             f"documents {ds['train']['tokens']:,} tokens, val {ds['val']['documents']} documents "
             f"{ds['val']['tokens']:,} tokens"),
            (f"steps {self.start + 1}..{t['steps']}, {k}x{t['batch_size']}x{t['seq_len']} tokens each "
             f"({'TBPTT, state carried' if t['tbptt'] else 'random windows'})"),
        ):
            log.info("%s", line)
        return n_params

    # ---- the loop
    def train(self) -> dict[str, Any]:
        """Train from the restored step to ``train.steps``; write ``summary.json``; return the summary."""
        run, t, meta = self.run, self.t, self.meta
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            (self.run_dir / "config.yaml").write_text(self.checkpoints.cfg_yaml)
            self._write_report(with_memory=self.start > 0)
        n_params = self._header()
        metrics = self.metrics = Metrics(run, self.run_dir, self.start, self.checkpoints.cfg_yaml, self.main)
        guard = NanGuard(run, self.stepper, metrics.telemetry)
        val = retrieval = None
        # on several ranks a Ctrl-C stops at once: ranks that see it at different steps cannot agree
        # on a last step to save without a collective in every step
        stop = _CtrlC(enabled=self.parallel is None)
        try:
            with logging_redirect_tqdm(), stop:
                metrics.restart_clock()
                for step in range(self.start + 1, t["steps"] + 1):
                    if stop.requested:  # after a complete step: save it, then stop
                        raise KeyboardInterrupt
                    self.step = step  # the step in progress; the last one done when the loop ends
                    guard.inject(step)
                    watch = metrics.watch(step)
                    metrics.add(step, self.stepper.step(), meta)
                    if watch:
                        metrics.log_telemetry(step)
                    at = {name: step % t[f"{name}_every"] == 0 or step == t["steps"] for name in ("log", "eval", "ckpt")}
                    if not any(at.values()):
                        metrics.bar.update(1)
                        continue
                    read = metrics.read(meta)  # the one wait for the device in these steps
                    for r in read:
                        if r.taken and not self._report_done and self.main:  # optimizer state exists now
                            self._after_first_update()
                        guard.count(r)
                    last = read[-1]
                    guard.check(last, self.checkpoints.last_good)
                    if at["log"]:
                        metrics.log(last)
                    if at["eval"]:
                        val = self.evaluation.validate()
                        meta["best_val_loss"] = min(meta["best_val_loss"], val["loss"])
                        meta["best_val_bpc"] = min(meta["best_val_bpc"], val["bpc"])
                        meta["curve"].append([step, meta["tokens"], val["loss"], val["bpc"]])
                        log.info("step %d: val loss %.4f nats/token, %.4f bits/char", step, val["loss"], val["bpc"])
                        if t["retrieval_eval"]:  # accuracy along training, not only at the end
                            retrieval = self.evaluation.retrieval()
                        metrics.log_validation(step, val, retrieval if t["retrieval_eval"] else None)
                    if at["ckpt"] and guard.bad_run == 0:
                        self.checkpoints.save(step, meta)
                    metrics.restart_clock()
                    metrics.bar.update(1)
        except KeyboardInterrupt:
            self._interrupted(stop.requested == 1)
            raise
        finally:
            metrics.bar.close()
            metrics.writer.flush()
        return self._finish(val, retrieval, n_params)

    def _interrupted(self, graceful: bool) -> None:
        """Ctrl-C: after a complete step (``graceful``) save it, if its update was good; say which
        checkpoint stands."""
        self.metrics.bar.close()
        step, ckpts = self.step, self.checkpoints
        before = ckpts.last_good
        if graceful and step > self.start:
            self.metrics.read(self.meta)  # the steps' time and tokens into meta
        if graceful and step > self.start and self.run.scaler.consecutive_bad == 0:
            ckpts.save(step, self.meta)
            log.warning("interrupted: saved step %d in %s", step, ckpts.manager.dir)
        elif before is not None:
            log.warning("interrupted at step %d; the newest checkpoint is %s", step, before)
        self.resumable = before is not None or step > self.start

    def _finish(self, val, retrieval, n_params: int) -> dict[str, Any]:
        run, t, meta, step, writer = self.run, self.t, self.meta, self.step, self.metrics.writer
        if val is None:  # nothing left to train (resumed a finished run)
            val = self.evaluation.validate()
        sample = ""
        if t["sample_tokens"]:
            try:
                sample = self.evaluation.sample()
            except RuntimeError as e:  # the checkpoints and numbers above stand without a sample
                log.error("sampling failed (%s: %s); the run's checkpoints and summary are unaffected",
                          type(e).__name__, e)
        writer.add_text("sample", "```\n" + sample + "\n```", step)
        if t["retrieval_eval"] and retrieval is None:  # resumed a finished run
            retrieval = self.evaluation.retrieval()
        writer.close()
        curve, last_good = meta["curve"], self.checkpoints.export()
        summary = {
            "steps": step, "val_loss": val["loss"], "val_bpc": val["bpc"],
            "best_val_loss": min(meta["best_val_loss"], val["loss"]), "best_val_bpc": min(meta["best_val_bpc"], val["bpc"]),
            "tokens": meta["tokens"], "tokens_per_s": meta["tokens"] / max(meta["train_s"], 1e-9),
            "wall_s": time.perf_counter() - self.t_start, "params": n_params, "policy": run.report.policy,
            "weight_format_bytes": run.report.total_format_bytes, "device": str(run.device),
            "train_bytes_per_param": optim.memory_report(run.model, run.optimizer).total.resident_per_param,
            # accuracy by distance with memory on (what ablate tabulates), and every control
            "retrieval": retrieval["on"] if retrieval else None, "retrieval_controls": retrieval,
            "checkpoint": str(last_good) if last_good else None, "sample": sample,
            # validation along training, what experiments.ablate plots
            "curve": {"step": [c[0] for c in curve], "tokens": [c[1] for c in curve],
                      "val_loss": [c[2] for c in curve], "val_bpc": [c[3] for c in curve]},
        }
        if self.parallel is not None:
            d = self.parallel
            summary["processes"] = {"world_size": d.world_size, "dp": d.dp, "tp": d.tp, "backend": d.backend}
        if not self.main:
            return summary
        (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"\nvalidation: loss {val['loss']:.4f} nats/token, {val['bpc']:.4f} bits/char "
              f"(best {summary['best_val_bpc']:.4f}) after {step} steps, {meta['tokens']:,} tokens, "
              f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_s']:.0f} s in all\n"
              f"run directory: {self.run_dir}\n--- sample ---\n{sample}\n--------------")
        return summary


def _native_numel(layer) -> int:
    """Elements of a native layer's whole weight (its pieces on every rank, when split)."""
    from lowprec.distributed import native_full_shape

    return math.prod(native_full_shape(layer))


class _CtrlC:
    """While active, the first Ctrl-C asks the training loop to stop after the step in progress
    (the loop saves that step's checkpoint); a second one stops at once (the newest checkpoint
    stands). Outside the main thread signals cannot be caught: Ctrl-C stops at once there."""

    def __init__(self, enabled: bool = True):
        self.requested = 0
        self._old = None
        self.enabled = enabled

    def _handle(self, signum, frame):
        self.requested += 1
        if self.requested > 1:
            raise KeyboardInterrupt
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self):
        if self.enabled and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False
