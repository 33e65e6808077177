"""Everything a training run needs, built from the composed Hydra config, with bad input caught
before the first step.

Order (cheap checks first, so a typo fails in a second, not after the data is read):
``train`` keys → device → ``data`` keys and path → ``model`` (vocabulary from the tokenizer) →
``precision`` policy applied → (on several ranks) ``parallel`` sharding → ``optim`` + schedule → loss scaler → data read and tokenized →
token source and validation windows. Every failure is a :class:`ConfigError` whose message
starts with the config key at fault (``model: HybridConfig: unknown rnn_mode 'foo'; choose one
of stream, chunked``).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf, open_dict

import lowprec
import optim
from hybrid import HybridConfig, HybridLM, store_in_hydra

from .data import DataConfig, SegmentStreamer, prepare_data
from .tasks import RetrievalStreamer, prompt_kwargs, retrieval_examples, training_row_len

__all__ = ["ConfigError", "Run", "TRAIN_KEYS", "resolve_device", "resolve_threads", "check_train", "check_parallel",
           "model_config", "vocab_size", "build_run", "choose_scaler_mode"]

log = logging.getLogger(__name__)


# `${min:128,${model.window}}` in configs/config.yaml: the main job's segment length, capped by
# the model's window (registered on import, before Hydra composes anything).
if not OmegaConf.has_resolver("min"):
    OmegaConf.register_new_resolver("min", lambda *xs: min(xs))
# The `model` config group is hybrid's presets (`model=tiny`), registered before Hydra composes.
store_in_hydra()


class ConfigError(ValueError):
    """Bad input found before training starts; the message names the key and the valid choices."""


# key -> (type, rule text, check); None values allowed where the rule says "or null"
_POS = (int, ">= 1", lambda v: v >= 1)
TRAIN_KEYS: dict[str, tuple] = {
    "steps": _POS, "batch_size": _POS, "seq_len": _POS, "eval_every": _POS, "eval_batches": _POS,
    "log_every": _POS, "ckpt_every": _POS, "keep_ckpts": _POS, "max_bad_steps": _POS,
    "tbptt_segments": _POS,
    "telemetry_every": (int, ">= 0 (0: off)", lambda v: v >= 0),
    "sample_tokens": (int, ">= 0", lambda v: v >= 0),
    "seed": (int, "an int", lambda v: True),
    "grad_clip": (float, "> 0 or null", lambda v: v > 0),
    "sample_temperature": (float, ">= 0 (0: greedy)", lambda v: v >= 0),
}
_OTHER_TRAIN_KEYS = ("device", "threads", "compile", "tbptt", "loss_scale", "sample_prompt", "progress", "debug",
                     "task", "task_loss", "retrieval_eval")
TASK_LOSSES = ("all", "answer")  # train.task_loss: every token of a retrieval prompt, or its answer only
TASKS = ("lm", "passkey", "kv")  # train.task: language modeling on the corpus, or a retrieval task
SCALER_MODES = ("auto", "dynamic", "static", "none")
NULLABLE = ("grad_clip",)


def check_train(train: DictConfig) -> dict[str, Any]:
    """The ``train`` section as a plain dict, every value checked."""
    t = OmegaConf.to_container(train, resolve=True)
    unknown = sorted(set(t) - set(TRAIN_KEYS) - set(_OTHER_TRAIN_KEYS))
    if unknown:
        raise ConfigError(f"train: unknown key(s) {unknown}; valid: {sorted([*TRAIN_KEYS, *_OTHER_TRAIN_KEYS])}")
    for key, (typ, rule, ok) in TRAIN_KEYS.items():
        v = t.get(key)
        if v is None and key in NULLABLE:
            continue
        good = isinstance(v, (int, float)) and not isinstance(v, bool) if typ is float else \
            isinstance(v, int) and not isinstance(v, bool)
        if not good or not ok(v):
            raise ConfigError(f"train.{key}={v!r} is invalid; it must be {rule}")
    t.setdefault("task", "lm")
    t.setdefault("retrieval_eval", False)
    t.setdefault("task_loss", "all")
    if t["task_loss"] not in TASK_LOSSES:
        raise ConfigError(f"train.task_loss={t['task_loss']!r} is unknown; choose one of {TASK_LOSSES}")
    if t["task"] not in TASKS:
        raise ConfigError(f"train.task={t['task']!r} is unknown; choose one of {TASKS}")
    if t["task"] != "lm" and not t.get("tbptt"):
        raise ConfigError(f"train.task={t['task']} needs train.tbptt=true: a prompt spans tbptt_segments "
                          "segments read in order with the state carried")
    for key in ("tbptt", "progress", "retrieval_eval"):
        if not isinstance(t.get(key), bool):
            raise ConfigError(f"train.{key}={t.get(key)!r} must be true or false")
    if not (isinstance(t.get("compile"), bool) or t.get("compile") == "blocks"):
        raise ConfigError(f"train.compile={t.get('compile')!r} must be true (the step's forward and loss), blocks "
                          "(each GQA block, one compilation for all) or false")
    th = t.get("threads")
    if not (th in (None, "auto") or (isinstance(th, int) and not isinstance(th, bool) and th >= 1)):
        raise ConfigError(f"train.threads={th!r} is invalid; give an int >= 1, auto or null")
    ls = t.get("loss_scale") or {}
    if ls.get("mode", "auto") not in SCALER_MODES:
        raise ConfigError(f"train.loss_scale.mode={ls.get('mode')!r} is unknown; choose one of {SCALER_MODES}")
    return t


def resolve_device(name: str) -> torch.device:
    """``auto`` → ``cuda`` when a CUDA device is present, else ``cpu``; other names as torch reads them."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"train.device={name!r} is not a device ({e}); use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name!r} but no CUDA device is available; use train.device=auto or cpu")
    return dev


