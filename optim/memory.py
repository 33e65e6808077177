"""Memory accounting: resident bytes per parameter of weights and optimizer state, by group.

Everything is measured from actual storages, never from formats on paper:

- weights: a native layer's packed buffers + scales (``QTensor.nbytes``), a Parameter's
  ``numel * element_size`` (latent masters, norms, biases);
- state: every tensor the optimizer holds for that target (moments, momentum, scale moments,
  fp8 moment scales, torch's 0-d ``step`` tensors), summed by ``numel * element_size``;
- grads at the step: the gradient a training step holds between backward and ``step()``:
  ``numel * element_size`` of a Parameter's ``.grad``; ``4 * numel`` for a native layer's fp32
  ``native_grad``, or 0 for a layer updated inside backward (:func:`optim.attach_in_backward`),
  whose gradient lives only while its own backward runs;
- buffers and caches: every other tensor a module holds (buffers such as amax histories, tensor
  attributes such as a native layer's gradient carrier), by storage. Quantized weight operands
  are shared within a step through weak references and hold nothing between steps.

``resident = weights + state (+ buffers and caches)`` is what stays between steps (binary + Bop
2.125, ternary + TernaryBop 2.25, FP8 + SRAdamW with fp8 moments 3.0625 bytes per parameter);
``at step = resident + grads`` is what the step needs at its peak, activations aside; for bf16
mixed-precision AdamW (fp32 master, fp32 gradient, two fp32 moments) it is the classic 16.
Optimizer state is allocated at the first ``step()``: report after one.

A model sharded over several ranks (FSDP2's DTensor Parameters, row-sharded native layers) is
reported for the rank that calls: its shards' elements and bytes, so bytes per parameter read as
in one process and ``resident`` is what that rank holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from lowprec.common import human_bytes as _human

from .moments import state_nbytes


@dataclass
class MemoryRow:
    """One group: ``params`` elements; bytes of weights, optimizer state, gradients at the step."""

    group: str
    optimizer: str
    params: int = 0
    weight_bytes: int = 0
    state_bytes: int = 0
    grad_bytes: int = 0
    targets: int = 0

    @property
    def resident_bytes(self) -> int:
        return self.weight_bytes + self.state_bytes

    @property
    def step_bytes(self) -> int:
        return self.resident_bytes + self.grad_bytes

    def per_param(self, nbytes: int) -> float:
        return nbytes / self.params if self.params else 0.0

    @property
    def resident_per_param(self) -> float:
        return self.per_param(self.resident_bytes)

    @property
    def step_per_param(self) -> float:
        return self.per_param(self.step_bytes)


@dataclass
class MemoryReport:
    """Rows by group and their total; ``str()`` is a markdown table."""

    rows: list[MemoryRow]
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> MemoryRow:
        t = MemoryRow("total", "")
        for r in self.rows:
            t.params += r.params
            t.weight_bytes += r.weight_bytes
            t.state_bytes += r.state_bytes
            t.grad_bytes += r.grad_bytes
            t.targets += r.targets
        return t

    def row(self, group: str) -> MemoryRow:
        for r in self.rows:
            if r.group == group:
                return r
        raise KeyError(f"no group {group!r}; the groups are {[r.group for r in self.rows]}")

    def to_rows(self) -> list[dict]:
        return [dict(group=r.group, optimizer=r.optimizer, params=r.params, weight_bytes=r.weight_bytes,
                     state_bytes=r.state_bytes, grad_bytes=r.grad_bytes, resident_per_param=r.resident_per_param,
                     step_per_param=r.step_per_param) for r in (*self.rows, self.total)]

    def __str__(self) -> str:
        out = ["| group | optimizer | tensors | params | weights | state | resident B/param | grads at step "
               "| at step B/param |", "|---|---|---|---|---|---|---|---|---|"]
        for r in (*self.rows, self.total):
            bold = (lambda s: f"**{s}**") if r.group == "total" else (lambda s: s)
            out.append(f"| {bold(r.group)} | {r.optimizer} | {r.targets} | {r.params:,} | {_human(r.weight_bytes)} | "
                       f"{_human(r.state_bytes)} | {bold(f'{r.resident_per_param:.4f}')} | {_human(r.grad_bytes)} | "
                       f"{r.step_per_param:.4f} |")
        return "\n".join(out + [f"\n{n}" for n in self.notes])


def _targets(group: dict) -> list:
    if "layers" in group:  # an optim.base.TargetOptimizer group
        return [*group["layers"], *group["tensors"]]
    return list(group["params"])


def _account(row: MemoryRow, target, state) -> bool:
    """Add one target to ``row``; True if its optimizer state is allocated."""
    row.targets += 1
    if isinstance(target, nn.Module):
        n = target.native_weight.numel()
        row.weight_bytes += target.native_nbytes()
        row.grad_bytes += 0 if target.native_grad_hook is not None else 4 * n
    else:
        target = _local(target)
        n = target.numel()
        row.weight_bytes += n * target.element_size()
        row.grad_bytes += n * target.element_size()
    row.params += n
    row.state_bytes += state_nbytes(state)
    return bool(state)


_WEIGHT_BUFFERS = ("w_data", "w_scale", "w_global")  # a native layer's weight, counted as weights


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of a DTensor (a sharded Parameter); any other tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    """(storage address, device index); None for a storage FSDP2 has freed (an unsharded
    parameter between its all-gathers holds no memory)."""
    try:
        return _local(t).untyped_storage().data_ptr(), t.device.index or 0
    except RuntimeError:
        return None


def _held_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every tensor the modules hold besides parameters and native weights, one per storage:
    buffers (amax histories, norms' statistics), tensor attributes (a native layer's gradient
    carrier) and tensors inside dict/list/tuple attributes. Gradients are not included (they are
    ``grads at step``); weak references (the per-step operand caches) hold nothing."""
    seen: set[tuple[int, int]] = set()
    params = {_storage_key(p) for p in model.parameters()}
    out = []

    def visit(value, depth=0):
        if isinstance(value, torch.Tensor):
            value = _local(value)
            key = _storage_key(value)
            if key is not None and key not in seen and key not in params and not isinstance(value, nn.Parameter):
                seen.add(key)
                out.append(value)
        elif isinstance(value, dict) and depth < 4:
            for v in value.values():
                visit(v, depth + 1)
        elif isinstance(value, (list, tuple)) and depth < 4:
            for v in value:
                visit(v, depth + 1)

    for mod in model.modules():
        native = getattr(mod, "is_native", False)
        for name, buf in mod._buffers.items():
            if buf is not None and not (native and name in _WEIGHT_BUFFERS):
                visit(buf)
        for name, value in vars(mod).items():
            if name not in ("_parameters", "_buffers", "_modules") and not name.startswith("_forward") \
                    and not name.startswith("_backward") and not name.startswith("_state_dict"):
                visit(value)
    return out


