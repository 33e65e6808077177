"""One optimizer for a mixed-precision model: every weight routed by its layer's precision.

``build_optimizer(model, cfg)`` reads only the layers (what ``lowprec.apply_policy`` made them), so
nothing is configured twice::

    layer                                                     part       update rule (default)
    QLinear/QEmbedding, storage native, binary weight        "bop"      optim.Bop
    QLinear/QEmbedding, storage native, ternary weight       "ternary"  optim.TernaryBop
    QLinear/QEmbedding, storage native, float/int weight     "sr"       optim.SRAdamW (stochastic rounding)
    QLinear/QEmbedding, storage latent, quantized weight     "latent"   AdamW (any torch.optim, or SRAdamW)
    every other trainable Parameter (norms, biases, scales,  "other"    AdamW; weight decay only on
      unquantized weights and embeddings)                                >= 2-D tensors

The result is a :class:`MixedOptimizer`: a ``torch.optim.Optimizer`` whose ``param_groups`` are
the parts' own groups (schedulers set their ``lr``; each group carries ``route``), with one
``step()`` (``step(found_inf=flag)`` skips a step with inf/NaN gradients without a host sync: see
``docs/optim.md``), one ``zero_grad()`` (clearing native gradients too), ``grads()`` (every gradient the
step will read, native ones included) and a ``state_dict()`` that round-trips exactly.
Torch optimizers that can be fused (AdamW, Adam, SGD, ...) are built fused when their parameters are
on CUDA and the config chooses neither ``fused`` nor ``foreach``: one kernel per step, and the
device-side skip.
``lowprec.LossScaler.step(optimizer)`` finds native gradients through the groups (see
:mod:`optim.base`); ``scaler.step(optimizer, grads=optimizer.grads())`` is the explicit spelling.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from lowprec.common import plain
from lowprec.nn.native import NativeWeightMixin

from .base import TargetOptimizer
from .bop import Bop, TernaryBop
from .sr_adamw import SRAdamW

PARTS = ("latent", "other", "bop", "ternary", "sr")
NATIVE_RULES = {"bop": Bop, "ternary_bop": TernaryBop, "sr_adamw": SRAdamW}
PART_OF_RULE = {"bop": "bop", "ternary_bop": "ternary", "sr_adamw": "sr"}
# which latent-free rules can update which weight kind (SR rounding works on every grid)
NATIVE_ALLOWED = {"binary": ("bop", "sr_adamw"), "ternary": ("ternary_bop", "sr_adamw"),
                  "float": ("sr_adamw",), "int": ("sr_adamw",)}
DEFAULT_NATIVE = {"binary": "bop", "ternary": "ternary_bop", "float": "sr_adamw", "int": "sr_adamw"}
CONFIG_KEYS = ("name", "lr", "betas", "eps", "weight_decay", "seed", "latent", "other", "bop", "ternary", "sr",
               "native", "schedule", "in_backward")
SHARED_KEYS = ("lr", "betas", "eps", "weight_decay", "seed")
_OWN = {"SRAdamW": SRAdamW}


class _MergedState(Mapping):
    """Read-only view of the parts' ``state`` (keyed by Parameter or native layer)."""

    def __init__(self, parts: dict[str, torch.optim.Optimizer]):
        self._parts = parts

    def __getitem__(self, key):
        for opt in self._parts.values():
            if key in opt.state:
                return opt.state[key]
        raise KeyError(key)

    def __iter__(self):
        for opt in self._parts.values():
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._parts.values())


# torch optimizers whose update of an element reads only that element's parameter, gradient and
# state, and whose step updates every state tensor in place: on a parameter split into shards each
# rank's update of its shard is the update of those elements
ELEMENTWISE = (torch.optim.Adam, torch.optim.AdamW)


