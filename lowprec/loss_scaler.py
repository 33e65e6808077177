"""Loss scaling: keep small gradients representable, and never let inf/NaN reach the weights.

Low-precision backward passes (fp16, fp8 E5M2 gradients) flush small gradients to zero. Multiplying
the loss by a scale ``S`` multiplies every gradient by ``S`` (backward is linear in the loss), so
``S * g`` is computed where ``g`` alone would underflow; dividing by ``S`` before the optimizer sees
the gradients restores ``g``. A power-of-two ``S`` makes both steps exact (only the exponent moves),
unless ``S * g`` overflows: then some gradient is inf/NaN and the step must be skipped.

Protocol (``update`` is folded into ``step``; there is nothing else to call)::

    scaler = lowprec.LossScaler("dynamic")
    for batch in data:
        loss = scaler.scale(model(batch))     # loss * S
        loss.backward()                       # gradients are S * g
        scaler.unscale_(optimizer)            # optional: only to clip or inspect g first
        scaler.step(optimizer)                # unscale (once), step if all finite, update S
        optimizer.zero_grad()

``step`` accepts a torch optimizer, any object with ``param_groups`` and ``step()``, or a bare
callable; an optimizer that keeps its gradients somewhere other than ``param.grad`` (packed
low-precision weights, a tensor attribute on a module) passes them explicitly::

    scaler.step(my_update_fn, grads=[layer.packed_grad, ...])

Per step, gradients are divided by ``S`` exactly once (``unscale_`` a second time is a no-op for
tensors already unscaled) and checked for inf/NaN. Then, with ``n`` the number of consecutive good
steps since ``S`` last changed (dynamic mode only)::

    all finite:   take the step;  n += 1;  if n == growth_interval: S = min(S * growth_factor, max_scale), n = 0
    any inf/NaN:  skip the step;  S = max(S * backoff_factor, min_scale), n = 0

``static`` keeps ``S`` fixed but still skips non-finite steps; ``none`` is ``S = 1`` (``scale`` is the
identity) and still skips non-finite steps. Every ``unscale_`` must be followed by ``step`` in the same
iteration: ``step`` is what ends the step.

On the device, without waiting for it. ``S``, ``n`` and the counters are tensors on the gradients'
device (moved there at first use), so nothing above needs the host: ``step`` alone reads the verdict
(one sync) to decide whether to call the optimizer. A loop that must not wait uses the device form::

    found_inf = scaler.unscale_and_check_(grads)   # 0-d float32 on the device: 1.0 if any inf/NaN
    optimizer.step(found_inf=found_inf)            # an optimizer that skips on the flag itself (optim.MixedOptimizer)
    scaler.update_(found_inf)                      # S, n and the counters, on the device; ends the step

Reading ``loss_scale``, the counters or ``state_dict()`` waits for the device (read them at log points).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .common import check_real

MODES = ("dynamic", "static", "none")
GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_STATE_KEYS = (
    "mode", "scale", "growth_factor", "backoff_factor", "growth_interval", "min_scale", "max_scale",
    "growth_tracker", "good_steps", "skipped_steps", "consecutive_bad", "last_step_skipped",
)
_COUNTERS = ("growth_tracker", "good_steps", "skipped_steps", "consecutive_bad")
_FUSED = hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_")
_FUSED_DTYPES = (torch.float32, torch.float16, torch.float64)


def _check_config(mode, init_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale):
    """Validated copies of the constructor's arguments (raises ValueError naming the bad one)."""
    if mode not in MODES:
        raise ValueError(f"unknown loss-scaling mode {mode!r}; choose one of {MODES}")
    min_scale = check_real("min_scale", min_scale, "> 0", lambda v: v > 0)
    max_scale = check_real("max_scale", max_scale, f">= min_scale ({min_scale})", lambda v: v >= min_scale)
    init_scale = check_real("init_scale", init_scale, "> 0", lambda v: v > 0)
    if mode != "none" and not min_scale <= init_scale <= max_scale:
        raise ValueError(f"init_scale={init_scale!r} is outside [min_scale, max_scale] = [{min_scale}, {max_scale}]")
    growth_factor = check_real("growth_factor", growth_factor, "> 1", lambda v: v > 1)
    backoff_factor = check_real("backoff_factor", backoff_factor, "in (0, 1)", lambda v: 0 < v < 1)
    if isinstance(growth_interval, bool) or not isinstance(growth_interval, int) or growth_interval < 1:
        raise ValueError(f"growth_interval={growth_interval!r} is invalid; it must be an int >= 1")
    return mode, init_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_scale


