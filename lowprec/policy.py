"""Per-layer precision policies: ordered glob rules over module names, applied to a model.

A policy is a default plus an ordered list of rules (YAML, as in ``configs/precision/``)::

    name: paper
    default: {weight: bf16, input: bf16, grad: bf16}
    rules:
      - {match: "blocks.*.attn.*", weight: fp8_e4m3, input: fp8_e4m3, grad: fp8_e5m2}
      - {match: ["blocks.*.ffn.*", head], weight: {format: fp4_e2m1, granularity: row}}
    override: {match: "blocks.0.ffn.*", weight: ternary}    # optional: rule(s) appended last

The precision of the module called ``name`` is a left fold over the rules that match it, as in
nvidia-modelopt's ``quant_cfg``::

    p = LayerPrecision.from_fields(default, base=FULL_PRECISION)
    for rule in rules + override:                       # in order
        if any(fnmatchcase(name, glob) for glob in rule.match):
            p = LayerPrecision.from_fields(rule.fields, base=p)

so a later rule overrides an earlier one *field by field*, and the fields a rule does not name
are kept. Fields are those of :class:`~lowprec.precision.LayerPrecision` (``weight input grad
fprop dgrad wgrad storage backend scaling amax_history ste grad_rounding``).

Globs are :func:`fnmatch.fnmatchcase` patterns matched against the whole dotted name: ``*``
matches any run of characters *including dots* (``blocks.*.ffn.*`` matches ``blocks.12.ffn.up``;
``blocks.1*`` matches blocks 1, 10-19 and 100-199), ``?`` one character, ``[0-3]`` one character
of a set. ``match`` may be one glob or a list (the rule applies where any of them matches).

Errors surface at load time: every rule is checked when the policy is built (unknown fields,
format names or choices raise ``ValueError`` naming the rule, e.g. ``rules[2] (match
'blocks.*.ffn.*')``). A combination that only two rules together make invalid (say ``storage:
native`` where no rule gave a weight format) is caught by :meth:`PrecisionPolicy.resolve`, which
names the module and the rule.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from .common import human_bytes as _human_bytes, plain as _plain
from .formats import FORMATS
from .precision import FULL_PRECISION, LayerPrecision
from .qtensor import predicted_nbytes

TOP_KEYS = ("name", "default", "rules", "override")

# Base on which a rule is checked alone: a binary weight satisfies every invariant that
# LayerPrecision ties to "some weight format exists" (native storage, sign pseudo-gradients),
# so only the rule's own values (names, choices, and conflicts inside the rule) can fail.
_RULE_CHECK_BASE = LayerPrecision(weight=FORMATS["binary"])


@dataclass(frozen=True)
class PolicyRule:
    """One rule: globs over module names (``match``) and the precision fields it sets.

    ``source`` says where it came from (``rules[2]``, ``override[0]``) for messages."""

    match: tuple[str, ...]
    fields: Mapping[str, Any] = field(default_factory=dict)
    source: str = "rule"

    def matches(self, name: str) -> bool:
        return any(fnmatchcase(name, glob) for glob in self.match)

    def __str__(self) -> str:
        m = self.match[0] if len(self.match) == 1 else list(self.match)
        return f"{self.source} (match {m!r})"

    def to_config(self) -> dict:
        return {"match": self.match[0] if len(self.match) == 1 else list(self.match), **self.fields}

    @classmethod
    def from_config(cls, cfg: Any, source: str) -> "PolicyRule":
        """``{match: <glob or list of globs>, <LayerPrecision fields>...}`` -> rule."""
        cfg = _plain(cfg)
        if not isinstance(cfg, Mapping):
            raise ValueError(f"{source}: a rule is a mapping {{match: <glob or list of globs>, <fields>}}, "
                             f"got {cfg!r}")
        fields = dict(cfg)
        if "match" not in fields:
            raise ValueError(f"{source} has no 'match'; a rule is {{match: <glob or list of globs>, <fields>}}, "
                             f"this one has keys {sorted(fields)}")
        match = fields.pop("match")
        globs = [match] if isinstance(match, str) else match
        if not isinstance(globs, list) or not globs or not all(isinstance(g, str) and g for g in globs):
            raise ValueError(f"{source}: 'match' must be a glob or a non-empty list of globs "
                             f"(non-empty strings), got {match!r}")
        return cls(tuple(globs), fields, source)


class PrecisionPolicy:
    """An ordered list of :class:`PolicyRule` over a default (see the module doc).

    default: LayerPrecision fields applied over ``FULL_PRECISION`` to every module.
    rules: rules (or their mappings ``{match, ...fields}``), later overriding earlier.
    name: optional, for reports and messages.
    """

    def __init__(self, default: Mapping[str, Any] | None = None, rules: Sequence[Any] = (),
                 *, name: str | None = None):
        self.name = name
        default = _plain(default or {})
        if not isinstance(default, Mapping):
            raise ValueError(f"{self._where()}: 'default' must be a mapping of precision fields, got {default!r}")
        self.default = dict(default)
        try:
            self.rules: tuple[PolicyRule, ...] = tuple(
                r if isinstance(r, PolicyRule) else PolicyRule.from_config(r, f"rules[{i}]") for i, r in enumerate(rules))
        except ValueError as e:
            raise ValueError(f"{self._where()}: {e}") from None
        try:
            self._default = LayerPrecision.from_fields(self.default, base=FULL_PRECISION)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{self._where()}: default {self.default!r}: {e}") from None
        for rule in self.rules:
            try:  # eager: a bad value fails at load time, not at the first module it matches
                LayerPrecision.from_fields(rule.fields, base=_RULE_CHECK_BASE)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self._where()}: {rule}: {e}") from None

    def _where(self) -> str:
        return f"precision policy {self.name!r}" if self.name else "precision policy"

    @classmethod
    def from_config(cls, cfg: Any) -> "PrecisionPolicy":
        """From a mapping or DictConfig with keys ``name``, ``default``, ``rules`` and
        ``override`` (one rule or a list of rules appended after ``rules``: the way to change one
        rule from the command line). Unknown keys raise ``ValueError``."""
        cfg = _plain(cfg)
        if isinstance(cfg, PrecisionPolicy):
            return cfg
        if not isinstance(cfg, Mapping):
            raise ValueError(f"a precision policy is a mapping with keys {TOP_KEYS}, got {cfg!r}")
        name = cfg.get("name")
        where = f"precision policy {name!r}" if name else "precision policy"
        unknown = sorted(set(cfg) - set(TOP_KEYS))
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {list(TOP_KEYS)}")
        rules = cfg.get("rules") or []
        override = cfg.get("override")
        if not isinstance(rules, list):
            raise ValueError(f"{where}: 'rules' must be a list of rules, got {rules!r}")
        try:
            parsed = [PolicyRule.from_config(r, f"rules[{i}]") for i, r in enumerate(rules)]
            if isinstance(override, Mapping):
                parsed.append(PolicyRule.from_config(override, "override"))
            elif isinstance(override, list):
                parsed += [PolicyRule.from_config(r, f"override[{i}]") for i, r in enumerate(override)]
            elif override is not None:
                raise ValueError(f"'override' must be a rule or a list of rules, got {override!r}")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
        return cls(cfg.get("default"), parsed, name=name)

    def to_config(self) -> dict:
        """Plain mapping that :meth:`from_config` reads back (overrides folded into ``rules``)."""
        return {"name": self.name, "default": dict(self.default), "rules": [r.to_config() for r in self.rules]}

    def matching(self, name: str) -> tuple[PolicyRule, ...]:
        """The rules that match ``name``, in the order they are applied."""
        return tuple(r for r in self.rules if r.matches(name))

    def resolve(self, name: str) -> LayerPrecision:
        """The LayerPrecision of module ``name``: the default, then each matching rule in order."""
        p = self._default
        for rule in self.matching(name):
            try:
                p = LayerPrecision.from_fields(rule.fields, base=p)
            except (ValueError, TypeError) as e:
                raise ValueError(f"{self._where()}: module {name!r}: {rule} on top of the rules "
                                 f"before it: {e}") from None
        return p

    def unmatched(self, names: Sequence[str]) -> tuple[PolicyRule, ...]:
        """Rules that match none of ``names`` (likely a typo in a glob)."""
        return tuple(r for r in self.rules if not any(r.matches(n) for n in names))

    def __repr__(self) -> str:
        return f"PrecisionPolicy(name={self.name!r}, default={self.default!r}, rules={len(self.rules)})"


# ---- applying a policy to a model ---------------------------------------------------------------

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass(frozen=True)
class LayerReport:
    """One row of a :class:`PolicyReport`: a Linear or Embedding after the policy was applied.

    weight/input/grad: formats as text (``-`` = not quantized; a layer left in full precision
    shows its weight dtype). storage: ``latent``/``native``, or ``float`` for an unswapped layer.
    bits_per_weight: bits per weight element in its format, every scale included (exact:
    ``8 * predicted_nbytes(shape, fmt) / numel``). format_bytes: weight in its format (scales
    included) + bias. resident_bytes: what the module holds between steps, weight storage + bias
    (``QLinear.resident_bytes()``: the float master when latent, the packed weight when native).
    params: weight + bias elements."""

    name: str
    kind: str
    weight: str
    input: str
    grad: str
    storage: str
    backend: str
    bits_per_weight: float
    format_bytes: int
    resident_bytes: int
    params: int


@dataclass
class PolicyReport:
    """What :func:`apply_policy` did: one :class:`LayerReport` per Linear/Embedding (in
    ``named_modules`` order), totals over those layers (norms and other parameters are not
    counted), and the rules that matched none of them. ``bf16_bytes`` = 2 bytes per parameter of
    the same layers, for comparison."""

    policy: str | None
    layers: list[LayerReport]
    unmatched_rules: list[PolicyRule] = field(default_factory=list)

    COLUMNS = ("name", "kind", "weight", "input", "grad", "storage", "backend", "bits_per_weight",
               "format_bytes", "resident_bytes", "params")

    @property
    def total_params(self) -> int:
        return sum(r.params for r in self.layers)

    @property
    def total_format_bytes(self) -> int:
        return sum(r.format_bytes for r in self.layers)

    @property
    def total_resident_bytes(self) -> int:
        return sum(r.resident_bytes for r in self.layers)

    @property
    def bf16_bytes(self) -> int:
        return 2 * self.total_params

    def refreshed(self, model: nn.Module) -> "PolicyReport":
        """This report with its ``backend`` column re-read from ``model``'s layers. The column is
        filled when the policy is applied, usually before the model moves to its device and before
        ``auto`` has seen a token count; after the first step it says how the GEMMs really ran.
        Layers no longer found under their name keep their row."""
        mods = dict(model.named_modules())
        rows = [replace(r, backend=mods[r.name].backend_note())
                if hasattr(mods.get(r.name), "backend_note") else r for r in self.layers]
        return PolicyReport(self.policy, rows, list(self.unmatched_rules))

    def unquantized_gemms(self, model: nn.Module) -> list[str]:
        """Names of ``model``'s quantized Linear layers whose GEMMs run in plain bf16 without their
        formats (backend ``unquantized``, an explicit choice): their formats shape neither the
        forward nor the gradients. Read from each layer's plan."""
        mods = dict(model.named_modules())
        return [r.name for r in self.layers
                if getattr(mods.get(r.name), "precision", None) is not None
                and mods[r.name].precision.backend == "unquantized" and mods[r.name].precision.is_quantized]

    def to_rows(self) -> list[dict]:
        """One dict per layer, keys ``COLUMNS`` (for ``csv.DictWriter(f, PolicyReport.COLUMNS)``)."""
        return [{c: getattr(r, c) for c in self.COLUMNS} for r in self.layers]

    def __str__(self) -> str:
        head = ["layer", "kind", "weight", "input", "grad", "storage", "backend", "bits/weight",
                "bytes at format", "resident", "params"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self.layers:
            lines.append(f"| {r.name} | {r.kind} | {r.weight} | {r.input} | {r.grad} | {r.storage} | {r.backend} "
                         f"| {r.bits_per_weight:.4g} | {_human_bytes(r.format_bytes)} "
                         f"| {_human_bytes(r.resident_bytes)} | {r.params:,} |")
        n, fmt_b, res_b, bf16 = self.total_params, self.total_format_bytes, self.total_resident_bytes, self.bf16_bytes
        lines.append(f"| **total** | {len(self.layers)} layers | | | | | | {8 * fmt_b / max(n, 1):.4g} "
                     f"| {_human_bytes(fmt_b)} | {_human_bytes(res_b)} | {n:,} |")
        ratio = (lambda b: f"{b / bf16:.3f}x bf16") if bf16 else (lambda b: "-")
        lines += ["", f"policy {self.policy!r}: {n:,} parameters in {len(self.layers)} Linear/Embedding layers; "
                      f"{fmt_b:,} bytes at their formats ({ratio(fmt_b)}), {res_b:,} resident "
                      f"({ratio(res_b)}), {bf16:,} if all bf16"]
        if self.unmatched_rules:
            lines.append("rules that matched no layer: " + ", ".join(str(r) for r in self.unmatched_rules))
        return "\n".join(lines)


def _quantized(p: LayerPrecision) -> bool:
    return p.is_quantized or p.storage == "native"


def _float_weight(mod: nn.Module) -> nn.Parameter:
    """A quantized layer's weight as a float Parameter: its latent master (the same Parameter),
    or its native weight dequantized (shapes only on the meta device)."""
    if not mod.is_native:
        return mod.weight
    if mod.w_data.device.type == "meta":
        return nn.Parameter(torch.empty(mod._w_shape, device="meta"))
    return nn.Parameter(mod.native_weight.dequantize(torch.float32))


def _to_float(mod: nn.Module, kind: str) -> nn.Module:
    """A plain nn.Linear / nn.Embedding holding ``mod``'s weight (and bias): ``mod`` itself if it
    is one already, else a float layer rebuilt from a QLinear / QEmbedding."""
    if isinstance(mod, (nn.Linear, nn.Embedding)):
        return mod
    w = _float_weight(mod)
    if kind == "Linear":
        f = nn.Linear(mod.in_features, mod.out_features, bias=False, device="meta")
        f.weight, f.bias = w, mod.bias
    else:
        f = nn.Embedding(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, device="meta")
        f.weight = w
    return f


def _layer_row(name: str, kind: str, mod: nn.Module, prec: LayerPrecision) -> LayerReport:
    bias = getattr(mod, "bias", None) if kind == "Linear" else None
    bias_bytes = 0 if bias is None else bias.numel() * bias.element_size()
    bias_params = 0 if bias is None else bias.numel()
    text = lambda f: "-" if f is None else str(f)  # noqa: E731
    if isinstance(mod, (nn.Linear, nn.Embedding)):  # left in full precision
        w = mod.weight
        dtype = _DTYPE_NAMES.get(w.dtype, str(w.dtype).removeprefix("torch."))
        nbytes = w.numel() * w.element_size() + bias_bytes
        return LayerReport(name, kind, dtype, "-", "-", "float", "torch", 8.0 * w.element_size(),
                           nbytes, nbytes, w.numel() + bias_params)
    shape = mod._w_shape if mod.is_native else tuple(mod.weight.shape)
    numel = 1
    for s in shape:
        numel *= s
    wfmt = prec.weight
    w_bytes = predicted_nbytes(shape, wfmt) if wfmt is not None else numel * mod.weight.element_size()
    inp = "-" if kind == "Embedding" else text(prec.input)  # an embedding's input is token ids
    if prec.overrides:
        inp += " " + " ".join(f"{g}.{o}={text(f)}" for (g, o), f in prec.overrides)
    return LayerReport(name, kind, text(wfmt), inp, text(prec.grad), prec.storage, mod.backend_note(),
                       8.0 * w_bytes / max(numel, 1), w_bytes + bias_bytes, mod.resident_bytes(),
                       numel + bias_params)


def apply_policy(model: nn.Module, policy: PrecisionPolicy | Mapping, *, strict: bool = False) -> PolicyReport:
    """Resolve every ``nn.Linear`` / ``nn.Embedding`` of ``model`` (subclasses included) by its
    module name and, where the precision is quantized (any operand format, or native storage),
    replace it in place by ``lowprec.nn.QLinear.from_float`` / ``QEmbedding.from_float``: the same
    weight values (latent storage keeps the very same Parameter, so optimizers and tied weights
    still see it), the same bias. Returns a :class:`PolicyReport`.

    - Layers resolved to full precision stay as they are, reported by their dtype.
    - Re-applying: a QLinear / QEmbedding whose precision differs from the new one is rebuilt from
      its float weight (latent: the master; native: the packed weight dequantized, so a second
      quantization starts from the first one's values), or turned back into a plain nn.Linear /
      nn.Embedding if the new precision is full precision. One whose precision is unchanged is kept.
    - A module reachable under several names is swapped under all of them; those names must
      resolve to one precision. A weight Parameter shared by two layers (tied embeddings) cannot
      be native (packing would untie it): ``ValueError``.
    - ``nn.MultiheadAttention.out_proj`` is left alone: MultiheadAttention reads its weight
      directly instead of calling it.
    - Rules matching no Linear/Embedding name are warned about (``strict=True``: ``ValueError``):
      a typo in a glob must not pass silently.
    - Meta-device models work: nothing is read, bytes come from shapes and formats.
    """
    from .nn import QEmbedding, QLinear  # lowprec.nn builds on lowprec's core; import late

    if not isinstance(policy, PrecisionPolicy):
        policy = PrecisionPolicy.from_config(policy)
    names_of: dict[int, list[str]] = {}
    skip: set[int] = set()
    for name, mod in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(mod), []).append(name)
        if isinstance(mod, nn.MultiheadAttention):
            skip.add(id(mod.out_proj))

    def kind_of(mod):
        if id(mod) in skip:
            return None
        if isinstance(mod, (nn.Linear, QLinear)):
            return "Linear"
        return "Embedding" if isinstance(mod, (nn.Embedding, QEmbedding)) else None

    targets = [(name, mod, kind_of(mod)) for name, mod in model.named_modules() if kind_of(mod)]
    unmatched = list(policy.unmatched([n for _, mod, _ in targets for n in names_of[id(mod)]]))
    if unmatched:
        msg = f"{policy._where()}: rule(s) matching no Linear/Embedding of the model: " + ", ".join(map(str, unmatched))
        if strict:
            raise ValueError(msg)
        warnings.warn(msg, stacklevel=2)

    plan = []
    tied: dict[int, str] = {}
    for name, mod, kind in targets:
        precisions = {n: policy.resolve(n) for n in names_of[id(mod)]}
        prec = precisions[name]
        if any(p != prec for p in precisions.values()):
            raise ValueError(f"module {name!r} is shared under names {sorted(precisions)}, to which the policy "
                             "gives different precisions; give them one precision")
        w = getattr(mod, "weight", None)
        if w is not None:
            other = tied.setdefault(id(w), name)
            if other != name and (prec.storage == "native" or policy.resolve(other).storage == "native"):
                raise ValueError(f"{other!r} and {name!r} share one weight Parameter (tied); native storage "
                                 "would untie it: keep both latent")
        plan.append((name, mod, kind, prec))

    rows = []
    for name, mod, kind, prec in plan:
        new = mod
        if not (isinstance(mod, (QLinear, QEmbedding)) and mod.precision == prec):
            flt = _to_float(mod, kind)
            new = flt if not _quantized(prec) else (QLinear if kind == "Linear" else QEmbedding).from_float(flt, prec)
        if new is not mod:
            if name == "":
                raise ValueError("apply_policy swaps layers inside a model, and this model is itself a "
                                 f"{type(mod).__name__}: wrap it (e.g. nn.Sequential(layer))")
            for n in names_of[id(mod)]:
                parent, _, attr = n.rpartition(".")
                setattr(model.get_submodule(parent), attr, new)
        rows.append(_layer_row(name, kind, new, prec))
    return PolicyReport(policy.name, rows, unmatched)


__all__ = ["PrecisionPolicy", "PolicyRule", "PolicyReport", "LayerReport", "apply_policy", "TOP_KEYS"]