def step_on_shards(opt: torch.optim.Optimizer) -> None:
    """``opt.step()``; for an ``ELEMENTWISE`` optimizer of sharded parameters (FSDP2's DTensors) it
    steps their local shards: for the length of the step each DTensor parameter in its groups is
    replaced by its local tensor, holding its gradient's local tensor and its state's local tensors
    (the same objects: the step updates the DTensor state in place). The same kernels on the same
    elements, bit for bit, without DTensor's dispatch of every operation over every shard (host time
    on every step). A parameter without state yet (the first step)
    makes the whole step go through the DTensors, so the state is created as DTensors (the sharded
    checkpoint saves it as such)."""
    from torch.distributed.tensor import DTensor

    swaps = [(group["params"], i, p) for group in opt.param_groups for i, p in enumerate(group["params"])
             if isinstance(p, DTensor)] if type(opt) in ELEMENTWISE else []
    if not swaps or not all(opt.state.get(p) for _, _, p in swaps):
        opt.step()
        return
    try:
        for params, i, p in swaps:
            local, g = p._local_tensor, p.grad
            local.grad = g._local_tensor if isinstance(g, DTensor) else g
            opt.state[local] = {k: v._local_tensor if isinstance(v, DTensor) else v for k, v in opt.state[p].items()}
            params[i] = local
        opt.step()
    finally:
        for params, i, p in swaps:
            local = params[i]
            params[i] = p
            if local is not p:
                local.grad = None
                opt.state.pop(local, None)


