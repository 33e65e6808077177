"""Number formats: what a value may be once quantized, and how its scale is chosen.

A :class:`Format` is a frozen description; the arithmetic lives in :mod:`lowprec.scaling` (scales
and rounding) and :mod:`lowprec.qtensor` (packed storage).
Every format quantizes a tensor ``x`` in *scale groups* (the whole tensor, one row, or one
block of ``block`` consecutive elements along the last dimension)::

    s      = scale_rule(x_group)                    # one scale per group (fp32, E8M0 or E4M3)
    code_i = round(x_i / s) in the element grid     # nearest-even or stochastic, saturating
    x_i   ~= code_i * s

Scale rules (``Format.scale``):

- ``none``    s = 1: a plain cast (fp32, bf16, fp16, or an unscaled fp8/fp4 cast).
- ``absmax``  s = amax(|x|) / max_value, so the largest magnitude lands on the largest code
              (FP8/FP4 per-tensor/row/block, int8 symmetric absmax).
- ``absmean`` s = max(mean(|x|), 1e-5): BitNet b1.58 ternary and XNOR-Net binary.
- ``e8m0``    OCP Microscaling v1.0: s = 2^(floor(log2 amax) - emax_elem), stored as an 8-bit
              biased exponent (bias 127, code 255 = NaN); emax_elem = 8 for E4M3, 2 for E2M1.
- ``nvfp4``   two levels: s_global = amax(tensor) / (448 * 6) in fp32, and per 16-element block
              s_block = E4M3(amax(block) / 6 / s_global); the element scale is s_block * s_global.

Element grids (``Format.kind``): ``float`` (a minifloat with ``exp_bits``/``man_bits``, IEEE-like
subnormals, no inf; saturates at ``max_value``), ``int`` (symmetric integers in
[-max_value, max_value]), ``ternary`` ({-1, 0, +1}) and ``binary`` ({-1, +1}; 0 maps to +1).

Non-finite input: a NaN or inf anywhere in a scale group makes that group's scale NaN, so every
element of the group dequantizes to NaN (a NaN never becomes a finite code silently). Unscaled
float formats keep NaN and +-inf elementwise and saturate finite values at ``max_value``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass

import torch

KINDS = ("float", "int", "ternary", "binary")
SCALE_RULES = ("none", "absmax", "absmean", "e8m0", "nvfp4")
GRANULARITIES = ("tensor", "row", "block")

# torch dtypes whose own cast *is* a float grid's nearest-even rounding: (exp_bits, man_bits) -> dtype
_TORCH_FLOAT_GRIDS = {
    (4, 3): torch.float8_e4m3fn,
    (5, 2): torch.float8_e5m2,
    (5, 10): torch.float16,
    (8, 7): torch.bfloat16,
}
_KEYS: dict[tuple, int] = {}  # a format's fields -> its number (``Format.__eq__``)
_NUMBERS = itertools.count()  # (a number taken from it is never taken again, whichever thread asks)


@dataclass(frozen=True)
class Format:
    """A number format.

    name: registry name. kind: element grid (see module doc). bits: bits per stored element.
    exp_bits/man_bits: for ``kind="float"``. max_value: largest finite element magnitude (in the
    element grid, before scaling). scale: scale rule. granularity: which elements share a scale.
    block: block length along the last dimension when ``granularity="block"``.
    scale_bits: bits of one stored scale.

    Derived at construction: ``is_scaled`` (a scale rule other than ``none``); ``torch_dtype``, the
    torch dtype whose own cast is this grid's nearest-even rounding (fp32, bf16, fp16, E4M3, E5M2) or
    None; ``fp8_codes``, that dtype where it is E4M3 or E5M2 with its full range and the format is
    absmax-scaled per tensor or per row (its codes are that dtype's), else None; ``e2m1_codes``, whether
    the format is FP4 E2M1 (largest value 6) absmax-scaled per tensor or per row.
    """

    name: str
    kind: str
    bits: int
    max_value: float
    scale: str = "none"
    granularity: str = "tensor"
    block: int | None = None
    exp_bits: int = 0
    man_bits: int = 0
    scale_bits: int = 0

    def __post_init__(self):
        def bad(msg):
            raise ValueError(f"format {self.name!r}: {msg}")

        if self.kind not in KINDS:
            bad(f"unknown kind {self.kind!r}; choose one of {KINDS}")
        if self.scale not in SCALE_RULES:
            bad(f"unknown scale rule {self.scale!r}; choose one of {SCALE_RULES}")
        if self.granularity not in GRANULARITIES:
            bad(f"unknown granularity {self.granularity!r}; choose one of {GRANULARITIES}")
        if self.granularity == "block":
            if not isinstance(self.block, int) or self.block < 1:
                bad(f"granularity 'block' needs a positive integer block, got {self.block!r}")
        elif self.block is not None:
            bad(f"block={self.block} given with granularity {self.granularity!r}; use granularity='block'")
        if self.scale in ("e8m0", "nvfp4") and self.granularity != "block":
            bad(f"scale rule {self.scale!r} is defined per block, not per {self.granularity}")
        if self.scale == "e8m0" and self.block != 32:
            bad(f"OCP MX v1.0 blocks are 32 elements, got {self.block}")
        if self.scale == "nvfp4" and self.block != 16:
            bad(f"NVFP4 blocks are 16 elements, got {self.block}")
        if self.kind == "float" and self.bits != 1 + self.exp_bits + self.man_bits:
            bad("bits must equal 1 + exp_bits + man_bits")
        if self.scale == "none" and (self.kind in ("ternary", "binary", "int") or self.bits < 8):
            bad(f"a {self.kind} {self.bits}-bit format needs a scale rule (its codes cannot hold NaN)")
        # facts derived from the fields, set once here: the layers read them at every call, and under
        # torch.compile an attribute read is one traced instruction where the expression is dozens
        derived = object.__setattr__
        derived(self, "_key", _KEYS.setdefault(dataclasses.astuple(self), next(_NUMBERS)))
        derived(self, "is_scaled", self.scale != "none")
        dt = None
        if self.kind == "float":
            dt = torch.float32 if self.bits == 32 else _TORCH_FLOAT_GRIDS.get((self.exp_bits, self.man_bits))
        derived(self, "torch_dtype", dt)
        absmax = self.kind == "float" and self.scale == "absmax" and self.granularity in ("tensor", "row")
        derived(self, "fp8_codes", dt if absmax and dt in (torch.float8_e4m3fn, torch.float8_e5m2)
                and self.max_value == torch.finfo(dt).max else None)
        derived(self, "e2m1_codes", absmax and (self.exp_bits, self.man_bits) == (2, 1) and self.max_value == 6.0)

    def __eq__(self, other) -> bool:
        # the same fields (as the generated comparison), by their number: one comparison instead of ten
        return self is other or (type(other) is Format and self._key == other._key)

    def __hash__(self) -> int:
        return hash(self._key)

    def __reduce__(self):  # a copy or an unpickled format is built anew: its derived facts are this process's
        return (Format, tuple(getattr(self, f.name) for f in dataclasses.fields(self)))

    def __setstate__(self, state: dict) -> None:
        # a format pickled as its fields' values (by an earlier release: a checkpoint's QTensors): derive the rest
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, state[f.name])
        self.__post_init__()

    # ---- derived numbers ---------------------------------------------------------------
    @property
    def effective_bits(self) -> float:
        """Bits per element including block scales (per-tensor/row scales count as 0 here;
        ``QTensor.nbytes`` gives the exact figure for a given shape)."""
        if self.granularity == "block" and self.scale != "none":
            return self.bits + self.scale_bits / self.block
        return float(self.bits)

    @property
    def bias(self) -> int:
        """Exponent bias of a float element grid (IEEE convention: 2^(e-1) - 1)."""
        return (1 << (self.exp_bits - 1)) - 1 if self.kind == "float" else 0

    @property
    def min_normal_exp(self) -> int:
        """Exponent of the smallest normal number; subnormals share its quantum."""
        return 1 - self.bias

    @property
    def max_exp(self) -> int:
        """Exponent of the largest normal number (emax_elem in the OCP MX spec)."""
        return math.floor(math.log2(self.max_value))

    @property
    def has_inf(self) -> bool:
        """IEEE-style infinities exist for fp32/bf16/fp16/E5M2, not for E4M3 (fn) or E2M1."""
        return self.kind == "float" and self.exp_bits >= 5

    @property
    def has_nan(self) -> bool:
        """E2M1 has no NaN code: NaN there is carried by the (NaN) scale of its group."""
        return self.kind == "float" and self.bits >= 8

    def with_scaling(self, granularity: str, block: int | None = None) -> "Format":
        """The same element grid with another scale granularity, e.g. per-row fp8."""
        return dataclasses.replace(self, granularity=granularity, block=block)

    def __str__(self) -> str:
        g = self.granularity if self.granularity != "block" else f"block{self.block}"
        return self.name if not self.is_scaled else f"{self.name}[{self.scale}/{g}]"


FORMATS: dict[str, Format] = {
    f.name: f
    for f in (
        Format("fp32", "float", 32, 3.4028234663852886e38, exp_bits=8, man_bits=23),
        Format("bf16", "float", 16, 3.3895313892515355e38, exp_bits=8, man_bits=7),
        Format("fp16", "float", 16, 65504.0, exp_bits=5, man_bits=10),
        Format("fp8_e4m3", "float", 8, 448.0, "absmax", exp_bits=4, man_bits=3, scale_bits=32),
        Format("fp8_e5m2", "float", 8, 57344.0, "absmax", exp_bits=5, man_bits=2, scale_bits=32),
        Format("fp4_e2m1", "float", 4, 6.0, "absmax", exp_bits=2, man_bits=1, scale_bits=32),
        Format("mxfp8", "float", 8, 448.0, "e8m0", "block", 32, exp_bits=4, man_bits=3, scale_bits=8),
        Format("mxfp4", "float", 4, 6.0, "e8m0", "block", 32, exp_bits=2, man_bits=1, scale_bits=8),
        Format("nvfp4", "float", 4, 6.0, "nvfp4", "block", 16, exp_bits=2, man_bits=1, scale_bits=8),
        Format("int8", "int", 8, 127.0, "absmax", scale_bits=32),
        Format("ternary", "ternary", 2, 1.0, "absmean", scale_bits=32),
        Format("binary", "binary", 1, 1.0, "absmean", scale_bits=32),
    )
}


def format(name: "str | Format", **overrides) -> Format:  # noqa: A001 - the public contract's name
    """The format called ``name`` (see ``FORMATS``), optionally with fields replaced.

    >>> format("fp8_e4m3", granularity="row")          # per-row (per-token) scales
    >>> format("fp8_e4m3", granularity="block", block=128)
    """
    if isinstance(name, Format):
        fmt = name
    else:
        try:
            fmt = FORMATS[name]
        except (KeyError, TypeError):
            raise ValueError(f"unknown format {name!r}; choose one of {', '.join(FORMATS)}") from None
    if overrides:
        unknown = set(overrides) - {f.name for f in dataclasses.fields(Format)}
        if unknown:
            raise ValueError(f"unknown Format field(s) {sorted(unknown)} for {fmt.name!r}")
        if "granularity" in overrides and overrides["granularity"] != "block" and "block" not in overrides:
            overrides["block"] = None
        fmt = dataclasses.replace(fmt, **overrides)
    return fmt
