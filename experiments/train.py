"""``python -m experiments.train``: train a hybrid model in a precision policy, on real text.

    python -m experiments.train                                   # the main job (CPU, minutes)
    python -m experiments.train precision=ternary optim=bitnet train.steps=2000
    python -m experiments.train '+precision.override={match: "blocks.*.ffn.*", weight: ternary}'
    python -m experiments.train hydra.run.dir=runs/a resume=auto  # continue run a (same command again)
    tensorboard --logdir runs

The run directory (``run_dir``, by default Hydra's output directory) receives ``config.yaml`` (the
resolved config), ``precision_report.md`` (the policy's per-layer table and the optimizer's
memory), ``tb/`` (TensorBoard events), ``checkpoints/ckpt-<step>.pt`` and ``summary.json`` (final
and best validation loss / bits per character, the validation curve, throughput, the sample). Each step is described
in :mod:`experiments.loop`; checkpoints in :mod:`experiments.checkpoint`; configuration checks in
:mod:`experiments.build`.

Exit status: 0 done; 2 bad input (config, data, checkpoint), with one line naming the cause;
1 stopped after ``train.max_bad_steps`` consecutive steps with inf/NaN, naming the first layer
where non-finite values appeared (the last good checkpoint is kept).
"""
from __future__ import annotations

import json
import logging
import math
import shlex
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
import torch
from omegaconf import DictConfig, OmegaConf
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

import lowprec
import optim

from .build import ConfigError, Run, build_run
from .checkpoint import (CheckpointManager, CorruptCheckpointError, load_checkpoint, resolve_checkpoint, rng_state,
                         set_rng_state)
from .loop import Stepper, evaluate, evaluate_stream, generate, nonfinite_tensors
from .tasks import memory_retrieval_accuracy, prompt_kwargs, training_row_len

__all__ = ["train", "main", "NonFiniteError"]

log = logging.getLogger("experiments.train")

# config sections that must match for a checkpoint to be resumed (the data stream's shape too)
_RESUME_MUST_MATCH = ("model", "precision", "data", "train.batch_size", "train.seq_len", "train.tbptt",
                      "train.tbptt_segments", "train.seed", "train.task", "train.task_loss")
# what a checkpoint written before a key existed ran with
_RESUME_DEFAULTS = {"train.task": "lm", "train.task_loss": "all"}


class NonFiniteError(RuntimeError):
    """``train.max_bad_steps`` consecutive steps had inf/NaN; the message names where they began."""


# ----------------------------------------------------------------------------------- resume

def _select(cfg: dict, dotted: str):
    for part in dotted.split("."):
        cfg = cfg.get(part) if isinstance(cfg, dict) else None
    return cfg


def _find_resume(resume, ckpts: CheckpointManager) -> tuple[Path, dict] | None:
    """The checkpoint to continue from: ``None``/false → none (and the run dir must hold none);
    ``auto`` → the newest valid one in the run dir, if any; a file → that file; a directory → the
    newest valid one in it (or in its ``checkpoints/``)."""
    if resume in (None, False, "", "null", "none"):
        if ckpts.checkpoints():
            raise ConfigError(f"resume=null but {ckpts.dir} already holds checkpoints "
                              f"({ckpts.checkpoints()[-1][1].name}, ...); pass resume=auto to continue "
                              "that run, or choose another run_dir / hydra.run.dir")
        return None
    if resume == "auto":
        found = ckpts.latest_valid()
        if found is None:
            log.info("resume=auto: no checkpoint in %s, starting from step 0", ckpts.dir)
        return found
    path = Path(str(resume)).expanduser()
    if path.is_dir():
        sub = path / "checkpoints"
        found = CheckpointManager(sub if sub.is_dir() else path).latest_valid()
        if found is None:
            raise ConfigError(f"resume={str(resume)!r}: no checkpoint (ckpt-<step>.pt) in that directory")
        return found
    if not path.exists():
        raise ConfigError(f"resume={str(resume)!r}: no such file or directory; give a checkpoint file, "
                          "a run directory, auto or null")
    return path, load_checkpoint(path)


def _restore(run: Run, stepper: Stepper, path: Path, payload: dict, cfg_now: dict) -> int:
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
    try:
        run.model.load_state_dict(payload["model"])
        run.optimizer.load_state_dict(payload["optimizer"])
        run.scheduler.load_state_dict(payload["scheduler"])
        run.scaler.load_state_dict(payload["scaler"])
        stepper.load_state_dict(payload["stepper"])
    except (RuntimeError, ValueError, KeyError) as e:
        raise ConfigError(f"checkpoint {str(path)!r} does not fit this run: {e}") from None
    set_rng_state(payload["rng"])
    return int(payload["step"])


