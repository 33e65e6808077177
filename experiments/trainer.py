"""The training loop of ``python -m experiments.train``, in named parts:

- :class:`Checkpoints`: which checkpoint a run continues from (``resume``), restoring it, the
  payload, saving steps; ``init_from``.
- :class:`Evaluation`: validation loss and bits/char, retrieval accuracy by distance, the sample.
- :class:`NanGuard`: the ``train.debug`` fault injection, consecutive bad steps, and the diagnosis
  (:class:`NonFiniteError`) naming the layer where inf/NaN began.
- :class:`Metrics`: TensorBoard scalars, per-layer telemetry, the progress bar, throughput windows,
  and reading the steps' numbers from the device.
- :class:`Trainer`: builds them around an :class:`~experiments.loop.Stepper` and runs the loop.

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
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import lowprec
import optim
from hybrid import HybridState

from .build import ConfigError, Run, build_run
from .checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from .loop import (
    Stepper,
    StepResult,
    evaluate,
    evaluate_stream,
    generate,
    nonfinite_tensors,
    read_results,
)
from .rank_data import gather_state_rows, state_rows
from .sharded_checkpoint import (
    export_single_file,
    import_single_file,
    load_sharded,
    read_extra,
    save_sharded,
    sharded_checkpoints,
)
from .tasks import memory_retrieval_accuracy, prompt_kwargs, training_row_len

__all__ = ["Checkpoints", "Evaluation", "Metrics", "NanGuard", "NonFiniteError", "Trainer"]

log = logging.getLogger("experiments.train")

# config sections that must match for a checkpoint to be resumed (the data stream's shape too)
_RESUME_MUST_MATCH = ("model", "precision", "data", "train.batch_size", "train.seq_len", "train.tbptt",
                      "train.tbptt_segments", "train.seed", "train.task", "train.task_loss")
# what a checkpoint written before a key existed ran with
_RESUME_DEFAULTS = {"train.task": "lm", "train.task_loss": "all"}


class NonFiniteError(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had inf/NaN; the message names where they began."""


