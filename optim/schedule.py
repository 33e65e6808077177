"""Learning-rate (and weight-decay) schedules: warmup + cosine, and BitNet b1.58's two stages.

Schedules are ``torch.optim.lr_scheduler.LambdaLR`` subclasses: they multiply each param group's
initial ``lr`` by a factor ``f(t)`` (``t`` = optimizer steps taken), so they drive one optimizer
or a :class:`~optim.MixedOptimizer` (every sub-optimizer's groups; for Bop/TernaryBop groups ``lr``
is the scale's learning rate). Call ``scheduler.step()`` after ``optimizer.step()``.

warmup + cosine (``t0`` = warmup steps, ``T`` = total steps, ``r`` = ``min_lr_ratio``)::

    f(t) = (t + 1) / (t0 + 1)                                       t < t0
    f(t) = r + (1 - r) (1 + cos(pi (t - t0) / (T - t0))) / 2         t0 <= t   (held at r after T)

BitNet b1.58 two-stage (Ma et al. 2024, "The Era of 1-bit LLMs: Training Tips, Code and FAQ";
BitNet b1.58 2B4T report, 2025: lr 1.5e-3 -> 8e-4 in stage 1, then 5e-4 -> 0; weight decay 0.1,
then 0). With ``t1 = round(split T)``::

    f(t) = (t + 1) / (t0 + 1)                                       t < t0
    f(t) = cos_interp(1 -> stage1_end, (t - t0) / (t1 - t0))          t0 <= t < t1   stage 1: high lr
    f(t) = cos_interp(stage2_start -> final, (t - t1) / (T - t1))     t1 <= t        stage 2: sudden drop
    wd(t) = weight_decay             t < t1;    0 (x ``stage2_weight_decay``)   t >= t1

where ``cos_interp(a -> b, u) = b + (a - b) (1 + cos(pi min(u, 1))) / 2``. The defaults are the
2B4T numbers as ratios of the peak: ``stage1_end = 8/15``, ``stage2_start = 1/3``, ``final = 0``.
Low-bit weights tolerate (and want) a high early learning rate; the drop and the end of weight
decay at mid-training let them settle. Weight decay is set in every group that has a
``weight_decay`` key, from its value when the schedule was built (kept as ``initial_weight_decay``).
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

from torch.optim.lr_scheduler import LambdaLR

from lowprec.common import check_real, plain

SCHEDULES = ("constant", "cosine", "two_stage")

log = logging.getLogger(__name__)


def _cos_interp(a: float, b: float, u: float) -> float:
    return b + (a - b) * 0.5 * (1 + math.cos(math.pi * min(max(u, 0.0), 1.0)))


def _check_steps(total_steps, warmup_steps) -> tuple[int, int]:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps={total_steps!r} is invalid; give an int >= 1")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps={warmup_steps!r} is invalid; give an int in [0, total_steps={total_steps})")
    return total_steps, warmup_steps


class Schedule(LambdaLR):
    """``LambdaLR`` that also scales each group's weight decay by ``wd_lambda(t)`` (if given)."""

    def __init__(self, optimizer, lr_lambda: Callable[[int], float],
                 wd_lambda: Callable[[int], float] | None = None, last_epoch: int = -1):
        self.wd_lambda = wd_lambda
        for group in optimizer.param_groups:
            if "weight_decay" in group:
                group.setdefault("initial_weight_decay", group["weight_decay"])
        super().__init__(optimizer, lr_lambda, last_epoch)

    def step(self, epoch=None):
        super().step(epoch)
        if self.wd_lambda is not None:
            factor = self.wd_lambda(self.last_epoch)
            for group in self.optimizer.param_groups:
                if "initial_weight_decay" in group:
                    group["weight_decay"] = group["initial_weight_decay"] * factor

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("wd_lambda", None)  # a function: rebuilt by the constructor, not saved
        return state


def warmup_cosine(optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.1) -> Schedule:
    """Linear warmup then cosine decay to ``min_lr_ratio`` x the peak (see the module doc)."""
    T, t0 = _check_steps(total_steps, warmup_steps)
    r = check_real("min_lr_ratio", min_lr_ratio, "in [0, 1]", lambda v: 0 <= v <= 1)

    def lr(t: int) -> float:
        if t < t0:
            return (t + 1) / (t0 + 1)
        return _cos_interp(1.0, r, (t - t0) / max(T - t0, 1))

    return Schedule(optimizer, lr)


