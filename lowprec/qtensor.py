"""QTensor: a tensor resident in its format's width.

Storage of the elements (``QTensor.data``):

=====================  ======================================  ==================
format                 data                                    bytes / element
=====================  ======================================  ==================
fp32 / bf16 / fp16     that dtype                              4 / 2 / 2
fp8_e4m3, mxfp8        torch.float8_e4m3fn                     1
fp8_e5m2               torch.float8_e5m2                       1
int8                   torch.int8                              1
fp4_e2m1, mxfp4, nvfp4 4-bit E2M1 codes, 2 per uint8            1/2
ternary                2-bit codes (code = value + 1), 4/byte  1/4
binary                 1 bit (1 = +1, 0 = -1), 8 per byte      1/8
=====================  ======================================  ==================

plus the scales (``QTensor.scale``: fp32 per tensor/row/block, E8M0 as uint8 for MX, E4M3 for
NVFP4 blocks) and NVFP4's fp32 tensor scale. Block formats store the padded last dimension.
``nbytes`` counts exactly these storages.
"""

from __future__ import annotations

import torch

from .formats import Format, format as get_format
from . import scaling as _scaling
from .packing import pack_codes, unpack_codes
from .scaling import E8M0_NAN, Groups, check_input, e8m0_to_float, from_groups, quantize_groups, to_groups
from .rounding import check_rounding

# E2M1 magnitudes by 3-bit code (exponent e = code >> 1, mantissa m = code & 1): e = 0 is
# subnormal, m / 2; otherwise 2^(e-1) (1 + m / 2), so codes 0..7 are 0, 0.5, 1, 1.5, 2, 3, 4, 6.
# Both directions are computed, not looked up: a table would be copied to the device on every
# call (a host synchronisation on CUDA).


def e2m1_encode(values: torch.Tensor) -> torch.Tensor:
    """E2M1 values (exactly on the grid; NaN allowed, encoded as +0) -> 4-bit codes (uint8)."""
    v = torch.nan_to_num(values, nan=0.0)
    twice = (v.abs() * 2).to(torch.int32)  # 0, 1, 2, 3, 4, 6, 8, 12
    # 2|v| < 4 is the code itself; above, 2 floor(log2(2|v|)) gives 4 (2|v| = 4), 6 (8), and the
    # mantissa bit is set for 6 and 12 (bit 1 of 2|v| / 2^(floor log2) - 1)
    high = twice >= 4
    e = torch.where(high, (twice >= 8).to(torch.int32) + 2, 0)
    mag = torch.where(high, 2 * e + ((twice >> (e - 1).clamp(min=0)) & 1), twice)
    return mag.to(torch.uint8) | (torch.signbit(v).to(torch.uint8) << 3)


def e2m1_decode(codes: torch.Tensor) -> torch.Tensor:
    """4-bit codes -> float32 E2M1 values (the sign bit gives -0.0 for code 8)."""
    c = (codes & 7).to(torch.int32)
    e, m = c >> 1, (c & 1).to(torch.float32)
    mag = torch.where(e == 0, m * 0.5, (1.0 + m * 0.5) * ((e + 126) << 23).view(torch.float32))  # * 2^(e-1)
    return torch.where((codes >> 3).bool(), -mag, mag)


def _packed_bits(fmt: Format) -> int | None:
    if fmt.kind == "float" and fmt.bits == 4:
        return 4
    return {"ternary": 2, "binary": 1}.get(fmt.kind)


