"""The common frame of the optimizers that update weights in their own storage.

A *target* is what one of these optimizers updates: a native layer (``lowprec.nn.QLinear`` /
``QEmbedding`` with ``storage="native"``: packed weight in buffers, fp32 gradient in
``layer.native_grad``) or, for :class:`~optim.SRAdamW`, a float ``Parameter`` (``.grad``).

They are ``torch.optim.Optimizer`` subclasses, so learning-rate schedulers drive their ``lr``; a
param group's ``"params"`` entry is a :class:`NativeGrads` view whose iteration yields the
gradients the next ``step()`` will read: each Parameter (a reader takes its ``.grad``, as for any
optimizer) and each native layer's current ``native_grad`` (a plain tensor: itself the gradient).
That is exactly what ``lowprec.LossScaler`` reads, so ``scaler.step(optimizer)`` unscales and checks
native gradients too, with nothing to pass. The targets themselves are ``group["layers"]`` and
``group["tensors"]``.

State is kept per target (``self.state[target]``): ``"step"``, the updates taken, a 0-d float32
tensor on the target's device (as torch.optim keeps it), and ``"calls"``, the updates tried (taken or
skipped), a Python int; ``state_dict()`` numbers targets in group order and round-trips exactly
(tensors are copied bit for bit; the stochastic-rounding noise is reseeded from (seed, target,
calls), see :mod:`optim.moments`, or, for Bop and TernaryBop, computed from a key and a device count
kept in the state, see :mod:`optim.bop`).

Sharded Parameters. A Parameter that FSDP2 has sharded (a ``DTensor``) is updated through its local
shard (``local``): the state holds tensors of the shard's shape and the update reads and writes the
shard, so each rank keeps the moments of the weights it holds and no collective runs in ``step``.

Skipping on the device. ``step(found_inf=flag)`` (a 0-d tensor from ``LossScaler.unscale_and_check_``,
1.0 for a step whose gradients hold inf/NaN) computes every update and then keeps, where the flag is
set, the old weight and the old state tensors (``torch.where``): a skipped step leaves the weights,
moments and ``step`` bit-identical (only ``calls`` moves), and nothing waits for the device to
decide. Subclasses therefore never change a state tensor in place: ``_update`` reads them, writes new
ones into the state dict and returns the new weight; :meth:`_apply` commits or keeps. (Bop and
TernaryBop update a group's layers together and make that choice inside their compiled update.)
"""

from __future__ import annotations

import abc
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lowprec.common import check_real
from lowprec.nn.native import NativeWeightMixin
from lowprec.qtensor import QTensor

from .moments import SeededGenerators


def is_native_layer(obj) -> bool:
    """True for a lowprec layer whose weight lives only packed (``storage="native"``)."""
    return isinstance(obj, NativeWeightMixin) and obj.is_native


def describe_target(t) -> str:
    if isinstance(t, nn.Module):
        p = getattr(t, "precision", None)
        return f"{type(t).__name__}(weight={getattr(p, 'weight', None)}, storage={getattr(p, 'storage', None)})"
    if isinstance(t, torch.Tensor):
        kind = "Parameter" if isinstance(t, nn.Parameter) else "tensor"
        return f"{kind}(shape={tuple(t.shape)}, dtype={t.dtype})"
    return type(t).__name__


def check_betas(name: str, betas) -> tuple[float, float]:
    try:
        b1, b2 = betas
    except (TypeError, ValueError):
        raise ValueError(f"{name}={betas!r} is invalid; give two numbers in [0, 1)") from None
    return (check_real(f"{name}[0]", b1, "in [0, 1)", lambda v: 0 <= v < 1),
            check_real(f"{name}[1]", b2, "in [0, 1)", lambda v: 0 <= v < 1))


class NativeGrads:
    """``group["params"]`` of a target optimizer: iterating yields the group's Parameters and the
    current ``native_grad`` of each of its native layers (those that have one)."""

    def __init__(self, layers: list[nn.Module], tensors: list[torch.Tensor]):
        self.layers, self.tensors = layers, tensors

    def __iter__(self) -> Iterator[torch.Tensor]:
        yield from self.tensors
        for layer in self.layers:
            if layer.native_grad is not None:
                yield layer.native_grad

    def __len__(self) -> int:
        return len(self.tensors) + sum(layer.native_grad is not None for layer in self.layers)

    def __repr__(self) -> str:
        return f"NativeGrads({len(self.layers)} native layers, {len(self.tensors)} parameters)"


def local(t):
    """The part of ``t`` this process holds: a DTensor's local shard (a view of its storage: writing
    it writes the DTensor); any other tensor itself."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def shard_coordinate(t) -> int:
    """This rank's position among the holders of a DTensor's shards (0 for anything else): what
    makes the stochastic-rounding noise of one Parameter differ between its shards."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return 0
    coords = t.device_mesh.get_coordinate() or []
    position = 0
    for c, n in zip(coords, t.device_mesh.shape):
        position = position * n + c
    return position


