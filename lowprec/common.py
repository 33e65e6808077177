"""Small helpers that lowprec and the packages built on it share: argument checks, configs as
plain Python containers, byte counts in reports. One definition each, imported where needed."""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

__all__ = ["check_real", "plain", "human_bytes", "to_dtype", "eager_division"]


def check_real(name: str, value: Any, valid: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite real (not a bool) satisfying ``ok``; else
    ``ValueError`` naming ``name``, the value and the rule ``valid``."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not ok(float(value)):
        raise ValueError(f"{name}={value!r} is invalid; {name} must be a finite number {valid}")
    return float(value)


def plain(value: Any) -> Any:
    """OmegaConf containers -> plain dicts/lists (interpolations resolved), recursively; other
    values as they are."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
    except ImportError:  # OmegaConf comes with the [train] extra; dict-built configs need none
        DictConfig = ListConfig = ()  # noqa: N806
    if DictConfig and isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value


def human_bytes(n: float) -> str:
    """``n`` bytes in binary units: ``512 B``, ``1.50 KiB``, ... up to TiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"


def to_dtype(t, dtype):
    """``t`` in ``dtype``; ``t`` itself, with no operation, where it already is.

    For the tensors an ``autograd.Function``'s forward returns. ``t.to(dtype)`` would return ``t``
    as well, but as a second operation with the same result: torch 2.11 compiles a forward into
    a graph that returns every intermediate besides the outputs, so that tensor is returned twice,
    and autograd gives its gradient to the second place: backward receives zeros for the output,
    and nothing before the function gets a gradient."""
    return t if t.dtype == dtype else t.to(dtype)


def eager_division() -> dict:
    """The ``torch.compile`` option that makes a compiled fp32 division round as eager's does (inductor's
    Triton code otherwise multiplies by the reciprocal, which can differ in the last bit): a scaled
    operand's ``x / scale`` then gives the codes eager's quantization gives. Its name differs between
    torch releases; {} where it is absent."""
    import torch._inductor.config as config

    if hasattr(getattr(config, "eager_numerics", None), "division_rounding"):
        return {"eager_numerics.division_rounding": True}
    if hasattr(config, "emulate_divison_rounding"):  # the option's spelling in earlier releases
        return {"emulate_divison_rounding": True}
    return {}
