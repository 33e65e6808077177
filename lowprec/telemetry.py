"""Per-layer numerics on demand: amax, saturation, flush-to-zero and non-finite counts.

    tel = Telemetry(model)        # names every quantized layer; off until enabled
    tel.enable()
    loss.backward()               # each QLinear/QEmbedding records weight, input (forward) and grad (backward)
    print(tel.table()); tel.first_nonfinite()   # -> ("blocks.3.ffn.up", "grad") or None

For one operand ``x`` quantized to ``fmt`` with per-element scale ``s`` (so ``q = Q(x)``):

- ``amax``       max |x| (NaN-free: non-finite elements are ignored; they are counted below)
- ``saturated``  fraction of elements with |x| >= s * fmt.max_value (at or beyond the largest code)
- ``flushed``    fraction of elements with x != 0 but Q(x) == 0 (lost below the smallest code)
- ``nonfinite``  number of NaN/inf elements of x

Statistics stay on the device while the step runs (no host sync per layer); reading them syncs
once. Off, a layer pays one attribute check per call.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn as nn

from .scaling import quantize_dequantize

STATS = ("amax", "saturated", "flushed", "nonfinite")


@torch.no_grad()
def operand_stats(x: torch.Tensor, fmt) -> torch.Tensor:
    """Stats of one operand as a float32 tensor ``[amax, saturated, flushed, nonfinite]``."""
    xf = x.detach().float()
    finite = torch.isfinite(xf)
    nonfinite = (~finite).sum().float()
    amax = torch.where(finite, xf.abs(), 0.0).amax() if xf.numel() else xf.new_zeros(())
    if fmt is None or xf.numel() == 0:
        zero = xf.new_zeros(())
        return torch.stack([amax, zero, zero, nonfinite])
    q, s = quantize_dequantize(xf, fmt)
    n = xf.numel()
    saturated = (xf.abs() >= s * fmt.max_value).sum().float() / n
    flushed = ((xf != 0) & (q == 0)).sum().float() / n
    return torch.stack([amax, saturated, flushed, nonfinite])


class Telemetry:
    """Collects :func:`operand_stats` from every quantized layer of ``model``."""

    def __init__(self, model: nn.Module):
        self.enabled = False
        self._seq = itertools.count()
        self._latest: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}
        self._first_bad: dict[tuple[str, str], tuple[int, torch.Tensor]] = {}
        self.layers = []
        for name, mod in model.named_modules():
            if hasattr(mod, "telemetry_slot"):
                mod.telemetry_slot = (self, name)
                self.layers.append(name)

    def enable(self):
        self.enabled = True
        return self

    def disable(self):
        self.enabled = False
        return self

    def reset(self):
        self._latest.clear()
        self._first_bad.clear()

    def record(self, layer: str, operand: str, x: torch.Tensor, fmt) -> None:
        stats = operand_stats(x, fmt)
        key = (layer, operand)
        seq = next(self._seq)
        self._latest[key] = (seq, stats)
        # keep the earliest record of each operand that may hold non-finite values; checked lazily
        if key not in self._first_bad or float(self._first_bad[key][1][3]) == 0:
            self._first_bad[key] = (seq, stats)

    def first_nonfinite(self) -> tuple[str, str] | None:
        """(layer, operand) of the first record (in execution order) that saw NaN/inf."""
        bad = [(seq, key) for key, (seq, stats) in self._first_bad.items() if float(stats[3]) > 0]
        return min(bad)[1] if bad else None

    def stats(self) -> dict[tuple[str, str], dict[str, float]]:
        """Latest statistics per (layer, operand), as Python floats (one sync)."""
        if not self._latest:
            return {}
        keys = list(self._latest)
        values = torch.stack([self._latest[k][1].cpu() for k in keys]).tolist()
        return {k: dict(zip(STATS, v)) for k, v in zip(keys, values)}

    def table(self) -> str:
        rows = [f"| layer | operand | {' | '.join(STATS)} |", "|---|---|" + "---|" * len(STATS)]
        for (layer, op), st in sorted(self.stats().items()):
            rows.append(f"| {layer} | {op} | {st['amax']:.4g} | {st['saturated']:.3%} | {st['flushed']:.3%} | {int(st['nonfinite'])} |")
        return "\n".join(rows)


def recording(module) -> bool:
    """Whether ``module``'s calls are recorded now (a Telemetry attached and enabled)."""
    slot = module.telemetry_slot
    return slot is not None and slot[0].enabled


def maybe_record(module, operand: str, x, fmt) -> None:
    """Called by layers; a no-op unless a Telemetry is attached and enabled. ``x`` is a tensor or
    a zero-argument callable giving it (so nothing is computed while telemetry is off)."""
    if recording(module):
        slot = module.telemetry_slot
        slot[0].record(slot[1], operand, x() if callable(x) else x, fmt)