def busy_cores(interval: float = 0.3) -> float | None:
    """Cores that other processes keep busy now: the non-idle share of all CPU time over
    ``interval`` seconds (Linux ``/proc/stat``), times the core count; else the 1-minute load
    average; ``None`` when neither is available. Not the load average first: it lags a minute
    behind, so right after a finished install or test run it reports cores that are free."""
    def sample():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # total, idle + iowait

    try:
        t0, i0 = sample()
        time.sleep(interval)
        t1, i1 = sample()
        return (os.cpu_count() or 1) * (1 - (i1 - i0) / max(t1 - t0, 1))
    except (OSError, ValueError, IndexError):
        try:
            return os.getloadavg()[0]
        except OSError:
            return None


def resolve_threads(value) -> int:
    """CPU threads for torch: an int as given; null: torch's default; ``auto``: torch's default
    less the cores other processes keep busy now (:func:`busy_cores`), at least 1. Threads that
    compete with another process's threads for the same cores spin at every parallel region and
    can slow a CPU run down 10x; one thread per free core does not."""
    default = torch.get_num_threads()
    if value is None:
        return default
    if value != "auto":
        return int(value)
    busy = busy_cores()
    if busy is None:
        return default
    return max(1, min(default, math.floor((os.cpu_count() or default) - busy + 0.5)))


def choose_scaler_mode(model: torch.nn.Module, mode: str) -> str:
    """``auto``: ``dynamic`` when some layer computes a gradient GEMM in unscaled fp16 (whose small
    gradients underflow without a loss scale), else ``none`` (scaled FP8/FP4 gradients and bf16
    keep their range by themselves); every mode still skips steps with inf/NaN gradients."""
    if mode != "auto":
        return mode
    for mod in model.modules():
        p = getattr(mod, "precision", None)
        if p is None or not hasattr(p, "operand"):
            continue
        for gemm in ("dgrad", "wgrad"):
            fmt = p.operand(gemm, "grad")
            if fmt is not None and fmt.name == "fp16" and not fmt.is_scaled:
                return "dynamic"
    return "none"


