"""Scale groups, scale rules and element rounding: the arithmetic of every format.

``x`` (any shape, floating) is viewed as ``G`` scale groups of ``N`` elements (``(G, N)``):

- ``tensor`` (and unscaled formats): G = 1, N = numel.
- ``row``: G = numel / K, N = K = x.shape[-1] (per row; for activations, per token).
- ``block``: the last dimension is zero-padded to a multiple of ``block`` (padding is cropped
  again on dequantize; zero padding changes no block's amax or the absmean of whole blocks,
  and only the last, partial block sees it), G = numel_padded / block, N = block.

For each group a scale ``s`` (fp32, shape ``(G, 1)``) is chosen by ``fmt.scale`` (see
:mod:`lowprec.formats`), then ``values = round(x / s)`` on the element grid; ``x ~= values * s``.
Inputs are computed in float32 (fp64 input is first cast to float32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .formats import Format
from .formats import format as get_format
from .rounding import check_rounding, round_to_grid

ABSMEAN_EPS = 1e-5  # BitNet b1.58's guard: scale = max(mean|W|, 1e-5)
E8M0_BIAS = 127
E8M0_NAN = 255
NVFP4_GLOBAL = 448.0 * 6.0  # E4M3 max x E2M1 max: the tensor scale maps amax onto it


@dataclass
class Groups:
    """How a tensor of logical ``shape`` is laid out as ``(G, N)`` scale groups."""

    shape: torch.Size
    padded_last: int  # last dimension after block padding (== shape[-1] without padding)
    G: int
    N: int

    def scale_shape(self, fmt: Format) -> tuple[int, ...]:
        lead = tuple(self.shape[:-1]) if len(self.shape) else ()
        if not fmt.is_scaled or fmt.granularity == "tensor":
            return ()
        if fmt.granularity == "row":
            return lead if len(self.shape) > 1 else (1,)
        return lead + (self.padded_last // fmt.block,)


def check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"quantize expects a floating-point tensor, got dtype {x.dtype}; convert it first")


def to_groups(x: torch.Tensor, fmt: Format) -> tuple[torch.Tensor, Groups]:
    """float32 ``(G, N)`` view of ``x`` (padded for block formats)."""
    shape = x.shape
    x = x.to(torch.float32).reshape(shape if len(shape) else (1,))
    last = x.shape[-1]
    if fmt.is_scaled and fmt.granularity == "block":
        pad = (-last) % fmt.block
        if pad:
            x = F.pad(x, (0, pad))
        n = fmt.block
    elif fmt.is_scaled and fmt.granularity == "row":
        n = last
    else:
        n = x.numel()
    padded_last = x.shape[-1]
    if n:
        g = x.numel() // n
    else:  # empty: one (empty) group per row for row scales, else one group
        g = x.shape[:-1].numel() if fmt.is_scaled and fmt.granularity == "row" else 1
    return x.reshape(g, n), Groups(shape, padded_last, g, n)


def from_groups(xg: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Inverse of :func:`to_groups`: crop the block padding and restore the logical shape."""
    shape = groups.shape
    lead = tuple(shape[:-1]) if len(shape) else ()
    x = xg.reshape(lead + (groups.padded_last,))
    last = shape[-1] if len(shape) else 1
    if groups.padded_last != last:
        x = x[..., :last]
    return x.reshape(shape)


def group_scales(xg: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None):
    """Scales of each group.

    Returns ``(s, stored, global_scale)``: ``s`` is the fp32 multiplier ``(G, 1)`` (NaN for a
    group holding NaN/inf), ``stored`` the scales as they are kept (fp32, E8M0 codes as uint8, or
    E4M3), ``global_scale`` the fp32 tensor scale of NVFP4 (else None).
    ``amax`` (per-tensor absmax formats only) replaces the measured amax: delayed scaling."""
    G = xg.shape[0]
    if not fmt.is_scaled:
        return torch.ones(G, 1, device=xg.device), None, None
    if xg.numel() == 0:
        ones = torch.ones(G, 1, device=xg.device)
        if fmt.scale == "e8m0":
            return ones, torch.full((G,), E8M0_BIAS, dtype=torch.uint8, device=xg.device), None
        if fmt.scale == "nvfp4":
            return ones, ones.reshape(G).to(torch.float8_e4m3fn), torch.ones((), device=xg.device)
        return ones, ones.reshape(G), None
    nan = float("nan")  # a Python scalar: a tensor made from one here would be a copy the host waits for
    a = xg.abs()
    # a NaN/inf element makes its group's amax (or mean) NaN/inf: no separate finiteness pass
    if fmt.scale == "absmax":
        if amax is None:
            amax = a.amax(dim=1, keepdim=True)
            finite = torch.isfinite(amax)
        else:
            finite = torch.isfinite(a.amax(dim=1, keepdim=True))
            amax = amax.to(torch.float32).reshape(1, 1).expand(G, 1)
        s = torch.where(finite, scale_from_stat(amax, fmt), nan)
        return s, s.reshape(G), None
    if fmt.scale == "absmean":
        s = a.mean(dim=1, keepdim=True)
        s = torch.where(torch.isfinite(s), scale_from_stat(s, fmt), nan)
        return s, s.reshape(G), None
    if fmt.scale == "e8m0":
        # OCP MX v1.0: shared exponent = floor(log2(amax)) - emax_elem, in E8M0's range.
        amax = a.amax(dim=1, keepdim=True)
        _, exp = torch.frexp(amax)
        shared = (exp - 1 - fmt.max_exp).clamp(-E8M0_BIAS, E8M0_BIAS)
        code = torch.where(amax > 0, shared + E8M0_BIAS, 0)
        code = torch.where(torch.isfinite(amax), code, E8M0_NAN)
        return e8m0_to_float(code), code.reshape(G).to(torch.uint8), None
    # nvfp4: two-level scaling; the tensor scale is one group over the whole tensor.
    amax_b = a.amax(dim=1, keepdim=True)
    amax_t = amax_b.amax()
    g = amax_t / _const(NVFP4_GLOBAL, xg)
    g = torch.where(g > 0, g, 1.0)  # also when a subnormal amax underflows
    g = torch.where(torch.isfinite(amax_t), g, nan)
    sb = (amax_b / _const(fmt.max_value, xg) / g).clamp(max=448.0).to(torch.float8_e4m3fn)
    s = sb.to(torch.float32) * g
    return s, sb.reshape(G), g


