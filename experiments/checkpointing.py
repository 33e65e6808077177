"""The checkpoints of one training run (:class:`Checkpoints`): which one a run continues from
(``resume``), restoring it (at any number of processes), ``init_from``, the payload, and saving.

Two kinds live side by side under ``run_dir/checkpoints``:

- ``ckpt-<step>.pt``: one file, written by one process (the format: :mod:`experiments.checkpoint`).
- ``dcp-<step>/``: a sharded checkpoint, written by every rank of a run on several processes
  (:mod:`experiments.sharded_checkpoint`); at the end of such a run rank 0 exports the newest one
  as ``ckpt-<step>.pt``, what ``experiments.evaluate`` reads.

A checkpoint resumes only a run with the same model, precision, data and step shape
(``_RESUME_MUST_MATCH``); the number of processes may differ.
"""
from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf

from hybrid import HybridState

from .build import ConfigError, Run
from .checkpoint import (
    CheckpointManager,
    CorruptCheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    set_rng_state,
)
from .loop import Stepper
from .rank_data import gather_state_rows, state_rows
from .sharded_checkpoint import (
    export_single_file,
    import_single_file,
    load_sharded,
    read_extra,
    save_sharded,
    sharded_checkpoints,
)

__all__ = ["Checkpoints"]

# the training run's logger: its lines read as the run's, whichever module writes them
log = logging.getLogger("experiments.train")

# config sections that must match for a checkpoint to be resumed (the data stream's shape too)
_RESUME_MUST_MATCH = ("model", "precision", "data", "train.batch_size", "train.seq_len", "train.tbptt",
                      "train.tbptt_segments", "train.seed", "train.task", "train.task_loss")
# what a checkpoint written before a key existed ran with
_RESUME_DEFAULTS = {"train.task": "lm", "train.task_loss": "all"}


def _select(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


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
        self.last_good = found[0] if found is not None else None  # the one restored, not a damaged newer one
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
            return manager.latest_valid("cpu")
        errors = []
        for _, _, path in reversed(self._all(manager)):
            try:
                return path, (read_extra(path) if path.is_dir() else load_checkpoint(path, "cpu"))
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
            except Exception as e:  # noqa: BLE001 -- any error must reach the waiting ranks, or they hang
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