@dataclass
class Run:
    """The built pieces of a run (see ``experiments.train``)."""

    train: dict[str, Any]
    device: torch.device
    data: Any
    model: torch.nn.Module
    report: Any               # lowprec.PolicyReport
    optimizer: Any            # optim.MixedOptimizer
    scheduler: Any
    scaler: Any               # lowprec.LossScaler
    source: Any               # SegmentStreamer (tbptt), TokenBatcher, or RetrievalStreamer (train.task);
                              # on several ranks wrapped in RankBatches (this rank's rows)
    val_windows: Any          # SegmentStreamer of the validation split (tbptt, per rank: RankBatches) or
                              # ValidationWindows (the global batches; each rank scores its rows)
    parallel: Any = None      # experiments.parallel.Distributed of several ranks, or None (one process)


def _stage(what: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError, KeyError, FileNotFoundError, ModuleNotFoundError) as e:
        msg = str(e) if not isinstance(e, KeyError) else f"missing key {e}"
        raise ConfigError(f"{what}: {msg}") from e


def model_config(cfg: DictConfig, vocab: int) -> HybridConfig:
    """The ``HybridConfig`` of a run's ``model`` section, with the tokenizer's vocabulary size."""
    mc = dict(OmegaConf.to_container(cfg.model, resolve=True))
    if mc.get("vocab_size") != vocab:
        log.info("model.vocab_size %s -> %d (the tokenizer's)", mc.get("vocab_size"), vocab)
        mc["vocab_size"] = vocab
    return HybridConfig.from_dict(mc)


def vocab_size(data_cfg) -> int:
    """The vocabulary a ``data`` section's tokenizer will have (256 for bytes)."""
    if data_cfg.tokenizer == "bytes":
        return 256
    if data_cfg.vocab_size <= 256:
        raise ValueError(f"vocab_size={data_cfg.vocab_size} must be > 256 for tokenizer=bpe")
    return int(data_cfg.vocab_size)


def check_parallel(cfg: DictConfig, t: dict[str, Any], d) -> Any:
    """The ``parallel`` section of a run on the ranks of ``d`` (several), checked against the rest:
    the global batch must split over the dp ranks. Returns the ``ParallelConfig``."""
    from .parallel import ParallelConfig

    pcfg = _stage("parallel", ParallelConfig.from_config, cfg.get("parallel"))
    if t["batch_size"] % d.dp:
        raise ConfigError(f"train.batch_size={t['batch_size']} (the global batch) does not split over the {d.dp} "
                          f"data-parallel ranks (dp = world size {d.world_size} / parallel.tp={d.tp}); "
                          f"choose a multiple of {d.dp}")
    return pcfg