# ----------------------------------------------------------------------------------- helpers

def _inject_nan(model: torch.nn.Module, name: str) -> str:
    """Debug hook (train.debug.nan_layer): fill a parameter/buffer, or a layer's weight, with NaN."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for cand in (name, f"{name}.weight", f"{name}.w_scale"):
        if cand in tensors and tensors[cand] is not None and tensors[cand].is_floating_point():
            with torch.no_grad():
                tensors[cand].fill_(float("nan"))
            return cand
    raise ConfigError(f"train.debug.nan_layer={name!r} names no floating parameter or layer; "
                      f"e.g. {', '.join(list(tensors)[:6])}, ...")


def _log_telemetry(writer, stats: dict, step: int) -> None:
    for (layer, operand), st in stats.items():
        for stat, value in st.items():
            writer.add_scalar(f"{stat}/{layer}/{operand}", value, step)


def _checkpoint_payload(run: Run, stepper: Stepper, step: int, cfg_yaml: str, meta: dict) -> dict[str, Any]:
    return {"format": 1, "step": step, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(), "scaler": run.scaler.state_dict(),
            "stepper": stepper.state_dict(), "rng": rng_state(), "config": cfg_yaml, "meta": meta}


def _warn_unquantized(run: Run) -> None:
    """Warn when quantized layers run with ``backend: unquantized`` (plain bf16 GEMMs): such a run
    trains those layers at bf16, not at the policy's formats."""
    names = run.report.unquantized_gemms(run.model)
    if names:
        log.warning("%d quantized layer(s) have backend 'unquantized': their GEMMs run in plain bf16 and their "
                    "formats are NOT trained: %s%s.", len(names), ", ".join(names[:6]), ", ..." if len(names) > 6 else "")


def _write_report(run: Run, run_dir: Path, with_memory: bool) -> bool:
    """``precision_report.md``: the policy's per-layer table, the optimizer's parts and (once the
    optimizer holds its state) the resident bytes per parameter of weights + state."""
    text = f"# precision report\n\n{run.report}\n\n# optimizer\n\n{run.optimizer.describe()}\n"
    if with_memory:
        text += f"\n# memory per parameter (weights + optimizer state)\n\n{optim.memory_report(run.model, run.optimizer)}\n"
    (run_dir / "precision_report.md").write_text(text)
    return with_memory


def _init_from(run: Run, source) -> Path:
    """Load the model weights of checkpoint ``source`` (a file or a run directory) into ``run.model``;
    ``ConfigError`` naming what differs when the model or its precision does not match."""
    try:
        path = resolve_checkpoint(str(source))
    except FileNotFoundError as e:
        raise ConfigError(f"init_from: {e}") from None
    theirs = load_checkpoint(path)["model"]
    ours = run.model.state_dict()
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = sorted(k for k in set(ours) & set(theirs) if isinstance(ours[k], torch.Tensor)
                    and tuple(ours[k].shape) != tuple(theirs[k].shape))
    if missing or extra or shapes:
        what = "; ".join(f"{name} {keys[:3]}{'...' if len(keys) > 3 else ''}" for name, keys in
                         (("missing", missing), ("unexpected", extra), ("shape differs", shapes)) if keys)
        raise ConfigError(f"init_from={str(source)!r}: {path.name} does not fit this model ({what}); "
                          "give a checkpoint of the same model and precision (see its config.yaml)")
    run.model.load_state_dict(theirs)
    return path


def _validate(run: Run) -> dict[str, float]:
    """Validation loss and bits/char: streams with carried state after TBPTT training (the first
    ``eval_batches`` segments of each), else ``eval_batches`` batches of fresh windows."""
    if run.train["tbptt"]:
        s = run.val_windows
        s.load_state_dict(dict(s.state_dict(), epoch=0, segment=0))
        n = min(run.train["eval_batches"], s.segments_per_epoch)
        return evaluate_stream(run.model, s, n, run.data.tokenizer, run.device)
    return evaluate(run.model, run.val_windows, run.data.tokenizer, run.device)


def _sample(run: Run, t: dict) -> str:
    tok = run.data.tokenizer
    prompt = torch.tensor(tok.encode(t["sample_prompt"] or "\n"), dtype=torch.int64)
    g = torch.Generator().manual_seed(t["seed"])
    ids = generate(run.model, prompt, t["sample_tokens"], window=t["seq_len"],
                   temperature=t["sample_temperature"], generator=g)
    return (t["sample_prompt"] or "") + tok.decode(ids.tolist())