def two_stage_schedule(optimizer, total_steps: int, warmup_steps: int = 0, *, split: float = 0.5,
                       stage1_end: float = 8 / 15, stage2_start: float = 1 / 3, final: float = 0.0,
                       stage2_weight_decay: float = 0.0) -> Schedule:
    """BitNet b1.58's two-stage schedule: high lr, then at ``split`` of training a sudden lr drop
    and weight decay x ``stage2_weight_decay`` (0: off). Ratios are of the peak lr; math in the
    module doc."""
    T, t0 = _check_steps(total_steps, warmup_steps)
    split = check_real("split", split, "in (0, 1)", lambda v: 0 < v < 1)
    t1 = round(split * T)
    if t1 <= t0:
        raise ValueError(f"split={split} puts the second stage (step {t1}) inside the warmup ({t0} steps)")
    ratios = {k: check_real(k, v, "in [0, 1]", lambda x: 0 <= x <= 1) for k, v in
              {"stage1_end": stage1_end, "stage2_start": stage2_start, "final": final,
                   "stage2_weight_decay": stage2_weight_decay}.items()}

    def lr(t: int) -> float:
        if t < t0:
            return (t + 1) / (t0 + 1)
        if t < t1:
            return _cos_interp(1.0, ratios["stage1_end"], (t - t0) / (t1 - t0))
        return _cos_interp(ratios["stage2_start"], ratios["final"], (t - t1) / max(T - t1, 1))

    def wd(t: int) -> float:
        return 1.0 if t < t1 else ratios["stage2_weight_decay"]

    return Schedule(optimizer, lr, wd)


def _keywords(fn) -> set[str]:
    """The keyword arguments a schedule function takes after (optimizer, total_steps)."""
    return set(list(inspect.signature(fn).parameters)[2:])


def build_scheduler(optimizer, cfg: Mapping | None, total_steps: int) -> Schedule:
    """The schedule named by ``cfg["name"]`` (``constant``, ``cosine``, ``two_stage``); the other
    keys are its keyword arguments (``warmup_steps`` and those of :func:`warmup_cosine` /
    :func:`two_stage_schedule`). ``cfg`` may be the whole optimizer config (its ``schedule`` key).
    A warmup as long as the run or longer is shortened to a tenth of the run, with a logged note
    (a short run just runs); every other invalid value is a ``ValueError`` naming it."""
    cfg = plain(cfg) or {}
    if "schedule" in cfg:
        cfg = cfg["schedule"] or {}
    cfg = dict(cfg)
    name = cfg.pop("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose one of {SCHEDULES}")
    t0 = cfg.get("warmup_steps", 0)
    if isinstance(t0, int) and not isinstance(t0, bool) and isinstance(total_steps, int) and 1 <= total_steps <= t0:
        cfg["warmup_steps"] = total_steps // 10
        log.warning("warmup_steps=%d is not shorter than the run (%d steps): warming up for %d steps instead "
                    "(a tenth of the run)", t0, total_steps, cfg["warmup_steps"])
    valid = {"constant": {"warmup_steps"}, "cosine": _keywords(warmup_cosine),
             "two_stage": _keywords(two_stage_schedule)}[name]
    if set(cfg) - valid:
        raise ValueError(f"schedule {name!r}: unknown key(s) {sorted(set(cfg) - valid)}; valid: {sorted(valid)}")
    try:
        if name == "constant":
            _, t0 = _check_steps(total_steps, cfg.get("warmup_steps", 0))
            return Schedule(optimizer, lambda t: (t + 1) / (t0 + 1) if t < t0 else 1.0)
        if name == "cosine":
            return warmup_cosine(optimizer, total_steps, **cfg)
        return two_stage_schedule(optimizer, total_steps, **cfg)
    except TypeError as e:
        raise ValueError(f"schedule {name!r}: {e}") from None


__all__ = ["SCHEDULES", "Schedule", "build_scheduler", "two_stage_schedule", "warmup_cosine"]