def _select(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


# ------------------------------------------------------------------------------ checkpointing

class Checkpoints:
    """Checkpoints of one run, under ``run_dir/checkpoints``: ``ckpt-<step>.pt``, one file written by
    one process (:mod:`experiments.checkpoint`), and ``dcp-<step>/``, written by every rank of a run
    on several processes (:mod:`experiments.sharded_checkpoint`). Either kind resumes at any number
    of processes; at the end of a run on several processes rank 0 exports the newest sharded one as
    ``ckpt-<step>.pt`` (what ``experiments.evaluate`` reads)."""

    def __init__(self, run: Run, stepper: Stepper, run_dir: Path, keep: int, cfg: DictConfig, parallel=None):
        self.run, self.stepper = run, stepper
        self.manager = CheckpointManager(run_dir / "checkpoints", keep)
        self.cfg_now = OmegaConf.to_container(cfg, resolve=True)
        self.cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        self.last_good: Path | None = None
        self.parallel = parallel  # experiments.parallel.Distributed of several ranks, or None
        self.main = parallel is None or parallel.is_main

    def start(self, resume, init_from) -> tuple[int, dict]:
        """Restore the checkpoint ``resume`` selects (or load ``init_from``'s weights); returns the
        last step done and the run's ``meta`` (tokens, train time, best validation, the curve),
        which travels in every checkpoint so that the validation curve survives a resume."""
        found = self.find(resume)
        start, meta = 0, {"tokens": 0, "train_s": 0.0, "best_val_loss": math.inf, "best_val_bpc": math.inf,
                          "curve": []}
        if found is not None:
            start = self.restore(*found)
            meta.update(found[1].get("meta", {}))
            log.info("resumed from %s at step %d", found[0], start)
        elif init_from:
            log.info("model weights from %s (init_from); optimizer, schedule and data start fresh",
                     self.init_from(init_from))
        ckpts = self._all(self.manager)
        self.last_good = ckpts[-1][2] if ckpts else None
        return start, meta

    def _all(self, manager: CheckpointManager) -> list[tuple[int, int, Path]]:
        """(step, preference, path) of the checkpoints of both kinds in ``manager``'s directory, in the
        order to try them last first: by step, and at the same step the kind this run writes."""
        sharded_first = self.parallel is not None
        return sorted([(s, int(not sharded_first), p) for s, p in manager.checkpoints()]
                      + [(s, int(sharded_first), p) for s, p in sharded_checkpoints(manager.dir)])

    def _latest(self, manager: CheckpointManager) -> tuple[Path, dict] | None:
        """The newest checkpoint of ``manager``'s directory that reads, with its payload (a sharded
        one: its ``extra``); damaged ones are skipped with a warning, as ``latest_valid`` does."""
        if not sharded_checkpoints(manager.dir):
            return manager.latest_valid()
        errors = []
        for _, _, path in reversed(self._all(manager)):
            try:
                return path, (read_extra(path) if path.is_dir() else load_checkpoint(path, None))
            except CorruptCheckpointError as e:
                log.warning("%s; falling back to the previous checkpoint", e)
                errors.append(str(e))
            except Exception as e:  # noqa: BLE001 -- DCP raises several kinds for a damaged directory
                log.warning("sharded checkpoint %s cannot be read (%s: %s); falling back to the previous checkpoint",
                            path, type(e).__name__, e)
                errors.append(f"{path}: {e}")
        if errors:
            raise CorruptCheckpointError(f"no valid checkpoint in {str(manager.dir)!r}: " + "; ".join(errors))
        return None

    def find(self, resume) -> tuple[Path, dict] | None:
        """The checkpoint to continue from: ``None``/false → none (and the run dir must hold none);
        ``auto`` → the newest valid one in the run dir, if any; a file → that file; a directory → the
        newest valid one in it (or in its ``checkpoints/``), or that sharded checkpoint itself."""
        ckpts = self.manager
        if resume in (None, False, "", "null", "none"):
            existing = self._all(ckpts)
            if existing:
                raise ConfigError(f"resume=null but {ckpts.dir} already holds checkpoints "
                                  f"({existing[-1][2].name}, ...); pass resume=auto to continue "
                                  "that run, or choose another run_dir / hydra.run.dir")
            return None
        if resume == "auto":
            found = self._latest(ckpts)
            if found is None:
                log.info("resume=auto: no checkpoint in %s, starting from step 0", ckpts.dir)
            return found
        path = Path(str(resume)).expanduser()
        if path.is_dir() and ((path / ".metadata").exists() or path.name.startswith("dcp-")):
            try:
                return path, read_extra(path)
            except Exception as e:  # noqa: BLE001
                raise ConfigError(f"resume={str(resume)!r}: the sharded checkpoint cannot be read "
                                  f"({type(e).__name__}: {e})") from None
        if path.is_dir():
            sub = path / "checkpoints"
            found = self._latest(CheckpointManager(sub if sub.is_dir() else path))
            if found is None:
                raise ConfigError(f"resume={str(resume)!r}: no checkpoint (ckpt-<step>.pt) in that directory")
            return found
        if not path.exists():
            raise ConfigError(f"resume={str(resume)!r}: no such file or directory; give a checkpoint file, "
                              "a run directory, auto or null")
        return path, load_checkpoint(path)

    def _check_config(self, path: Path, payload: dict) -> None:
        """``ConfigError`` when checkpoint ``path`` was written with other settings of the model, data
        or step shape (the number of processes may differ)."""
        cfg_now = self.cfg_now
        saved = OmegaConf.to_container(OmegaConf.create(payload["config"]))

        def value(cfg, k):
            v = _select(cfg, k)
            return _RESUME_DEFAULTS.get(k) if v is None else v

        diff = [k for k in _RESUME_MUST_MATCH if value(saved, k) != value(cfg_now, k)]
        if diff:
            raise ConfigError(f"checkpoint {str(path)!r} was written by a run whose {', '.join(diff)} "
                              "differ from this one's; resume with the same settings (see its config.yaml)")
        if _select(saved, "train.steps") != _select(cfg_now, "train.steps"):
            log.warning("train.steps changed from %s to %s: the learning-rate schedule follows the new length",
                        _select(saved, "train.steps"), _select(cfg_now, "train.steps"))

    def restore(self, path: Path, payload: dict) -> int:
        """Load ``payload`` (checkpoint ``path``; of a sharded one, its ``extra``) into the run;
        ``ConfigError`` when it was written with other settings of the model, data or step shape.
        Returns its step."""
        if path.is_dir():
            return self._restore_sharded(path, payload)
        if self.parallel is not None:
            return self._restore_file_on_ranks(path, payload)
        run = self.run
        self._check_config(path, payload)
        try:
            run.model.load_state_dict(payload["model"])
            run.optimizer.load_state_dict(payload["optimizer"])
            run.scheduler.load_state_dict(payload["scheduler"])
            run.scaler.load_state_dict(payload["scaler"])
            self.stepper.load_state_dict(payload["stepper"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint {str(path)!r} does not fit this run: {e}") from None
        set_rng_state(payload["rng"])
        return int(payload["step"])

    def _restore_sharded(self, path: Path, extra: dict, *, source: Path | None = None) -> int:
        """Load the sharded checkpoint ``path`` (``extra`` read already) on this run's ranks (or in
        this one process): each rank's shards of the model and optimizer, the schedule, the loss
        scale, the data position and this rank's rows of the carried state. ``source``: the file it
        was converted from (checked already)."""
        run = self.run
        if source is None:
            self._check_config(path, extra)
        try:
            load_sharded(path, run.model, run.optimizer)
            run.scheduler.load_state_dict(extra["scheduler"])
            run.scaler.load_state_dict(extra["scaler"])
            self._load_stepper(extra["stepper"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ConfigError(f"checkpoint {str(source or path)!r} does not fit this run: {e}") from None
        return int(extra["step"])

    def _load_stepper(self, sd: dict) -> None:
        """The data position and the carried state of the global batch (this rank's rows of it)."""
        st = self.stepper
        st.source.load_state_dict(sd["source"])
        hs = sd.get("hybrid_state")
        state = None if hs is None else HybridState.from_state_dict(hs)
        if state is not None and self.parallel is not None:
            state = state_rows(state, self.parallel.dp_rank, self.parallel.dp)
        st.state = None if state is None else state.to(st.device)

    def _restore_file_on_ranks(self, path: Path, payload: dict) -> int:
        """A one-file checkpoint (one process's whole model) on several ranks: rank 0 writes it as a
        sharded checkpoint next to the run's (``import_single_file``), every rank loads its shards of
        that, which is then removed."""
        self._check_config(path, payload)
        tmp = self.manager.dir / f".import-{path.stem}"

        def convert():
            shutil.rmtree(tmp, ignore_errors=True)
            import_single_file(payload, tmp, self.run.model, self.run.optimizer)

        self._on_main(convert, f"checkpoint {str(path)!r} does not fit this run")
        try:
            return self._restore_sharded(tmp, payload, source=path)
        finally:
            self._on_main(lambda: shutil.rmtree(tmp, ignore_errors=True), "removing the converted checkpoint")

    def _on_main(self, fn, what: str):
        """Run ``fn`` on rank 0 while the other ranks wait; its error (as ``ConfigError``) on every rank."""
        if self.parallel is None:
            return fn()
        out, err = None, None
        if self.main:
            try:
                out = fn()
            except (RuntimeError, ValueError, KeyError, OSError) as e:
                err = f"{what}: {type(e).__name__}: {e}"
        box = [out, err]
        dist.broadcast_object_list(box, src=0)
        if box[1] is not None:
            raise ConfigError(box[1])
        return box[0]

    def init_from(self, source) -> Path:
        """Load the model weights of checkpoint ``source`` (a file or a run directory) into the model;
        ``ConfigError`` naming what differs when the model or its precision does not match."""
        try:
            path = resolve_checkpoint(str(source))
        except FileNotFoundError as e:
            raise ConfigError(f"init_from: {e}") from None
        theirs = load_checkpoint(path)["model"]
        ours = self.run.model.state_dict()
        missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
        shapes = sorted(k for k in set(ours) & set(theirs) if isinstance(ours[k], torch.Tensor)
                        and tuple(ours[k].shape) != tuple(theirs[k].shape))
        if missing or extra or shapes:
            what = "; ".join(f"{name} {keys[:3]}{'...' if len(keys) > 3 else ''}" for name, keys in
                             (("missing", missing), ("unexpected", extra), ("shape differs", shapes)) if keys)
            raise ConfigError(f"init_from={str(source)!r}: {path.name} does not fit this model ({what}); "
                              "give a checkpoint of the same model and precision (see its config.yaml)")
        if self.parallel is None:
            self.run.model.load_state_dict(theirs)
            return path
        tmp = self.manager.dir / f".init-{path.stem}"  # each rank takes its shards of the whole weights

        def convert():
            shutil.rmtree(tmp, ignore_errors=True)
            import_single_file({"model": theirs}, tmp, self.run.model)

        self._on_main(convert, f"init_from={str(source)!r}")
        try:
            load_sharded(tmp, self.run.model, rng=False)
        finally:
            self._on_main(lambda: shutil.rmtree(tmp, ignore_errors=True), "removing the converted checkpoint")
        return path

    def payload(self, step: int, meta: dict) -> dict[str, Any]:
        run = self.run
        return {"format": 1, "step": step, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
                "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                "stepper": self.stepper.state_dict(), "rng": rng_state(), "config": self.cfg_yaml, "meta": meta}

    def save(self, step: int, meta: dict) -> Path:
        if self.parallel is not None:
            return self._save_sharded(step, meta)
        self.last_good = self.manager.save(step, self.payload(step, meta))
        return self.last_good

    def _save_sharded(self, step: int, meta: dict) -> Path:
        """Every rank writes its shards to ``dcp-<step>`` (atomically: a save that dies leaves the
        previous checkpoints as they were); the carried state of the global batch and rank 0's
        ``meta`` go into ``extra``; rank 0 then keeps the newest ``keep_ckpts`` sharded ones."""
        run, st = self.run, self.stepper
        hybrid = gather_state_rows(st.state, self.parallel.dp_group)  # a collective: before anything else
        box = [meta]
        dist.broadcast_object_list(box, src=0)  # one meta (the ranks' timings differ)
        extra = {"format": 1, "step": step, "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
                 "stepper": {"source": st.source.state_dict(),
                             "hybrid_state": None if hybrid is None else hybrid.to("cpu").state_dict()},
                 "config": self.cfg_yaml, "meta": box[0]}
        path = save_sharded(self.manager.dir / f"dcp-{step:08d}", run.model, run.optimizer, extra)
        if self.main:
            for _, old in sharded_checkpoints(self.manager.dir)[:-self.manager.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.last_good = path
        return path

    def export(self) -> Path | None:
        """The newest checkpoint as one file: on several ranks rank 0 writes the newest sharded one as
        ``ckpt-<step>.pt`` (``export_single_file``; the other ranks wait) and keeps the newest
        ``keep_ckpts`` such files; in one process the newest file as it is."""
        last = self.last_good
        if self.parallel is None or last is None or not last.is_dir():
            return last
        out = self.manager.path_for(int(last.name.split("-")[1]))

        def write():
            if not out.exists():
                export_single_file(last, out)
            for _, old in self.manager.checkpoints()[:-self.manager.keep]:
                old.unlink(missing_ok=True)

        self._on_main(write, f"exporting {last} as one file")
        return out


# --------------------------------------------------------------------------------- evaluation

class Evaluation:
    """Validation, retrieval accuracy and the end-of-run sample, all with the model in eval mode."""

    def __init__(self, run: Run):
        self.run, self.t = run, run.train

    def validate(self) -> dict[str, float]:
        """Validation loss and bits/char: streams with carried state after TBPTT training (the first
        ``eval_batches`` segments of each), else ``eval_batches`` batches of fresh windows. On several
        ranks each scores its rows and the sums of nats, tokens and characters are all-reduced."""
        run = self.run
        ranks = {} if run.parallel is None else {"group": run.parallel.dp_group}
        if self.t["tbptt"]:
            s = run.val_windows
            s.load_state_dict(dict(s.state_dict(), epoch=0, segment=0))
            n = min(self.t["eval_batches"], s.segments_per_epoch)
            return evaluate_stream(run.model, s, n, run.data.tokenizer, run.device, **ranks)
        return evaluate(run.model, run.val_windows, run.data.tokenizer, run.device, **ranks)

    def retrieval(self) -> dict[str, dict[int, float]]:
        """Retrieval accuracy by distance (data.retrieval: its first kind, distances, per_bucket, seed)
        with memory on / off / shuffled, read in segments of train.seq_len; a run trained on a retrieval
        task is scored on prompts of its training rows' length. On several ranks every rank scores
        every prompt (the shuffled control rolls the state across a bucket's rows), with the same result."""
        run, t = self.run, self.t
        r = run.data.config.retrieval
        res = memory_retrieval_accuracy(run.model, run.data.tokenizer, distances=list(r.distances),
                                        per_bucket=r.per_bucket, device=run.device, segment=t["seq_len"],
                                        kind=r.kinds[0], seed=r.seed, row_len=training_row_len(t),
                                        **prompt_kwargs(r, run.data.val_tokens))
        for mode, accs in res.items():
            log.info("retrieval (%s, memory %s): %s", r.kinds[0], mode,
                     ", ".join(f"d={d}: {a:.2f}" for d, a in accs.items()))
        return res

    def sample(self) -> str:
        """The end-of-run sample; on several ranks every rank samples (each forward is a collective)
        with the same prompt and seed."""
        t, tok = self.t, self.run.data.tokenizer
        prompt = torch.tensor(tok.encode(t["sample_prompt"] or "\n"), dtype=torch.int64)
        g = torch.Generator().manual_seed(t["seed"])
        ids = generate(self.run.model, prompt, t["sample_tokens"], window=t["seq_len"],
                       temperature=t["sample_temperature"], generator=g)
        return (t["sample_prompt"] or "") + tok.decode(ids.tolist())


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
    """Elements of a native layer's whole weight (its rows on every rank, when row-sharded)."""
    sh = getattr(layer, "_native_shard", None)
    return math.prod(sh.full_shape) if sh is not None else layer.native_weight.numel()


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