def scale_from_stat(stat: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The scale of an absmax (stat = amax) or absmean (stat = mean|x|) group."""
    if fmt.scale == "absmax":
        # test the quotient, not the amax: a subnormal amax divided by max underflows to 0
        s = stat / _const(fmt.max_value, stat)
        return torch.where(s > 0, s, 1.0)
    return stat.clamp(min=ABSMEAN_EPS)


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d float32 tensor on ``like``'s device. Dividing by it is a true IEEE division on every
    device (CUDA turns division by a Python scalar into a multiplication by its reciprocal, which
    can differ in the last bit from the CPU reference)."""
    return torch.full((), value, dtype=torch.float32, device=like.device)


def e8m0_to_float(code: torch.Tensor) -> torch.Tensor:
    """2^(code - 127) as float32; code 255 is NaN."""
    code = code.to(torch.int32)
    s = torch.ldexp(torch.ones(code.shape, device=code.device), code - E8M0_BIAS)
    return torch.where(code == E8M0_NAN, float("nan"), s)


def quantize_groups(xg: torch.Tensor, fmt: Format, rounding: str, generator=None, amax=None):
    """Element-domain values ``(G, N)`` on ``fmt``'s grid, with the scales of
    :func:`group_scales`. ``values * s`` is the dequantized tensor."""
    s, stored, g = group_scales(xg, fmt, amax)
    v = xg / s
    if fmt.scale == "nvfp4":
        v = torch.where(s == 0, 0.0, v)  # a block whose E4M3 scale underflowed is all zeros
    values = round_to_grid(v, fmt, rounding, generator)
    return values, s, stored, g


def quantize_dequantize(x: torch.Tensor, fmt, *, rounding: str = "nearest", generator=None, amax=None):
    """``(x_q, s_elem)``: ``x`` rounded through ``fmt`` (float32, shape of ``x``) and the fp32
    scale that applies to each element (shape of ``x``). The fast path for fake quantization
    and the emulated backend; no packing. ``amax``: see :func:`group_scales`."""
    fmt = get_format(fmt)
    check_input(x)
    check_rounding(rounding)
    if amax is not None and not (fmt.scale == "absmax" and fmt.granularity == "tensor"):
        raise ValueError(f"an explicit amax (delayed scaling) needs a per-tensor absmax format, not {fmt}")
    xg, groups = to_groups(x, fmt)
    values, s, _, _ = quantize_groups(xg, fmt, rounding, generator, amax)
    xq = from_groups(values * s, groups)
    s_elem = from_groups(s.expand_as(values), groups)
    return xq, s_elem


def delayed_amax(history: torch.Tensor | None, t: torch.Tensor):
    """Delayed scaling (Transformer Engine's DelayedScaling): the amax used now is the max of the
    history (this tensor's own amax while the history is empty: all zeros); this tensor's amax over
    its finite elements is then pushed into the history, newest first, in place. None without a
    history."""
    return None if history is None else _push_amax(history, t)


@torch.no_grad()
def _push_amax(history: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    now = torch.where(torch.isfinite(t), t.detach().abs(), 0).amax().float() if t.numel() else history.new_zeros(())
    past = history.amax()
    used = torch.where(past > 0, past, now)
    history.copy_(torch.cat([now.reshape(1), history[:-1]]))
    return used


# ---- very large tensors ---------------------------------------------------------------------
CHUNK_ELEMENTS = 1 << 25  # 32M elements: keeps each float32 temporary at 128 MiB


def tensor_stat(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """amax (absmax) or mean|x| (absmean) of all of ``x`` in fp32, with no full-size temporary.
    NaN/inf propagate into the result."""
    if fmt.scale == "absmax":
        lo, hi = torch.aminmax(x)
        return torch.maximum(-lo, hi).float()
    return torch.linalg.vector_norm(x, 1, dtype=torch.float32) / max(x.numel(), 1)


def quantize_large(x: torch.Tensor, fmt: Format, *, rounding="nearest", generator=None, amax=None,
                   out_dtype=torch.float32, scaled=True):
    """``(out, s)`` for a tensor too large to quantize in one piece: ``out`` (shape of ``x``,
    ``out_dtype``) holds the dequantized values (``scaled``) or the element codes, ``s`` the
    fp32 scales ``(G, 1)``. Pieces of at most ``CHUNK_ELEMENTS`` elements (whole rows for row and
    block scales) are rounded one after another, so float32 temporaries stay small.

    Same result as the one-piece path for absmax scales; for absmean (ternary/binary) the
    tensor's mean is summed in another order, which can move the scale by an ulp. Stochastic
    rounding draws its noise piece by piece (reproducible, but not the one-piece draw).
    NVFP4 (its tensor scale spans every block) is not supported here."""
    if fmt.scale == "nvfp4":
        raise ValueError("quantize_large does not split NVFP4 tensors (one tensor scale spans all blocks)")
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    if not fmt.is_scaled or fmt.granularity == "tensor":
        if fmt.is_scaled:
            now = tensor_stat(x, fmt)
            base = now if amax is None else amax.to(torch.float32)
            s = torch.where(torch.isfinite(now), scale_from_stat(base, fmt), float("nan"))
        else:
            s = torch.ones((), device=x.device)
        flat, oflat = x.reshape(-1), out.view(-1)
        for i in range(0, flat.numel(), CHUNK_ELEMENTS):
            v = round_to_grid(flat[i:i + CHUNK_ELEMENTS].float() / s, fmt, rounding, generator)
            oflat[i:i + CHUNK_ELEMENTS] = (v * s if scaled else v).to(out_dtype)
        return out, s.reshape(1, 1)
    last = x.shape[-1]
    rows, orows = x.reshape(-1, last), out.view(-1, last)
    step = max(1, CHUNK_ELEMENTS // last)
    scales = []
    for r in range(0, rows.shape[0], step):
        xg, groups = to_groups(rows[r:r + step], fmt)
        values, s, _, _ = quantize_groups(xg, fmt, rounding, generator)
        orows[r:r + step] = from_groups(values * s if scaled else values, groups).to(out_dtype)
        scales.append(s)
    return out, torch.cat(scales)


def _cast_fake_quant(x: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``Q(x)`` by torch's own casts, for formats whose element grid is a torch dtype (FP8, bf16,
    fp16) with no scale or a per-tensor/row absmax scale, nearest rounding, current scaling: a few
    elementwise ops instead of the general path's dozen, bit-identical to it (tested). Non-finite
    input needs no pass of its own: it makes the group's amax, hence its scale, non-finite."""
    dt, mx = fmt.torch_dtype, fmt.max_value
    x = x.to(torch.float32)
    if not fmt.is_scaled:
        y = x.clamp(-mx, mx)
        y = torch.where(torch.isinf(x), x if fmt.has_inf else torch.full_like(x, float("nan")), y)
        return y.to(dt).to(torch.float32)
    a = x.abs()
    amax = a.amax() if fmt.granularity == "tensor" else a.amax(dim=-1, keepdim=True)
    s = amax / _const(mx, x)
    s = torch.where(torch.isfinite(amax), torch.where(s > 0, s, 1.0), float("nan"))
    return (x / s).clamp(-mx, mx).to(dt).to(torch.float32) * s


def _casts_exactly(x: torch.Tensor, fmt: Format, rounding: str, amax) -> bool:
    return (rounding == "nearest" and amax is None and fmt.kind == "float" and fmt.torch_dtype is not None
            and fmt.bits < 32 and (not fmt.is_scaled or (fmt.scale == "absmax" and fmt.granularity in ("tensor", "row")))
            and x.dim() > 0 and x.numel() <= CHUNK_ELEMENTS and x.is_floating_point())


def fake_quant(x: torch.Tensor, fmt, *, rounding="nearest", generator=None, amax=None, out_dtype=torch.float32):
    """``Q(x)`` (quantize -> dequantize) in ``out_dtype``, splitting very large tensors."""
    fmt = get_format(fmt)
    if _casts_exactly(x, fmt, rounding, amax):
        return _cast_fake_quant(x, fmt).to(out_dtype)
    if not fmt.is_scaled and amax is None and x.numel() <= CHUNK_ELEMENTS:
        # a plain cast (bf16, fp16, unscaled fp8/fp4): no groups and no unit scales to multiply
        # by; the same rounding as quantize_dequantize (tested bit for bit)
        check_input(x)
        check_rounding(rounding)
        return round_to_grid(x.to(torch.float32), fmt, rounding, generator).to(out_dtype)
    if x.numel() > CHUNK_ELEMENTS and fmt.scale != "nvfp4" and x.dim() > 0:
        check_input(x)
        check_rounding(rounding)
        return quantize_large(x, fmt, rounding=rounding, generator=generator, amax=amax, out_dtype=out_dtype)[0]
    return quantize_dequantize(x, fmt, rounding=rounding, generator=generator, amax=amax)[0].to(out_dtype)
