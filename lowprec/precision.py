"""LayerPrecision: the precision of one layer's three GEMMs, its weight storage and backend.

A linear layer ``y = x W^T + b`` runs three GEMMs per training step (names as in Transformer
Engine / torchao)::

    fprop : y  = input  x weight^T      operands (input, weight)
    dgrad : dx = grad   x weight        operands (grad, weight)
    wgrad : dW = grad^T x input         operands (grad, input)

``weight``, ``input`` and ``grad`` give each operand's format for all GEMMs it enters; ``fprop``,
``dgrad`` and ``wgrad`` override an operand inside one GEMM (e.g. ``wgrad: {grad: bf16}`` keeps
the weight gradient's GEMM in bf16). A format of ``None`` means "not quantized" (the compute dtype).

Defaults for activations: a bare fp8/int8/fp4 name given for ``input`` or ``grad`` is quantized
per token (one scale per row), as BitNet does for its int8 activations; write
``{format: fp8_e4m3, granularity: tensor}`` for one scale per tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from .formats import FORMATS, Format, format as get_format
from .rounding import ROUNDINGS
from .ste import STES

STORAGES = ("latent", "native")
BACKENDS = ("auto", "emulated", "tensorcore", "unquantized")
SCALINGS = ("current", "delayed")
GEMMS = {"fprop": ("input", "weight"), "dgrad": ("grad", "weight"), "wgrad": ("grad", "input")}
OPERANDS = ("weight", "input", "grad")
_UNQUANTIZED = (None, "none", "fp32")


def parse_format(spec: Any, *, per_token: bool = False) -> Format | None:
    """A format from a config value: ``None``/"none"/"fp32" (not quantized), a name, a
    :class:`Format`, or a mapping ``{format: name, <Format field>: value, ...}``.
    ``per_token`` turns a bare tensor-scaled name into per-row scales (activations)."""
    if spec in _UNQUANTIZED:
        return None
    if isinstance(spec, Format):
        return spec
    if isinstance(spec, str):
        fmt = get_format(spec)
        if per_token and fmt.is_scaled and fmt.granularity == "tensor" and fmt.kind in ("float", "int"):
            fmt = fmt.with_scaling("row")
        return fmt
    if isinstance(spec, Mapping):
        spec = dict(spec)
        if "format" not in spec:
            raise ValueError(f"a format mapping needs a 'format' key, got {sorted(spec)}")
        name = spec.pop("format")
        return get_format(name, **spec)
    raise ValueError(f"cannot read a format from {spec!r}; give a name ({', '.join(FORMATS)}) or a mapping")


@dataclass(frozen=True)
class LayerPrecision:
    """Precision of one layer (see module doc).

    weight/input/grad: operand formats (None = compute dtype). overrides: per-GEMM operand
    formats, ``((gemm, operand), Format | None)`` pairs. storage: ``latent`` (float master
    weight, quantized every forward, STE backward) or ``native`` (the weight exists only packed).
    backend: how the GEMMs run (see :mod:`lowprec.plan`): ``auto`` (the fastest kernel that
    computes these formats), ``emulated`` (quantize -> dequantize -> fp32 matmul, the reference),
    ``tensorcore`` (as auto, requiring FP8 tensor cores) or ``unquantized`` (formats NOT applied:
    plain bf16 GEMMs, an explicit choice for speed comparisons). scaling: ``current`` (scale from this tensor) or
    ``delayed`` (scale from the max of the last ``amax_history`` amaxes, per-tensor formats).
    ste: weight pseudo-gradient (latent storage). grad_rounding: rounding of gradient operands
    (the NVFP4 recipe rounds gradients stochastically).
    """

    weight: Format | None = None
    input: Format | None = None
    grad: Format | None = None
    overrides: tuple = ()
    storage: str = "latent"
    backend: str = "auto"
    scaling: str = "current"
    amax_history: int = 16
    ste: str = "identity"
    grad_rounding: str = "nearest"

    def __post_init__(self):
        def check(name, value, choices):
            if value not in choices:
                raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")

        check("storage", self.storage, STORAGES)
        check("backend", self.backend, BACKENDS)
        check("scaling", self.scaling, SCALINGS)
        check("ste", self.ste, tuple(STES))
        check("grad_rounding", self.grad_rounding, ROUNDINGS)
        if not isinstance(self.amax_history, int) or self.amax_history < 1:
            raise ValueError(f"amax_history must be a positive integer, got {self.amax_history!r}")
        for (gemm, operand), _ in self.overrides:
            if gemm not in GEMMS or operand not in GEMMS[gemm]:
                raise ValueError(f"unknown GEMM operand {gemm}.{operand}; valid: "
                                 + ", ".join(f"{g}.{o}" for g, ops in GEMMS.items() for o in ops))
        if self.storage == "native" and self.weight is None:
            raise ValueError("storage 'native' needs a weight format (the weight lives only in that format)")
        if self.ste in ("approx_sign", "swish_sign") and (self.weight is None or self.weight.kind != "binary"):
            raise ValueError(f"ste {self.ste!r} needs a binary weight format")

    def operand(self, gemm: str, operand: str) -> Format | None:
        """The format of ``operand`` inside ``gemm``, overrides applied."""
        for (g, o), fmt in self.overrides:
            if (g, o) == (gemm, operand):
                return fmt
        return getattr(self, operand)

    @property
    def is_quantized(self) -> bool:
        return any(self.operand(g, o) is not None for g, ops in GEMMS.items() for o in ops)

    def describe(self) -> str:
        """Short text: weight/input/grad formats and any overrides."""
        fmt = lambda f: "-" if f is None else str(f)  # noqa: E731
        s = f"w={fmt(self.weight)} x={fmt(self.input)} g={fmt(self.grad)}"
        for (g, o), f in self.overrides:
            s += f" {g}.{o}={fmt(f)}"
        return s

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any], base: "LayerPrecision | None" = None) -> "LayerPrecision":
        """Build from config fields (names as in the dataclass; ``fprop``/``dgrad``/``wgrad`` are
        mappings operand -> format), on top of ``base``. Unknown fields raise ``ValueError``."""
        base = base or cls()
        known = {f.name for f in dataclasses.fields(cls)} - {"overrides"} | set(GEMMS)
        unknown = set(fields) - known
        if unknown:
            raise ValueError(f"unknown precision field(s) {sorted(unknown)}; valid: {sorted(known)}")
        kw: dict[str, Any] = {}
        overrides = dict(base.overrides)
        for key, value in fields.items():
            if key in OPERANDS:
                kw[key] = parse_format(value, per_token=key != "weight")
            elif key in GEMMS:
                if not isinstance(value, Mapping):
                    raise ValueError(f"{key} must map operands {GEMMS[key]} to formats, got {value!r}")
                for operand, spec in value.items():
                    if operand not in GEMMS[key]:
                        raise ValueError(f"{key} has operands {GEMMS[key]}, not {operand!r}")
                    overrides[(key, operand)] = parse_format(spec, per_token=operand != "weight")
            else:
                kw[key] = value
        kw["overrides"] = tuple(sorted(overrides.items(), key=lambda kv: kv[0]))
        return dataclasses.replace(base, **kw)


FULL_PRECISION = LayerPrecision()

__all__ = ["LayerPrecision", "parse_format", "FULL_PRECISION", "GEMMS", "STORAGES", "BACKENDS", "SCALINGS"]