def _gradients(source) -> list[torch.Tensor]:
    """The gradient tensors named by ``source``.

    An optimizer (anything with ``param_groups``) gives its parameters' ``.grad``; an ``nn.Module``
    its parameters' ``.grad``; in an iterable, a parameter (a tensor with ``requires_grad``) gives
    its ``.grad`` and any other tensor *is* a gradient. ``None`` gradients are skipped."""
    if hasattr(source, "param_groups"):
        source = [p for group in source.param_groups for p in group["params"]]
    elif isinstance(source, torch.nn.Module):
        source = list(source.parameters())
    elif isinstance(source, torch.Tensor):
        source = [source]
    elif not isinstance(source, Iterable):
        raise TypeError(f"cannot find gradients in {type(source).__name__}; pass an optimizer, "
                        "parameters, or an iterable of gradient tensors")
    grads = []
    for t in source:
        if isinstance(t, dict) and "params" in t:  # a param group
            grads.extend(_gradients(t["params"]))
            continue
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"expected tensors, got {type(t).__name__}")
        g = t.grad if t.requires_grad else t
        if g is None:
            continue
        if g.layout != torch.strided:
            raise TypeError(f"only dense gradients are supported, got layout {g.layout}")
        if g.dtype not in GRAD_DTYPES:
            raise TypeError(f"cannot unscale a {g.dtype} gradient; supported dtypes are {GRAD_DTYPES}")
        grads.append(g)
    return grads