# ------------------------------------------------------------------------------------- train

def train(cfg: DictConfig) -> dict[str, Any]:
    """Run the training job described by ``cfg`` (the composed config); returns the summary."""
    t_start = time.perf_counter()
    run = build_run(cfg)  # every ConfigError surfaces here, before anything is written
    t = run.train
    run_dir = Path(str(cfg.run_dir))
    ckpts = CheckpointManager(run_dir / "checkpoints", t["keep_ckpts"])
    stepper = Stepper(run.model, run.optimizer, run.scheduler, run.scaler, run.source, tbptt=t["tbptt"],
                      k=t["tbptt_segments"] if t["tbptt"] else 1, grad_clip=t["grad_clip"], device=run.device,
                      forward=torch.compile(run.model) if t["compile"] else None)
    cfg_now = OmegaConf.to_container(cfg, resolve=True)
    cfg_yaml = OmegaConf.to_yaml(cfg, resolve=True)
    found = _find_resume(cfg.get("resume"), ckpts)
    # meta travels in every checkpoint: the validation curve (step, tokens, loss, bpc) survives a resume
    start, meta = 0, {"tokens": 0, "train_s": 0.0, "best_val_loss": math.inf, "best_val_bpc": math.inf, "curve": []}
    if found is not None:
        start = _restore(run, stepper, *found, cfg_now)
        meta.update(found[1].get("meta", {}))
        log.info("resumed from %s at step %d", found[0], start)
    elif cfg.get("init_from"):
        log.info("model weights from %s (init_from); optimizer, schedule and data start fresh",
                 _init_from(run, cfg.init_from))

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(cfg_yaml)
    _write_report(run, run_dir, with_memory=start > 0)
    n_params = sum(p.numel() for p in run.model.parameters()) + sum(
        m.native_weight.numel() for m in run.model.modules() if getattr(m, "is_native", False))
    ds, mc, k = run.data.summary(), run.model.cfg, stepper.k
    for line in (
        f"model: HybridLM d_model={mc.d_model}, {mc.n_blocks} blocks, window {mc.window}, memory "
        f"{'on (' + mc.rnn_mode + ')' if mc.memory else 'off'}: {n_params:,} parameters on {run.device}",
        f"precision {run.report.policy!r}: {run.report.total_format_bytes:,} weight bytes at format "
        f"({run.report.total_format_bytes / max(run.report.bf16_bytes, 1):.3f}x bf16), "
        f"{run.report.total_resident_bytes:,} resident; table in {run_dir / 'precision_report.md'}",
        f"loss scaling: {run.scaler.mode}; optimizer parts: {', '.join(run.optimizer.parts)}",
        f"data: {ds['source']} ({ds['tokenizer']}, vocab {ds['vocab_size']}): train {ds['train']['documents']} "
        f"documents {ds['train']['tokens']:,} tokens, val {ds['val']['documents']} documents {ds['val']['tokens']:,} tokens",
        f"steps {start + 1}..{t['steps']}, {k}x{t['batch_size']}x{t['seq_len']} tokens each "
        f"({'TBPTT, state carried' if t['tbptt'] else 'random windows'})",
    ):
        log.info("%s", line)

    writer = SummaryWriter(str(run_dir / "tb"), purge_step=start + 1 if start else None)
    if start == 0:
        writer.add_text("config", "```\n" + cfg_yaml + "\n```", 0)
        writer.add_text("precision_report", str(run.report), 0)
    telemetry = lowprec.Telemetry(run.model)
    debug = t.get("debug") or {}
    last_good_ckpt = ckpts.checkpoints()[-1][1] if ckpts.checkpoints() else None
    val = retrieval = None
    bar = tqdm(total=t["steps"], initial=start, disable=not t["progress"], dynamic_ncols=True,
               file=sys.stderr, unit="step", mininterval=1.0)
    ema, window_tokens, window_s, report_done = None, 0, 0.0, False
    step = start
    stop = _CtrlC()
    try:
        with logging_redirect_tqdm(), stop:
            for step in range(start + 1, t["steps"] + 1):
                if stop.requested:  # after a complete step: save it, then stop
                    step -= 1
                    raise KeyboardInterrupt
                if debug.get("nan_at_step") == step:
                    log.warning("debug: %s set to NaN before step %d", _inject_nan(run.model, debug["nan_layer"]), step)
                watch = bool(t["telemetry_every"]) and step % t["telemetry_every"] == 0
                if watch:
                    telemetry.reset()
                    telemetry.enable()
                res = stepper.step()
                if watch:
                    telemetry.disable()
                    _log_telemetry(writer, telemetry.stats(), step)
                if res.taken and not report_done:  # optimizer state exists after the first update
                    run.report = run.report.refreshed(run.model)  # backends as they ran on run.device
                    report_done = _write_report(run, run_dir, with_memory=True)
                    _warn_unquantized(run)
                meta["tokens"] += res.tokens
                meta["train_s"] += res.seconds
                window_tokens, window_s = window_tokens + res.tokens, window_s + res.seconds
                if res.taken:
                    ema = res.loss if ema is None else 0.9 * ema + 0.1 * res.loss
                else:
                    log.warning("step %d: inf/NaN (loss %.4g), update skipped (%d in a row, limit %d); "
                                "loss scale now %g", step, res.loss, run.scaler.consecutive_bad,
                                t["max_bad_steps"], run.scaler.loss_scale)
                    if run.scaler.consecutive_bad >= t["max_bad_steps"]:
                        raise NonFiniteError(_diagnose(run, stepper, telemetry, step, res, t, last_good_ckpt))
                lr = run.optimizer.param_groups[0]["lr"]
                if step % t["log_every"] == 0 or step == t["steps"]:
                    tps = window_tokens / max(window_s, 1e-9)
                    for tag, v in (("train/loss", res.loss), ("train/lr", lr), ("train/grad_norm", res.grad_norm),
                                   ("train/loss_scale", res.loss_scale), ("train/tokens_per_s", tps)):
                        writer.add_scalar(tag, v, step)
                    bar.set_postfix(loss=f"{ema:.3f}" if ema is not None else "nan", tok_s=f"{tps:,.0f}",
                                    lr=f"{lr:.2e}", refresh=False)
                    window_tokens, window_s = 0, 0.0
                if step % t["eval_every"] == 0 or step == t["steps"]:
                    val = _validate(run)
                    writer.add_scalar("val/loss", val["loss"], step)
                    writer.add_scalar("val/bpc", val["bpc"], step)
                    meta["best_val_loss"] = min(meta["best_val_loss"], val["loss"])
                    meta["best_val_bpc"] = min(meta["best_val_bpc"], val["bpc"])
                    meta["curve"].append([step, meta["tokens"], val["loss"], val["bpc"]])
                    log.info("step %d: val loss %.4f nats/token, %.4f bits/char", step, val["loss"], val["bpc"])
                    if t["retrieval_eval"]:  # accuracy along training, not only at the end
                        retrieval = _retrieval(run, t)
                        for mode, accs in retrieval.items():
                            for d, acc in accs.items():
                                writer.add_scalar(f"retrieval_{mode}/d{d}", acc, step)
                if (step % t["ckpt_every"] == 0 or step == t["steps"]) and run.scaler.consecutive_bad == 0:
                    last_good_ckpt = ckpts.save(step, _checkpoint_payload(run, stepper, step, cfg_yaml, meta))
                bar.update(1)
    except KeyboardInterrupt:
        bar.close()
        if stop.requested == 1 and step > start and run.scaler.consecutive_bad == 0:
            ckpts.save(step, _checkpoint_payload(run, stepper, step, cfg_yaml, meta))
            log.warning("interrupted: saved step %d in %s", step, ckpts.dir)
        elif last_good_ckpt is not None:
            log.warning("interrupted at step %d; the newest checkpoint is %s", step, last_good_ckpt)
        if last_good_ckpt is not None or step > start:
            print(f"\ninterrupted; to continue this run:\n  {resume_command(run_dir)}", file=sys.stderr)
        raise
    finally:
        bar.close()
        writer.flush()

    if val is None:  # nothing left to train (resumed a finished run)
        val = _validate(run)
    sample = ""
    if t["sample_tokens"]:
        try:
            sample = _sample(run, t)
        except RuntimeError as e:  # the checkpoints and numbers above stand without a sample
            log.error("sampling failed (%s: %s); the run's checkpoints and summary are unaffected",
                      type(e).__name__, e)
    writer.add_text("sample", "```\n" + sample + "\n```", step)
    if t["retrieval_eval"] and retrieval is None:  # resumed a finished run
        retrieval = _retrieval(run, t)
    writer.close()
    curve = meta["curve"]
    summary = {
        "steps": step, "val_loss": val["loss"], "val_bpc": val["bpc"],
        "best_val_loss": min(meta["best_val_loss"], val["loss"]), "best_val_bpc": min(meta["best_val_bpc"], val["bpc"]),
        "tokens": meta["tokens"], "tokens_per_s": meta["tokens"] / max(meta["train_s"], 1e-9),
        "wall_s": time.perf_counter() - t_start, "params": n_params, "policy": run.report.policy,
        "weight_format_bytes": run.report.total_format_bytes, "device": str(run.device),
        "train_bytes_per_param": optim.memory_report(run.model, run.optimizer).total.resident_per_param,
        # accuracy by distance with memory on (what ablate tabulates), and every control
        "retrieval": retrieval["on"] if retrieval else None, "retrieval_controls": retrieval,
        "checkpoint": str(last_good_ckpt) if last_good_ckpt else None, "sample": sample,
        # validation along training, what experiments.ablate plots
        "curve": {"step": [c[0] for c in curve], "tokens": [c[1] for c in curve],
                  "val_loss": [c[2] for c in curve], "val_bpc": [c[3] for c in curve]},
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"\nvalidation: loss {val['loss']:.4f} nats/token, {val['bpc']:.4f} bits/char "
          f"(best {summary['best_val_bpc']:.4f}) after {step} steps, {meta['tokens']:,} tokens, "
          f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_s']:.0f} s in all\n"
          f"run directory: {run_dir}\n--- sample ---\n{sample}\n--------------")
    return summary