class QTensor:
    """Packed elements + scales + format + logical shape. Build with :func:`quantize`."""

    def __init__(self, data, scale, global_scale, fmt: Format, shape, padded_last: int):
        self.data = data
        self.scale = scale
        self.global_scale = global_scale
        self.fmt = fmt
        self.shape = torch.Size(shape)
        self.padded_last = padded_last

    # ---- storage ------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.data.device

    def numel(self) -> int:
        return self.shape.numel()

    def _storages(self):
        return [t for t in (self.data, self.scale, self.global_scale) if t is not None]

    @property
    def nbytes(self) -> int:
        """Real resident bytes: packed elements + scales."""
        return sum(t.numel() * t.element_size() for t in self._storages())

    @property
    def bits_per_element(self) -> float:
        return 8 * self.nbytes / max(self.numel(), 1)

    def to(self, device) -> "QTensor":
        """A copy on ``device`` (formats and codes unchanged)."""
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QTensor(mv(self.data), mv(self.scale), mv(self.global_scale), self.fmt, self.shape, self.padded_last)

    def _groups(self) -> Groups:
        n_pad = (self.shape[:-1].numel() if len(self.shape) else 1) * self.padded_last
        g = self.scale.numel() if self.fmt.is_scaled else 1
        return Groups(self.shape, self.padded_last, g, n_pad // g if g else 0)

    # ---- values -------------------------------------------------------------------------
    def values(self) -> torch.Tensor:
        """Element-domain values ``(G, N)`` (float32, before scaling)."""
        groups = self._groups()
        fmt = self.fmt
        bits = _packed_bits(fmt)
        n = groups.G * groups.N
        if bits is None:
            v = self.data.to(torch.float32)
        else:
            codes = unpack_codes(self.data, bits, n)
            if bits == 4:
                v = e2m1_decode(codes)
            elif bits == 2:
                v = codes.to(torch.float32) - 1.0
            else:
                v = codes.to(torch.float32) * 2.0 - 1.0
        return v.reshape(groups.G, groups.N)

    def group_scales(self) -> torch.Tensor:
        """fp32 scale of every group, ``(G, 1)``."""
        G = self._groups().G
        fmt = self.fmt
        if not fmt.is_scaled:
            return torch.ones(G, 1, device=self.device)
        if fmt.scale == "e8m0":
            return e8m0_to_float(self.scale).reshape(G, 1)
        s = self.scale.to(torch.float32).reshape(G, 1)
        if fmt.scale == "nvfp4":
            s = s * self.global_scale
        return s

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The represented tensor, in ``dtype``, with the logical shape. A tensor of more than
        ``scaling.CHUNK_ELEMENTS`` elements is written a block of whole rows at a time (the same
        values: each element is its code times its scale), so its float32 temporaries stay small."""
        rows = self.shape[:-1].numel() if len(self.shape) > 1 else 1
        if self.numel() > _scaling.CHUNK_ELEMENTS and rows > 1 and self._rows(0, 1) is not None:
            out = torch.empty(self.shape, dtype=dtype, device=self.device)
            flat = out.view(rows, self.shape[-1])
            step = max(1, _scaling.CHUNK_ELEMENTS // self.padded_last)
            for r in range(0, rows, step):
                flat[r:r + step] = self._rows(r, min(r + step, rows)).dequantize(dtype)
            return out
        x = self.values() * self.group_scales()
        return from_groups(x, self._groups()).to(dtype)

    def _rows(self, r0: int, r1: int) -> QTensor | None:
        """Rows ``r0:r1`` of the 2-D view (leading dims flattened) as a QTensor of their own, sharing
        storage; None where a row's codes or scales do not start on their own byte / scale."""
        rows = self.shape[:-1].numel()
        bits = _packed_bits(self.fmt) or 8 * self.data.element_size()
        if (self.padded_last * bits) % (8 * self.data.element_size()) or self.data.numel() % rows:
            return None
        scale = self.scale
        if scale is not None and scale.numel() > 1:
            if scale.numel() % rows:
                return None
            scale = scale.reshape(rows, -1)[r0:r1].reshape(-1)
        data = self.data.reshape(rows, -1)[r0:r1]
        return QTensor(data.reshape(-1) if self.data.dim() == 1 else data, scale, self.global_scale, self.fmt,
                       (r1 - r0, self.shape[-1]), self.padded_last)

    def __repr__(self) -> str:
        mib = self.nbytes / 2**20
        return (
            f"QTensor(format={self.fmt}, shape={tuple(self.shape)}, nbytes={self.nbytes} "
            f"({mib:.3f} MiB, {self.bits_per_element:.3f} bits/element), device={self.device})"
        )


def predicted_nbytes(shape, fmt) -> int:
    """Bytes a QTensor of ``shape`` in ``fmt`` occupies, from shapes alone (meta tensors, budgets).
    Equal to ``quantize(x, fmt).nbytes`` (tested)."""
    fmt = get_format(fmt)
    shape = torch.Size(shape)
    lead = shape[:-1].numel() if len(shape) else 1
    last = shape[-1] if len(shape) else 1
    if fmt.is_scaled and fmt.granularity == "block":
        last += (-last) % fmt.block
    n = lead * last
    bits = _packed_bits(fmt)
    data = -(-n * bits // 8) if bits else n * (fmt.bits // 8)
    if not fmt.is_scaled:
        return data
    groups = n // fmt.block if fmt.granularity == "block" else (lead if fmt.granularity == "row" else 1)
    scale_bytes = groups * fmt.scale_bits // 8
    return data + scale_bytes + (4 if fmt.scale == "nvfp4" else 0)


def quantize(x: torch.Tensor, fmt, *, rounding: str = "nearest", generator: torch.Generator | None = None,
             amax: torch.Tensor | None = None) -> QTensor:
    """Quantize ``x`` to ``fmt`` (a name or a :class:`Format`) and pack it.

    rounding: ``"nearest"`` (ties to even) or ``"stochastic"`` (unbiased, noise from
    ``generator``). ``amax``: a per-tensor format's amax when ``x`` is part of a larger tensor
    (a shard quantized with the whole tensor's scale). Non-finite input makes its scale group NaN
    (see :mod:`lowprec.formats`)."""
    fmt = get_format(fmt)
    check_input(x)
    check_rounding(rounding)
    xg, groups = to_groups(x, fmt)
    values, _, stored, g = quantize_groups(xg, fmt, rounding, generator, amax)
    bits = _packed_bits(fmt)
    if not fmt.has_nan:  # NaN groups are carried by their NaN scale; keep the codes defined
        values = torch.nan_to_num(values, nan=0.0)
    if bits == 4:
        data = pack_codes(e2m1_encode(values), 4)
    elif bits == 2:
        data = pack_codes((values + 1).to(torch.uint8), 2)
    elif bits == 1:
        data = pack_codes((values > 0).to(torch.uint8), 1)
    else:  # byte-wide or wider: keep the (padded) logical layout, as torch kernels expect
        lead = tuple(groups.shape[:-1]) if len(groups.shape) else ()
        data = values.reshape(lead + (groups.padded_last,))
        data = data.to(torch.int8 if fmt.kind == "int" else fmt.torch_dtype)
    if fmt.is_scaled and stored is not None:
        stored = stored.reshape(groups.scale_shape(fmt))
    return QTensor(data, stored, g, fmt, groups.shape, groups.padded_last)


def _register_safe_globals():
    """Let ``torch.load`` (weights_only, the default) read QTensors back."""
    add = getattr(torch.serialization, "add_safe_globals", None)
    if add is not None:
        add([QTensor, Format, Groups])


_register_safe_globals()

__all__ = ["QTensor", "quantize", "predicted_nbytes", "e2m1_encode", "e2m1_decode", "E8M0_NAN"]