class LossScaler:
    """Static or dynamic loss scaling with step skipping; see the module docstring for the math.

    Args:
        mode: ``"dynamic"`` (grow/back off), ``"static"`` (fixed scale) or ``"none"`` (scale 1).
        init_scale: the starting scale ``S``, in ``[min_scale, max_scale]`` (ignored by ``"none"``).
        growth_factor: ``S *= growth_factor`` after ``growth_interval`` consecutive good steps; > 1.
        backoff_factor: ``S *= backoff_factor`` on a step with inf/NaN gradients; in (0, 1).
        growth_interval: consecutive good steps before a growth; int >= 1.
        min_scale, max_scale: dynamic ``S`` is clamped to ``[min_scale, max_scale]``; 0 < min <= max.

    Counters: ``good_steps`` and ``skipped_steps`` (totals), ``consecutive_bad`` (skipped steps in a
    row, for a loop that stops after K of them), ``last_step_skipped``. The current scale is
    ``loss_scale`` (a Python float; ``scale`` is the method that multiplies a loss by it). Each of
    these reads the device; ``current_scale()`` is ``S`` as a tensor, without waiting.
    """

    def __init__(self, mode: str = "dynamic", init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0,
                 max_scale: float = 2.0**24):
        (self.mode, init_scale, self.growth_factor, self.backoff_factor, self.growth_interval,
         self.min_scale, self.max_scale) = _check_config(mode, init_scale, growth_factor, backoff_factor,
                                                         growth_interval, min_scale, max_scale)
        # S in float64, as Python computed it: growth and backoff round exactly as before, and
        # S cast to the loss's dtype (or 1/S to float32) is what a Python-float S would give.
        self._scale = torch.tensor(1.0 if mode == "none" else init_scale, dtype=torch.float64)
        self._counters = {k: torch.zeros((), dtype=torch.int64) for k in _COUNTERS}
        self._last_skipped = torch.zeros((), dtype=torch.bool)
        self._set_floor()
        self._begin_step()

    def _set_floor(self) -> None:
        # the least S can become: the fused unscale kernel is exact only for S >= 1 (see below)
        self._floor = {"none": 1.0, "static": float(self._scale), "dynamic": self.min_scale}[self.mode]

    def _begin_step(self) -> None:
        # (device, data_ptr) of every gradient already divided this step -> the tensor, kept alive so
        # its address cannot be reused by another gradient before step() ends the step.
        self._unscaled: dict[tuple, torch.Tensor] = {}
        self._found_inf: torch.Tensor | None = None

    def _to(self, device: torch.device) -> None:
        """Move ``S`` and the counters to ``device`` (once: later calls find them there)."""
        if self._scale.device != device:
            self._scale = self._scale.to(device)
            self._counters = {k: v.to(device) for k, v in self._counters.items()}
            self._last_skipped = self._last_skipped.to(device)

    def to(self, device) -> LossScaler:
        """Keep ``S`` and the counters on ``device`` (else they move to the first loss or gradient seen)."""
        self._to(torch.device(device))
        return self

    def _read(self) -> dict[str, Any]:
        """Scale and counters as Python numbers, with one device-to-host copy."""
        values = torch.stack([self._scale, *(self._counters[k].double() for k in _COUNTERS),
                              self._last_skipped.double()]).tolist()
        out = {"scale": values[0], **{k: int(v) for k, v in zip(_COUNTERS, values[1:])}}
        out["last_step_skipped"] = bool(values[-1])
        return out

    @property
    def loss_scale(self) -> float:
        """The current scale ``S`` (waits for the device)."""
        return float(self._scale)

    def current_scale(self) -> torch.Tensor:
        """The current scale ``S``: a 0-d float64 tensor on the device (a copy; no wait)."""
        return self._scale.clone()

    @property
    def good_steps(self) -> int:
        return int(self._counters["good_steps"])

    @property
    def skipped_steps(self) -> int:
        return int(self._counters["skipped_steps"])

    @property
    def consecutive_bad(self) -> int:
        return int(self._counters["consecutive_bad"])

    @property
    def last_step_skipped(self) -> bool:
        return bool(self._last_skipped)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """``loss * S`` (``loss`` itself in mode ``"none"``); backward then yields ``S * g``."""
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"scale expects a loss tensor, got {type(loss).__name__}")
        if self.mode == "none":
            return loss
        self._to(loss.device)
        return loss * self._scale.to(loss.dtype)

    def unscale_(self, grads) -> bool:
        """Divide gradients by ``S`` in place, once per step; return True if any is inf/NaN.

        ``grads``: an optimizer (its ``param_groups``' ``.grad``), an ``nn.Module``, parameters, or an
        iterable of gradient tensors. Tensors already unscaled this step are left alone, so a second
        call is a no-op; the inf/NaN verdict accumulates over calls until ``step``. One host sync
        (``unscale_and_check_`` is the same without it)."""
        return bool(self.unscale_and_check_(grads))

    def unscale_and_check_(self, grads) -> torch.Tensor:
        """As ``unscale_``, without waiting: the verdict so far this step, a 0-d float32 tensor on
        the gradients' device, 1.0 if some gradient is inf/NaN, else 0.0."""
        fresh = []
        for g in _gradients(grads):
            key = (g.device, g.data_ptr())
            if g.numel() == 0 or key in self._unscaled:
                continue
            self._unscaled[key] = g
            fresh.append(g)
        if fresh:
            self._to(fresh[0].device)
            found = self._unscale_and_check(fresh)
            self._found_inf = found if self._found_inf is None else torch.maximum(self._found_inf, found)
        if self._found_inf is None:
            return torch.zeros((), dtype=torch.float32, device=self._scale.device)
        return self._found_inf

    def _unscale_and_check(self, grads: list[torch.Tensor]) -> torch.Tensor:
        device = self._scale.device
        inv = (1.0 / self._scale).to(torch.float32).reshape(1)  # exact for power-of-two scales
        groups: dict[tuple, list[torch.Tensor]] = {}
        for g in grads:
            groups.setdefault((g.device, g.dtype), []).append(g)
        flag = torch.zeros(1, dtype=torch.float32, device=device)
        for (dev, dtype), gs in groups.items():
            if dev != device:
                raise ValueError(f"gradients on {dev} and {device}: a LossScaler serves one device")
            # The fused kernel tests each value *before* multiplying, so it is used only when
            # multiplying cannot overflow (S >= 1 always); otherwise multiply first, then test the
            # result. Its CUDA build has no bfloat16 kernel (torch 2.11), hence the dtype test.
            if _FUSED and self._floor >= 1.0 and dev.type in ("cpu", "cuda") and dtype in _FUSED_DTYPES:
                torch._amp_foreach_non_finite_check_and_unscale_(gs, flag, inv)
            else:
                torch._foreach_mul_(gs, inv.reshape(()))
                bad = torch.stack([~torch.isfinite(g).all() for g in gs]).any()
                flag = torch.maximum(flag, bad.to(torch.float32))
        return flag.reshape(())

    def step(self, optimizer, grads=None) -> bool:
        """Unscale (if not done), take the step if every gradient is finite, update ``S``.

        ``optimizer``: an optimizer (its ``step()`` is called) or a callable taking no arguments.
        ``grads``: where the gradients are, as for ``unscale_``; by default the optimizer's
        ``param_groups``. A bare callable needs ``grads`` or an earlier ``unscale_``.
        Returns True if the step was taken, False if it was skipped (nothing else is touched:
        gradients are not zeroed and the weights are bit-identical). One host sync: the verdict
        decides whether ``optimizer`` runs."""
        if callable(getattr(optimizer, "step", None)):
            step_fn = optimizer.step
        elif callable(optimizer):
            step_fn = optimizer
        else:
            raise TypeError(f"step expects an optimizer or a callable, got {type(optimizer).__name__}")
        if grads is None and hasattr(optimizer, "param_groups"):
            grads = optimizer  # tensors an earlier unscale_ divided are not divided again
        if grads is None and not self._unscaled:
            raise ValueError("step(callable) cannot find the gradients: call unscale_(grads) first "
                             "or pass step(fn, grads=...)")
        if grads is not None:
            self.unscale_and_check_(grads)
        if not self._unscaled:
            # Stepping on gradients this scaler never saw would apply S * g; refuse instead.
            raise RuntimeError("no gradients were found to unscale (all None or empty); pass the "
                               "tensors the optimizer reads with grads=... or unscale_(...)")
        found_inf = self._found_inf
        skip = bool(found_inf)
        try:
            if not skip:
                step_fn()
        finally:
            self._begin_step()
        self.update_(found_inf)
        return not skip

    def update_(self, found_inf: torch.Tensor) -> None:
        """Update ``S`` and the counters from this step's verdict (a tensor from
        ``unscale_and_check_``), on the device; ends the step."""
        self._begin_step()
        self._to(found_inf.device)
        bad = found_inf.reshape(()) > 0
        c = self._counters
        self._last_skipped.copy_(bad)
        c["skipped_steps"].add_(bad)
        c["good_steps"].add_(~bad)
        c["consecutive_bad"].copy_(torch.where(bad, c["consecutive_bad"] + 1, 0))
        if self.mode != "dynamic":
            c["growth_tracker"].masked_fill_(bad, 0)
            return
        n = torch.where(bad, 0, c["growth_tracker"] + 1)
        grow = n == self.growth_interval
        s = self._scale
        self._scale.copy_(torch.where(bad, torch.clamp(s * self.backoff_factor, min=self.min_scale),
                                      torch.where(grow, torch.clamp(s * self.growth_factor, max=self.max_scale), s)))
        c["growth_tracker"].copy_(torch.where(grow, 0, n))

    def state_dict(self) -> dict[str, Any]:
        """Scale, counters and mode parameters, as plain Python numbers (waits for the device)."""
        now = self._read()
        return {"mode": self.mode, "scale": now["scale"], "growth_factor": self.growth_factor,
                "backoff_factor": self.backoff_factor, "growth_interval": self.growth_interval,
                "min_scale": self.min_scale, "max_scale": self.max_scale,
                **{k: now[k] for k in _COUNTERS}, "last_step_skipped": now["last_step_skipped"]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()`` exactly; a different mode or missing/unknown keys raise ValueError."""
        keys = set(state)
        if keys != set(_STATE_KEYS):
            raise ValueError(f"loss-scaler state has unknown keys {sorted(keys - set(_STATE_KEYS))} and "
                             f"lacks {sorted(set(_STATE_KEYS) - keys)}")
        if state["mode"] != self.mode:
            raise ValueError(f"cannot load a {state['mode']!r} loss-scaler state into a {self.mode!r} scaler")
        cfg = _check_config(state["mode"], state["scale"], state["growth_factor"], state["backoff_factor"],
                            state["growth_interval"], state["min_scale"], state["max_scale"])
        if self.mode == "none" and cfg[1] != 1.0:
            raise ValueError(f"a 'none' loss-scaler state must have scale 1.0, got {cfg[1]!r}")
        counters = {k: state[k] for k in _COUNTERS}
        for k, v in counters.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"loss-scaler state {k}={v!r} must be an int >= 0")
        if not isinstance(state["last_step_skipped"], bool):
            raise ValueError(f"loss-scaler state last_step_skipped={state['last_step_skipped']!r} must be a bool")
        (_, scale, self.growth_factor, self.backoff_factor, self.growth_interval,
         self.min_scale, self.max_scale) = cfg
        self._scale.fill_(scale)
        for k, v in counters.items():
            self._counters[k].fill_(v)
        self._last_skipped.fill_(state["last_step_skipped"])
        self._set_floor()
        self._begin_step()

    def __repr__(self) -> str:
        now = self._read()
        return (f"LossScaler(mode={self.mode!r}, scale={now['scale']!r}, growth_factor={self.growth_factor!r}, "
                f"backoff_factor={self.backoff_factor!r}, growth_interval={self.growth_interval!r}, "
                f"min_scale={self.min_scale!r}, max_scale={self.max_scale!r}, good_steps={now['good_steps']}, "
                f"skipped_steps={now['skipped_steps']}, consecutive_bad={now['consecutive_bad']})")