def _retrieval(run: Run, t: dict) -> dict[str, dict[int, float]]:
    """Retrieval accuracy by distance (data.retrieval: its first kind, distances, per_bucket, seed)
    with memory on / off / shuffled, read in segments of train.seq_len; a run trained on a retrieval
    task is scored on prompts of its training rows' length."""
    r = run.data.config.retrieval
    res = memory_retrieval_accuracy(run.model, run.data.tokenizer, distances=list(r.distances), per_bucket=r.per_bucket,
                                    device=run.device, segment=t["seq_len"], kind=r.kinds[0], seed=r.seed,
                                    row_len=training_row_len(t), **prompt_kwargs(r, run.data.val_tokens))
    for mode, accs in res.items():
        log.info("retrieval (%s, memory %s): %s", r.kinds[0], mode, ", ".join(f"d={d}: {a:.2f}" for d, a in accs.items()))
    return res


def _diagnose(run: Run, stepper: Stepper, telemetry, step: int, res, t: dict, last_good) -> str:
    """Re-run the last step's forward and backward with telemetry on; say where inf/NaN began."""
    telemetry.reset()
    telemetry.enable()
    try:
        stepper.rerun_last()
    finally:
        telemetry.disable()
    first = telemetry.first_nonfinite()
    where = (f"first non-finite values in layer {first[0]!r} ({first[1]})" if first else
             "no quantized layer saw a non-finite operand (the loss or an unquantized module did)")
    bad = nonfinite_tensors(run.model)
    params = f"; non-finite parameters/buffers: {', '.join(bad[:8])}{' ...' if len(bad) > 8 else ''}" if bad else ""
    keep = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written"
    return (f"stopped at step {step}: {t['max_bad_steps']} consecutive steps with inf/NaN "
            f"(train.max_bad_steps; last loss {res.loss:.4g}, loss scale {run.scaler.loss_scale:g}); "
            f"{where}{params}; {keep}")


class _CtrlC:
    """While active, the first Ctrl-C asks the training loop to stop after the step in progress
    (the loop saves that step's checkpoint); a second one stops at once (the newest checkpoint
    stands). Outside the main thread signals cannot be caught: Ctrl-C stops at once there."""

    def __init__(self):
        self.requested = 0
        self._old = None

    def _handle(self, signum, frame):
        self.requested += 1
        if self.requested > 1:
            raise KeyboardInterrupt
        log.warning("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


def resume_command(run_dir: Path) -> str:
    """The command that continues the run in ``run_dir``: this run's command-line overrides, the
    same run directory, ``resume=auto``."""
    try:
        overrides = list(HydraConfig.get().overrides.task)
    except ValueError:  # not launched by Hydra (train() called directly)
        overrides = []
    keep = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.run.dir=", "resume="))]
    return " ".join(["python -m experiments.train", *(shlex.quote(o) for o in keep),
                     shlex.quote(f"hydra.run.dir={run_dir}"), "resume=auto"])


@hydra.main(config_path="../configs", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except KeyboardInterrupt:
        sys.exit(130)
    except (ConfigError, CorruptCheckpointError) as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteError as e:
        log.error("%s", e)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