def build_run(cfg: DictConfig, parallel=None) -> Run:
    """Build (and check) everything; see the module doc. Sets ``cfg.model.vocab_size`` to the
    tokenizer's so that the saved config is the one the model was built from.

    ``parallel``: an ``experiments.parallel.Distributed`` of several ranks (``torchrun``), or None.
    Then the model runs on the rank's device and is sharded (``shard_model``) before the optimizer
    is built; the token source serves this rank's rows of the global batch ``train.batch_size``."""
    t = check_train(cfg.train)
    device = resolve_device(str(t["device"]))
    pcfg = None
    if parallel is not None:
        pcfg = check_parallel(cfg, t, parallel)
        device = parallel.device
    threads = resolve_threads(t["threads"])
    # logged always: the thread count changes a CPU run's sums, so two runs compare only at the same count
    log.info("torch threads: %d (train.threads=%s)", threads, t["threads"])
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    data_cfg = _stage("data", DataConfig.from_config, cfg.data)
    vocab = _stage("data", vocab_size, data_cfg)
    model_cfg = _stage("model", model_config, cfg, vocab)
    with open_dict(cfg):
        cfg.model.vocab_size = vocab
    if t["seq_len"] > model_cfg.window:
        raise ConfigError(f"train.seq_len={t['seq_len']} exceeds model.window={model_cfg.window} "
                          "(a segment must fit the attention window)")
    policy = _stage("precision", lowprec.PrecisionPolicy.from_config, cfg.precision)

    torch.manual_seed(t["seed"])
    model = HybridLM(model_cfg)
    report = _stage("precision", lowprec.apply_policy, model, policy)
    if report.unmatched_rules:
        log.warning("precision rules that matched no layer: %s", ", ".join(map(str, report.unmatched_rules)))
    model.to(device)
    if parallel is not None:
        from .parallel import shard_model

        _stage("parallel", shard_model, model, parallel.mesh, pcfg)
    elif cfg.get("parallel"):  # one process: activation_checkpoint and param_dtype apply
        from .parallel import ParallelConfig, shard_model

        pcfg = _stage("parallel", ParallelConfig.from_config, cfg.parallel)
        _stage("parallel", shard_model, model, None, pcfg)
        if pcfg.param_dtype is not None:
            log.info("parameters computed in %s (parallel.param_dtype; fp32 masters), activations too", pcfg.param_dtype)
    optimizer = _stage("optim", optim.build_optimizer, model, cfg.optim)
    scheduler = _stage("optim.schedule", optim.build_scheduler, optimizer, cfg.optim, t["steps"])
    ls = dict(t.get("loss_scale") or {})
    mode = choose_scaler_mode(model, ls.pop("mode", "auto"))
    scaler = _stage("train.loss_scale", lowprec.LossScaler, mode, **({} if mode == "none" else ls))

    k = t["tbptt_segments"] if t["tbptt"] else 1
    data = _stage("data", prepare_data, data_cfg, batch_size=t["batch_size"], seq_len=t["seq_len"])
    if t["task"] != "lm":  # retrieval prompts of k segments; filler per data.retrieval.filler
        source = _stage("data", RetrievalStreamer, data.tokenizer, t["batch_size"], t["seq_len"], k, t["seed"],
                        kind=t["task"], answer_only=t["task_loss"] == "answer",
                        **prompt_kwargs(data_cfg.retrieval, data.train_tokens))
    elif t["tbptt"]:
        source = _stage("data", data.segments, t["batch_size"], t["seq_len"], t["seed"])
        if source.segments_per_epoch < k:
            raise ConfigError(f"data: the training split gives {source.segments_per_epoch} segments of "
                              f"{t['batch_size']}x{t['seq_len']} per epoch, fewer than train.tbptt_segments={k}")
    else:
        source = _stage("data", data.batcher, t["batch_size"], t["seq_len"], t["seed"])
    if t["retrieval_eval"]:  # the end-of-run scoring's prompts must be buildable: fail now, not after training
        r = data_cfg.retrieval
        # a run trained on a retrieval task is scored on prompts as long as its rows: distances must fit them.
        # Every prompt the scoring will read is built now (kv records fall before or after the needle at random)
        _stage("data.retrieval", retrieval_examples, data.tokenizer, r.kinds[0], distances=r.distances,
               per_bucket=r.per_bucket,
               seed=r.seed, total_len=training_row_len(t), **prompt_kwargs(r, data.val_tokens))
        if r.per_bucket < 2:
            raise ConfigError(f"data.retrieval.per_bucket={r.per_bucket}: train.retrieval_eval's shuffled control "
                              "needs >= 2 prompts per distance")
    if t["tbptt"]:  # read in order with the state carried, as the model was trained
        val = _stage("data", SegmentStreamer, data.val_tokens, t["batch_size"], t["seq_len"], t["seed"])
    else:
        val = _stage("data", data.val_windows, t["batch_size"], t["seq_len"], t["eval_batches"])
    if parallel is not None:  # this rank's rows of the 1-process run's batches, in its order
        from .rank_data import RankBatches

        source = RankBatches.for_rank(source, parallel)
        if t["tbptt"]:
            val = RankBatches.for_rank(val, parallel)
    return Run(t, device, data, model, report, optimizer, scheduler, scaler, source, val, parallel)
