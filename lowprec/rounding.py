"""Rounding onto an element grid: nearest (ties to even) and stochastic (unbiased).

All functions take and return float32 tensors holding values *in the element domain*
(already divided by their scale) and never pack anything.

Float grids. For a minifloat with ``m`` mantissa bits and smallest normal exponent ``e_min``,
the spacing (quantum) of representable values around ``a = |v|`` is::

    e = max(floor(log2 a), e_min)        q = 2^(e - m)

so ``a / q`` is exact in fp32 and rounding ``a`` to the grid is rounding ``a / q`` to an integer:
``round_half_even(a / q) * q`` (nearest) or ``floor(a / q + u) * q`` with ``u ~ U[0, 1)``
(stochastic; ``E[floor(r + u)] = r``, so the result is unbiased for every value inside the range).
Values beyond ``max_value`` saturate to it (finite input never becomes inf or NaN).

Integer-like grids (int8, ternary, binary) round ``v`` to integers in ``[-max, max]`` the same way;
stochastic rounding first clamps to the range so that ``E[q] = clamp(v)``.
"""

from __future__ import annotations

import torch

from .formats import Format

ROUNDINGS = ("nearest", "stochastic")


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; choose one of {ROUNDINGS}")


def uniform_like(v: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """U[0, 1) noise shaped like ``v``, from ``generator`` (reproducible) or the global RNG."""
    return torch.rand(v.shape, generator=generator, device=v.device, dtype=torch.float32)


_M32 = 0xFFFFFFFF


def _mul32_(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x <- (x * c) mod 2^32`` in place, for int64 ``x`` in ``[0, 2^32)`` and a constant
    ``c < 2^32``: in two 16-bit halves of ``c``, so that no int64 product overflows (each stays
    below ``2^48``)."""
    high = ((x * (c >> 16)) & 0xFFFF) << 16
    return x.mul_(c & 0xFFFF).add_(high).bitwise_and_(_M32)


def _mix32_(x: torch.Tensor) -> torch.Tensor:
    """``x <- h(x)`` in place: a bijection of ``[0, 2^32)`` whose every output bit depends on every
    input bit (xor-shifts and odd multiplies with the constants of C. Wellons' ``lowbias32``), in
    int64 arithmetic."""
    x.bitwise_xor_(x >> 16)
    _mul32_(x, 0x7FEB352D)
    x.bitwise_xor_(x >> 15)
    _mul32_(x, 0x846CA68B)
    return x.bitwise_xor_(x >> 16)


def counter_uniform(shape, key: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """U[0, 1) fp32 noise of ``shape``, a function of its arguments only: element ``i`` (row-major)
    is ``(h(i xor b) >> 8) 2^-24``, a 24-bit fraction, where ``h`` is :func:`_mix32_` and the
    32-bit word ``b`` mixes ``key`` (a 0-d int64 tensor, up to 63 bits) and ``counter`` (a 0-d
    int64 tensor; its low 32 bits count). Unlike a generator it has no state to seed or advance: a
    compiled graph computes it inside the kernel that uses it, and a CUDA graph that advances
    ``counter`` in place draws new noise at every replay. Within one call no two elements below
    ``2^32`` share their hash (``h`` is a bijection); different ``(key, counter)`` give unrelated
    streams."""
    base = key.bitwise_and(_M32).bitwise_xor_(
        _mix32_(key.bitwise_right_shift(32).bitwise_xor_(_mix32_(counter.bitwise_and(_M32)))))
    _mix32_(base)
    n = 1
    for d in shape:
        n *= d
    i = torch.arange(n, device=key.device, dtype=torch.int64)
    if n > 1 << 32:  # the high word of the index, folded in before the hash (static: the shape's)
        i = (i & _M32).bitwise_xor_(_mix32_(i >> 32))
    x = _mix32_(i.bitwise_xor_(base))
    return (x >> 8).to(torch.float32).mul_(2.0**-24).reshape(shape)


def round_float_grid(v: torch.Tensor, fmt: Format, rounding: str, generator=None, noise=None) -> torch.Tensor:
    """Round float32 ``v`` onto ``fmt``'s minifloat grid, saturating at ``fmt.max_value``.

    NaN stays NaN and +-inf stays +-inf; every finite input gives a finite output.
    With ``rounding="nearest"`` this is bit-identical to ``v.clamp(-max, max).to(dtype)`` for
    the formats torch has a dtype for (tested exhaustively). Stochastic rounding draws its U[0, 1)
    noise from ``generator``, or takes it as ``noise`` (shaped like ``v``: the same draws give the
    same result, and a compiled caller can draw them outside its graph)."""
    if fmt.bits == 32:
        return v
    mx = fmt.max_value
    finite = torch.isfinite(v)
    a = torch.where(finite, v.abs().clamp(max=mx), v.abs())
    if v.dtype == torch.float32 and fmt.min_normal_exp - fmt.man_bits >= -126:
        # on the bits: floor(log2 a) is a's biased exponent field - 127 (an fp32 subnormal's, -127,
        # is below every e_min here), and 2^(e - m) and its reciprocal are the fp32 numbers with
        # those exponents: a few integer operations instead of frexp, ldexp and a division
        e = ((a.view(torch.int32) >> 23) - 127).clamp(min=fmt.min_normal_exp) - fmt.man_bits
        quantum = ((e + 127) << 23).view(torch.float32)
        r = a * ((127 - e) << 23).view(torch.float32)  # a / quantum, exact: a power of 2
    else:  # another dtype, or a quantum below fp32's normal range (bf16's subnormals), which no exponent field writes
        _, exp = torch.frexp(a)  # a = mant * 2^exp with mant in [0.5, 1): floor(log2 a) = exp - 1
        e = (exp - 1).clamp(min=fmt.min_normal_exp)
        quantum = torch.ldexp(torch.ones_like(a), e - fmt.man_bits)
        r = a / quantum
    if rounding == "nearest":
        r = torch.round(r)  # ties to even
    else:
        r = torch.floor(r + (uniform_like(r, generator) if noise is None else noise))
    out = (r * quantum).clamp(max=mx)
    out = torch.where(finite, out, a)
    return torch.copysign(out, v)


def round_int_grid(v: torch.Tensor, max_int: float, rounding: str, generator=None) -> torch.Tensor:
    """Round float32 ``v`` to integers in ``[-max_int, max_int]`` (ties to even / stochastic)."""
    v = v.clamp(-max_int, max_int)
    if rounding == "nearest":
        return torch.round(v)
    return torch.floor(v + uniform_like(v, generator)).clamp(-max_int, max_int)


def round_binary(v: torch.Tensor, rounding: str, generator=None) -> torch.Tensor:
    """Map ``v`` (in units of the scale) to {-1, +1}.

    nearest: sign(v) with sign(0) = +1 (also for -0.0). stochastic: +1 with probability
    clamp((v + 1) / 2, 0, 1), so ``E[q] = clamp(v, -1, 1)``."""
    if rounding == "nearest":
        return torch.where(v >= 0, 1.0, -1.0).to(torch.float32)
    p_plus = ((v + 1) * 0.5).clamp(0, 1)
    return torch.where(uniform_like(v, generator) < p_plus, 1.0, -1.0).to(torch.float32)


def round_to_grid(v: torch.Tensor, fmt: Format, rounding: str, generator=None) -> torch.Tensor:
    """Round element-domain values ``v`` to ``fmt``'s element grid (float32 out)."""
    if fmt.kind == "float":
        if rounding == "nearest" and (dt := fmt.torch_dtype) is not None and fmt.bits < 32:
            # torch's cast is the reference; clamping first makes it saturate like the spec.
            finite = torch.isfinite(v)
            out = torch.where(finite, v.clamp(-fmt.max_value, fmt.max_value), v).to(dt).to(torch.float32)
        else:
            out = round_float_grid(v, fmt, rounding, generator)
        if not fmt.has_inf:  # E4M3 (fn) has no infinity: +-inf becomes its NaN code, in both roundings
            out = torch.where(torch.isinf(v), float("nan"), out)
        return out
    if fmt.kind == "int":
        return round_int_grid(v, fmt.max_value, rounding, generator)
    if fmt.kind == "ternary":
        return round_int_grid(v, 1.0, rounding, generator)
    return round_binary(v, rounding, generator)
