"""Optimizer state in low precision: how a moment tensor is stored between steps.

Every optimizer here computes its update in fp32, *transiently*, and keeps only the stored form::

    x_fp32 = decode(stored)          # read
    x_fp32 = f(x_fp32, g)            # the optimizer's recurrence, in fp32
    stored = encode(x_fp32)          # write back, rounded stochastically

=========  ============================================================  ==================
dtype      stored form                                                   bytes / element
=========  ============================================================  ==================
``fp32``   the fp32 tensor itself (no rounding)                          4
``bf16``   bf16, stochastic rounding                                     2
``fp8``    FP8 E4M3 codes + one fp32 absmax scale per block of ``block`` 1 + 4 / block
           consecutive elements of the flattened tensor (``block=None``:
           one scale per row of the tensor), stochastic rounding
=========  ============================================================  ==================

Why stochastic rounding (SR): an exponential moving average ``m <- m + (1 - beta) (g - m)`` moves
``m`` by a fraction ``1 - beta`` per step. Rounded to nearest, any move smaller than half a grid
step of ``m`` is lost: in bf16 (8 significant bits) ``m`` freezes as soon as
``(1 - beta) |g - m| < 2^-9 |m|``, i.e. for ``1 - beta <~ 2e-3`` at once (Bop's ``gamma = 1e-4``).
With SR, ``E[encode(x)] = x`` exactly (on the fixed grid of a group), so the stored average is an
unbiased estimate of the fp32 one; the price is rounding noise of at most half a grid step per
write, which the average itself smooths.

Second moments (``v = EMA(g^2) >= 0``) in fp8 are stored as ``r = sqrt(v)`` (``sqrt=True``):
``v`` spans the *square* of the gradients' dynamic range, which one E4M3 block (amax / min
subnormal = 448 / 2^-9 ~ 2^17.8) cannot hold; ``sqrt(v)`` spans the gradients' own range, and the
Adam denominator needs exactly ``sqrt(v)``. SR makes ``E[r] = sqrt(v)`` (so ``E[r^2] >= v``, a
slight over-estimate of the denominator: conservative, never a blow-up).

Noise is drawn from a generator reseeded per (optimizer seed, target, calls) by
:class:`SeededGenerators` (``calls``: the target's updates tried, a host counter, see
:mod:`optim.base`), so a run is reproducible, independent of the order in which targets are
updated (in backward or in ``step()``), and a checkpoint needs no generator state beyond the
counters.
"""

from __future__ import annotations

import zlib

import torch

import lowprec
from lowprec.qtensor import QTensor

MOMENT_DTYPES = ("fp32", "bf16", "fp8")
FLUSH_BELOW = 2.0**-100  # fp8 moments: magnitudes below this are stored as 0
_MASK64 = (1 << 64) - 1


def check_moment_dtype(name: str, value, choices=MOMENT_DTYPES) -> str:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {choices}")
    return value


def check_block(value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"moment_block={value!r} is invalid; give a positive int (elements per fp8 scale) "
                         "or None (one scale per row)")
    return value


def fp8_moment_format(block: int | None) -> lowprec.Format:
    """E4M3 with fp32 absmax scales per ``block`` consecutive elements (None: per row)."""
    if block is None:
        return lowprec.format("fp8_e4m3", granularity="row")
    return lowprec.format("fp8_e4m3", granularity="block", block=block)


def store(state: dict, key: str, x: torch.Tensor, dtype: str, generator: torch.Generator | None, *,
          block: int | None = 128, sqrt: bool = False) -> None:
    """Write fp32 ``x`` into ``state[key]`` (and ``state[key + "_scale"]`` for fp8) in ``dtype``.

    ``sqrt=True`` stores ``sqrt(x)`` (``x >= 0``) in fp8; fp32/bf16 store ``x`` itself. fp32 is
    stored as is (``x`` becomes the state tensor, no copy; callers build ``x`` out of place, so a
    skipped step can keep the old tensor). ``generator=None`` rounds to nearest (used
    only for exact values such as zeros, so that no global random state is consumed)."""
    rounding = "nearest" if generator is None else "stochastic"
    if dtype == "fp32":
        state[key] = x.to(torch.float32)
    elif dtype == "bf16":
        state[key] = lowprec.quantize(x, "bf16", rounding=rounding, generator=generator).data
    else:
        if block is not None:  # blocks run along the flattened tensor: padding only at its very end
            x = x.reshape(-1)
        x = x.sqrt() if sqrt else x
        # A block whose amax is below ~448 x 2^-149 gets an absmax scale that underflows to 0 (and
        # NaN codes); moments of weights whose gradient stays 0 (unused embedding rows) decay there
        # geometrically. Values this small are nothing next to Adam's eps: flush them.
        x = torch.where(x.abs() < FLUSH_BELOW, 0.0, x)
        q = lowprec.quantize(x, fp8_moment_format(block), rounding=rounding, generator=generator)
        state[key], state[key + "_scale"] = q.data, q.scale


def load(state: dict, key: str, dtype: str, shape, *, block: int | None = 128, sqrt: bool = False) -> torch.Tensor:
    """The fp32 tensor of ``shape`` that :func:`store` wrote (squared back if ``sqrt``). For
    ``fp32`` this *is* the state tensor (no copy)."""
    data = state[key]
    if dtype != "fp8":
        return data.to(torch.float32).reshape(shape)
    shape = torch.Size(shape)
    logical = (shape.numel(),) if block is not None else shape
    q = QTensor(data, state[key + "_scale"], None, fp8_moment_format(block), logical, data.shape[-1])
    x = q.dequantize(torch.float32).reshape(shape)
    return x * x if sqrt else x


def store_zeros(state: dict, key: str, shape, dtype: str, device, *, block: int | None = 128) -> None:
    """Stored form of a zero tensor (exact: zero needs no rounding, so no noise is drawn)."""
    store(state, key, torch.zeros(shape, device=device), dtype, None, block=block)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def noise_seed(seed: int, salt: str, target: int, step: int) -> int:
    """A 63-bit seed that depends on every argument (splitmix64 chain; crc32 of ``salt`` so that
    it is stable across processes, unlike ``hash``)."""
    x = _splitmix64(seed & _MASK64)
    for v in (zlib.crc32(salt.encode()), target, step):
        x = _splitmix64(x ^ (v & _MASK64))
    return x >> 1


class SeededGenerators:
    """One ``torch.Generator`` per device, reseeded for each (target, step) before its draws."""

    def __init__(self, seed: int, salt: str):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed={seed!r} is invalid; give an int")
        self.seed, self.salt = seed, salt
        self._by_device: dict[str, torch.Generator] = {}

    def __call__(self, device: torch.device, target: int, step: int) -> torch.Generator:
        key = str(device)
        gen = self._by_device.get(key)
        if gen is None:
            gen = self._by_device[key] = torch.Generator(device=device)
        gen.manual_seed(noise_seed(self.seed, self.salt, target, step))
        return gen


def state_nbytes(value) -> int:
    """Bytes of the tensors in one optimizer-state entry (dicts of stored forms included); of a
    DTensor (a sharded model's state), this rank's part."""
    if isinstance(value, torch.Tensor):
        value = value.to_local() if hasattr(value, "to_local") else value
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(state_nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(state_nbytes(v) for v in value)
    return 0


__all__ = [
    "MOMENT_DTYPES",
    "SeededGenerators",
    "check_block",
    "check_moment_dtype",
    "fp8_moment_format",
    "load",
    "noise_seed",
    "state_nbytes",
    "store",
    "store_zeros",
]