class TargetOptimizer(torch.optim.Optimizer, metaclass=abc.ABCMeta):
    """Base: param groups of native layers and/or Parameters; per-target ``_update``.

    Subclasses define ``_check_group(group)`` (validate hyperparameters, raising ValueError),
    ``_check_target(t)`` (raise TypeError for what they cannot update), ``_init_state(group,
    target, st)`` (the state of a target's first update) and ``_update(group, target, grad, index)``
    (one target, in fp32: new state tensors into ``self.state[target]``, and the new weight returned
    in its storage: a QTensor for a native layer, a tensor of the Parameter's dtype otherwise)."""

    def __init__(self, params, defaults: dict[str, Any], seed: int = 0):
        self._noise = SeededGenerators(seed, type(self).__name__)
        self.seed = seed
        self._index: dict[int, int] = {}
        self._group_of: dict[int, dict] = {}
        super().__init__(params, defaults)

    # ---- groups ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        items = param_group["params"]
        if isinstance(items, NativeGrads):
            items = [*items.layers, *items.tensors]
        elif isinstance(items, (torch.Tensor, nn.Module)):
            items = [items]
        elif isinstance(items, set):
            raise TypeError("targets must be an ordered collection (a list), not a set")
        layers, tensors = [], []
        for t in items:
            self._check_target(t)
            if id(t) in self._index:
                raise ValueError(f"{describe_target(t)} appears in more than one param group")
            (layers if isinstance(t, nn.Module) else tensors).append(t)
        for name, default in self.defaults.items():
            param_group.setdefault(name, default)
        self._check_group(param_group)
        param_group["params"] = NativeGrads(layers, tensors)
        param_group["layers"], param_group["tensors"] = layers, tensors
        for t in (*layers, *tensors):
            self._index[id(t)] = len(self._index)
            self._group_of[id(t)] = param_group
        self.param_groups.append(param_group)

    @abc.abstractmethod
    def _check_group(self, group: dict) -> None:
        """Validate a param group's hyperparameters (ValueError naming the bad one)."""

    @abc.abstractmethod
    def _check_target(self, t) -> None:
        """Refuse a target this rule cannot update (TypeError naming the rule to use)."""

    @abc.abstractmethod
    def _init_state(self, group: dict, target, st: dict) -> None:
        """Fill the empty state ``st`` of ``target`` (``step`` and ``calls`` are there already)."""

    def _update(self, group: dict, target, grad: torch.Tensor, index: int):
        """One step of ``target`` from ``grad``: new state tensors into ``self.state[target]`` (whose
        ``step`` already counts this update), never changed in place; returns the new weight. (A
        subclass that updates a group's targets together overrides `_step_group` and `_apply` instead.)"""
        raise NotImplementedError(f"{type(self).__name__} defines neither _update nor _apply")

    def targets(self) -> list:
        """Every target, in group order (the numbering of ``state_dict``)."""
        return [t for g in self.param_groups for t in (*g["layers"], *g["tensors"])]

    # ---- stepping ------------------------------------------------------------------------------
    @staticmethod
    def _grad_of(t) -> torch.Tensor | None:
        return t.native_grad if isinstance(t, nn.Module) else t.grad

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        """Update every target that has a gradient (targets without one are left untouched).
        ``found_inf``: a 0-d device tensor; where it is nonzero every update is computed and
        discarded (see the module doc), with no host sync."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        skip = None if found_inf is None else found_inf.reshape(()) > 0
        for group in self.param_groups:
            items = [(t, g, self._index[id(t)]) for t in (*group["layers"], *group["tensors"])
                     if (g := self._grad_of(t)) is not None]
            if items:
                self._step_group(group, items, skip)
        return loss

    def _step_group(self, group: dict, items: list, skip: torch.Tensor | None) -> None:
        """Update the ``(target, grad, index)`` of one group that have a gradient, one by one (a
        subclass may update them together: the result must be the same)."""
        for t, grad, index in items:
            self._apply(group, t, grad, index, skip)

    @torch.no_grad()
    def update_now(self, target, grad: torch.Tensor) -> None:
        """Update one target from ``grad`` at once (the update-in-backward path)."""
        group = self._group_of.get(id(target))
        if group is None:
            raise ValueError(f"{describe_target(target)} is not a target of this {type(self).__name__}")
        self._apply(group, target, grad, self._index[id(target)])

    def _apply(self, group: dict, target, grad: torch.Tensor, index: int, skip: torch.Tensor | None = None) -> None:
        """Run ``_update`` and write its result; where ``skip`` (a 0-d bool tensor) is set, keep
        the old weight and state tensors instead."""
        st = self._begin(group, target)
        old = dict(st)
        st["step"] = st["step"] + 1
        new = self._update(group, target, local(grad), index)
        native = isinstance(target, nn.Module)
        if skip is not None:
            for k, v in st.items():
                if isinstance(v, torch.Tensor) and v is not old[k]:
                    st[k] = torch.where(skip, old[k], v)
            new = _keep_qtensor(skip, target.native_weight, new) if native else torch.where(skip, local(target), new)
        if native:
            target.set_native_weight(new)
        elif new is not target:
            local(target).copy_(new)

    def _begin(self, group: dict, target) -> dict:
        """The state of ``target`` (made on its first update), with this update counted in
        ``calls``; ``step`` is the caller's to advance."""
        st = self.state[target]
        device = self._device_of(target)
        if not st:
            st["step"], st["calls"] = torch.zeros((), device=device), 0
            self._init_state(group, target, st)
        elif not isinstance(st["step"], torch.Tensor):  # a state written with a Python-int step
            st["step"], st["calls"] = torch.full((), float(st["step"]), device=device), st.get("calls", st["step"])
        st["calls"] += 1
        return st

    @staticmethod
    def _device_of(t) -> torch.device:
        return (t.w_data if isinstance(t, nn.Module) else t).device

    def zero_grad(self, set_to_none: bool = True) -> None:
        for group in self.param_groups:
            for layer in group["layers"]:
                layer.zero_native_grad()
            for p in group["tensors"]:
                if p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.detach_().zero_()

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"state": {index: {...}}, "param_groups": [...], "seed": int}``; tensors are references
        (as torch.optim does: ``torch.save`` copies them)."""
        groups = []
        for g in self.param_groups:
            entry = {k: v for k, v in g.items() if k not in ("params", "layers", "tensors")}
            members = (*g["layers"], *g["tensors"])
            entry["targets"] = [self._index[id(t)] for t in members]
            entry["shapes"] = [list(self._shape_of(t)) for t in members]
            groups.append(entry)
        state = {self._index[id(t)]: dict(self.state[t]) for t in self.targets() if t in self.state}
        return {"state": state, "param_groups": groups, "seed": self.seed}

    @staticmethod
    def _shape_of(t) -> torch.Size:
        """The shape of the weight this process updates (a sharded Parameter's local shard)."""
        return t.native_weight.shape if isinstance(t, nn.Module) else local(t).shape

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore ``state_dict()`` exactly into an optimizer built the same way (same targets in the
        same order, same shapes); tensors are copied onto each target's device."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"{type(self).__name__}: the state has {len(groups)} param groups, this "
                             f"optimizer {len(self.param_groups)}")
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            members = (*group["layers"], *group["tensors"])
            shapes = [list(self._shape_of(t)) for t in members]
            if saved["shapes"] != shapes:
                raise ValueError(f"{type(self).__name__}: param group {i} holds targets of shapes "
                                 f"{saved['shapes']} in the state, {shapes} here")
        targets = self.targets()
        self.state.clear()
        for index, entry in state_dict["state"].items():
            t = targets[int(index)]
            device = self._device_of(t)
            st = {k: v.detach().clone().to(device) if isinstance(v, torch.Tensor) else v for k, v in entry.items()}
            if not isinstance(st.get("step"), torch.Tensor):  # written with a Python-int step
                st["calls"] = st.get("calls", st["step"])
                st["step"] = torch.full((), float(st["step"]), device=device)
            self.state[t] = st
        for saved, group in zip(groups, self.param_groups):
            for k, v in saved.items():
                if k not in ("targets", "shapes"):
                    group[k] = v
            self._check_group(group)
        self.seed = state_dict["seed"]
        self._noise = SeededGenerators(self.seed, type(self).__name__)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} (seed={self.seed})"]
        for i, g in enumerate(self.param_groups):
            hyper = ", ".join(f"{k}={v}" for k, v in g.items() if k not in ("params", "layers", "tensors"))
            lines.append(f"  group {i}: {len(g['layers'])} native layers, {len(g['tensors'])} parameters; {hyper}")
        return "\n".join(lines)


def _keep_qtensor(skip: torch.Tensor, old: QTensor, new: QTensor) -> QTensor:
    """``new``, with ``old``'s data and scales where the 0-d bool ``skip`` is set."""
    def pick(o, n):
        return None if n is None else torch.where(skip, o.reshape(n.shape), n)
    return QTensor(pick(old.data, new.data), pick(old.scale, new.scale), pick(old.global_scale, new.global_scale),
                   new.fmt, new.shape, new.padded_last)


__all__ = ["NativeGrads", "TargetOptimizer", "check_betas", "describe_target", "is_native_layer"]