class MixedOptimizer(torch.optim.Optimizer):
    """Several optimizers stepped as one. ``parts``: name -> optimizer (``PARTS`` names when built by
    :func:`build_optimizer`); ``names``: name -> the module/parameter names each part updates."""

    def __init__(self, parts: Mapping[str, torch.optim.Optimizer], names: Mapping[str, list[str]] | None = None):
        if not parts:
            raise ValueError("MixedOptimizer needs at least one part; the model has no trainable weights")
        self.parts = dict(parts)
        self.names = {k: list(v) for k, v in (names or {}).items()}
        super().__init__([g for opt in self.parts.values() for g in opt.param_groups], {})
        self.state = _MergedState(self.parts)

    def add_param_group(self, param_group: dict) -> None:
        # the groups are the parts' own dicts: schedulers that edit them edit the parts
        self.param_groups.append(param_group)

    @torch.no_grad()
    def step(self, closure=None, found_inf: torch.Tensor | None = None):
        """Step every part. ``found_inf`` (a 0-d float32 device tensor, 1.0 on a step whose
        gradients hold inf/NaN) skips the step exactly: Bop/TernaryBop/SRAdamW and torch's fused
        optimizers on the device; any other torch optimizer after reading the flag on the host."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.parts.values():
            if found_inf is None:
                step_on_shards(opt)
            elif isinstance(opt, TargetOptimizer):
                opt.step(found_inf=found_inf)
            elif getattr(opt, "_step_supports_amp_scaling", False) and all(g.get("fused") for g in opt.param_groups):
                # torch's fused optimizers read the flag as torch.amp.GradScaler hands it over (fused
                # as built; a state dict from a CPU run loads fused=False into the groups: host path)
                opt.grad_scale, opt.found_inf = None, found_inf
                try:
                    step_on_shards(opt)
                finally:
                    del opt.grad_scale, opt.found_inf
            elif not bool(found_inf):  # a host sync on CUDA: this optimizer cannot take the flag
                step_on_shards(opt)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.parts.values():
            opt.zero_grad(set_to_none=set_to_none)

    def grads(self) -> Iterator[torch.Tensor]:
        """Every gradient the next ``step()`` reads: Parameters' ``.grad`` and native gradients."""
        for group in self.param_groups:
            for t in group["params"]:
                g = t.grad if t.requires_grad else t
                if g is not None:
                    yield g

    def state_dict(self) -> dict[str, Any]:
        return {"parts": {name: opt.state_dict() for name, opt in self.parts.items()}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        saved = state_dict["parts"]
        if set(saved) != set(self.parts):
            raise ValueError(f"the state holds parts {sorted(saved)}, this optimizer {sorted(self.parts)}: "
                             "build it from the same model, policy and config")
        for name, opt in self.parts.items():
            opt.load_state_dict(saved[name])
        # torch.optim's load_state_dict replaces its group dicts: point at the new ones
        self.param_groups[:] = [g for opt in self.parts.values() for g in opt.param_groups]

    def describe(self) -> str:
        """Markdown table: part, optimizer, number of targets, parameters (elements)."""
        rows = ["| part | optimizer | targets | parameters |", "|---|---|---|---|"]
        for name, opt in self.parts.items():
            n = 0
            for g in opt.param_groups:
                members = [*g.get("layers", []), *g.get("tensors", [])] if "layers" in g else list(g["params"])
                n += sum(t.native_weight.numel() if isinstance(t, nn.Module) else t.numel() for t in members)
            rows.append(f"| {name} | {type(opt).__name__} | {len(self.names.get(name, []))} | {n:,} |")
        return "\n".join(rows)

    def __repr__(self) -> str:
        return "MixedOptimizer(\n" + "\n".join(f"  {k}: {type(v).__name__}" for k, v in self.parts.items()) + "\n)"


def _optimizer_class(part: str, name: str) -> type:
    if name in _OWN:
        return _OWN[name]
    if name in ("Bop", "TernaryBop"):
        raise ValueError(f"{part}.name={name!r}: {name} updates native layers only; {part} weights are float "
                         "Parameters (give them AdamW, SRAdamW or another torch.optim optimizer)")
    cls = getattr(torch.optim, name, None)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
        choices = sorted(n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
                         and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != "Optimizer")
        raise ValueError(f"{part}.name={name!r} is not an optimizer; choose SRAdamW or one of torch.optim's: "
                         f"{', '.join(choices)}")
    return cls


def _fusable(cls: type, params: list, kw: dict) -> bool:
    """True for a torch optimizer with a fused CUDA kernel, all of whose parameters are floating
    CUDA tensors, when the config chose neither ``fused`` nor ``foreach``."""
    accepted = inspect.signature(cls.__init__).parameters
    return ("fused" in accepted and "fused" not in kw and kw.get("foreach") is None
            and all(p.is_cuda and p.is_floating_point() for p in params))


def _kwargs(part: str, cls: type, shared: dict, own: dict) -> dict:
    """Top-level shared values the class accepts, overridden by the part's own keys."""
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
    unknown = set(own) - accepted
    if unknown:
        raise ValueError(f"{part}: {cls.__name__} has no argument(s) {sorted(unknown)}; it takes {sorted(accepted)}")
    kw = {k: v for k, v in shared.items() if k in accepted}
    kw.update(own)
    if isinstance(kw.get("betas"), list):
        kw["betas"] = tuple(kw["betas"])
    return kw


def _native_routes(cfg_native: Mapping | None) -> dict[str, str]:
    routes = dict(DEFAULT_NATIVE)
    aliases = {r.replace("_", ""): r for r in NATIVE_RULES}  # "SRAdamW", "TernaryBop", "Bop" name rules too
    for kind, given in (cfg_native or {}).items():
        if kind not in NATIVE_ALLOWED:
            raise ValueError(f"native.{kind}: unknown weight kind; the kinds are {sorted(NATIVE_ALLOWED)}")
        rule = aliases.get(str(given).lower().replace("_", ""), given)
        if rule not in NATIVE_ALLOWED[kind]:
            latent = hasattr(torch.optim, str(rule)) or str(rule).lower() in ("adamw", "latent")
            why = (f"a native {kind} weight has no float Parameter (only its packed codes), so the latent "
                   f"optimizer {rule!r} cannot update it; " if latent else "")
            raise ValueError(f"native.{kind}={given!r}: {why}choose one of {NATIVE_ALLOWED[kind]}")
        routes[kind] = rule
    return routes


def route(model: nn.Module, cfg_native: Mapping | None = None) -> dict[str, list[tuple[str, Any]]]:
    """``part -> [(name, target)]``: native layers, latent weights and other Parameters of ``model``
    (targets are layers for native parts, Parameters otherwise); each weight once."""
    routes = _native_routes(cfg_native)
    out: dict[str, list[tuple[str, Any]]] = {p: [] for p in PARTS}
    seen: set[int] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, NativeWeightMixin) or id(mod) in seen:
            continue
        if mod.is_native:
            seen.add(id(mod))
            out[PART_OF_RULE[routes[mod.precision.weight.kind]]].append((name, mod))
        elif (w := getattr(mod, "weight", None)) is not None and w.requires_grad and id(w) not in seen \
                and mod.precision.weight is not None:
            seen.add(id(w))
            out["latent"].append((f"{name}.weight" if name else "weight", w))
    for name, p in model.named_parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            out["other"].append((name, p))
    return out