def memory_report(model: nn.Module, optimizer: torch.optim.Optimizer) -> MemoryReport:
    """Resident bytes per parameter of ``model`` under ``optimizer`` (a :class:`~optim.MixedOptimizer`,
    one of this package's optimizers, or any torch optimizer), by group; see the module doc.
    Weights of ``model`` that the optimizer does not update form the group ``not optimized``."""
    from .base import is_native_layer

    parts = getattr(optimizer, "parts", None) or {type(optimizer).__name__: optimizer}
    rows: dict[str, MemoryRow] = {}
    covered: set[int] = set()
    empty = []
    for name, opt in parts.items():
        for group in opt.param_groups:
            key = group.get("route", name)
            row = rows.setdefault(key, MemoryRow(key, type(opt).__name__))
            for t in _targets(group):
                covered.add(id(t))
                if not _account(row, t, opt.state.get(t, {})) and key not in empty:
                    empty.append(key)
    held = MemoryRow("buffers and caches", "-")
    for t in _held_tensors(model):
        held.targets += 1
        held.weight_bytes += t.untyped_storage().nbytes()
    stray = MemoryRow("not optimized", "-")
    for mod in model.modules():
        if is_native_layer(mod) and id(mod) not in covered:
            covered.add(id(mod))
            stray.targets += 1
            stray.params += mod.native_weight.numel()
            stray.weight_bytes += mod.native_nbytes()
    for p in model.parameters():
        if id(p) not in covered:
            covered.add(id(p))
            stray.targets += 1
            stray.params += _local(p).numel()
            stray.weight_bytes += _local(p).numel() * p.element_size()
    report = MemoryReport(list(rows.values()) + [r for r in (stray, held) if r.targets])
    if empty:
        report.notes.append(f"state not allocated yet for some targets of {empty}: optimizers allocate it at "
                            "the first step(); report after one step")
    return report


__all__ = ["memory_report", "MemoryReport", "MemoryRow"]