def build_optimizer(model: nn.Module, cfg: Mapping | None = None) -> MixedOptimizer:
    """One :class:`MixedOptimizer` for ``model`` (routing in the module doc).

    ``cfg`` (dict or DictConfig; keys documented in ``configs/optim/adamw.yaml``): shared ``lr``,
    ``betas``, ``eps``, ``weight_decay``, ``seed``; per-part keyword arguments under ``latent``,
    ``other`` (each may name its optimizer: ``name: AdamW``), ``bop``, ``ternary``, ``sr``;
    ``native`` maps a weight kind (binary/ternary/float/int) to its rule (bop, ternary_bop,
    sr_adamw); ``in_backward: true`` updates native layers inside backward
    (:func:`optim.attach_in_backward`); ``schedule`` is read by :func:`optim.build_scheduler`.
    Unknown keys and latent optimizers named for native weights raise ``ValueError``."""
    cfg = plain(cfg) or {}
    unknown = set(cfg) - set(CONFIG_KEYS)
    if unknown:
        raise ValueError(f"unknown optimizer config key(s) {sorted(unknown)}; valid: {list(CONFIG_KEYS)}")
    shared = {k: cfg[k] for k in SHARED_KEYS if k in cfg}
    shared.setdefault("lr", 1e-3)
    shared.setdefault("weight_decay", 0.0)
    seed = shared.get("seed", 0)
    targets = route(model, cfg.get("native"))
    parts: dict[str, torch.optim.Optimizer] = {}
    names: dict[str, list[str]] = {}
    for part in PARTS:
        members = targets[part]
        if not members:
            continue
        own = dict(cfg.get(part) or {})
        if part in ("latent", "other"):
            cls = _optimizer_class(part, own.pop("name", "AdamW"))
        else:
            if "name" in own:
                raise ValueError(f"{part}.name: the rule of native weights is chosen by native.<kind>, not here")
            cls = {"bop": Bop, "ternary": TernaryBop, "sr": SRAdamW}[part]
        kw = _kwargs(part, cls, {**shared, "seed": seed + 1_000_003 * PARTS.index(part)}, own)
        wd = kw.pop("weight_decay", None)
        items = [t for _, t in members]
        if part == "other" and wd is not None:
            # conventional: decay matrices (and embeddings), never norms, biases or scales
            groups = [{"params": [t for t in items if t.dim() >= 2], "weight_decay": wd, "route": part},
                      {"params": [t for t in items if t.dim() < 2], "weight_decay": 0.0, "route": part}]
            groups = [g for g in groups if g["params"]]
        else:
            groups = [{"params": items, "route": part, **({} if wd is None else {"weight_decay": wd})}]
        if part in ("latent", "other") and _fusable(cls, items, kw):
            kw["fused"] = True
        try:
            parts[part] = cls(groups, **kw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"optimizer part {part!r} ({cls.__name__}): {e}") from e
        names[part] = [n for n, _ in members]
    opt = MixedOptimizer(parts, names)
    opt.in_backward = None
    if cfg.get("in_backward"):
        from .in_backward import attach_in_backward

        opt.in_backward = attach_in_backward(model, opt)  # the handle: .remove() detaches
    return opt


__all__ = ["DEFAULT_NATIVE", "NATIVE_RULES", "PARTS", "MixedOptimizer", "build_optimizer", "plain", "route"]
