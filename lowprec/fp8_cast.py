"""FP8 operands in two reads of a tensor: its amax, then its E4M3 / E5M2 codes in one or both layouts.

The FP8 tensor-core kernels (:mod:`lowprec.kernels`) need, per operand, an amax, a scale and the
codes in the layout the GEMM reads (row-major, or transposed with the token dimension padded to a
multiple of 16). Written as tensor operations, the cast is a chain (to fp32, divide, clamp where
finite, cast, NaN where infinite) that the compiler fuses into whatever produced the tensor: a GELU's
output quantized this way had its ``erf`` computed again in the amax kernel and in the cast kernel,
and a layer norm's output was written out in fp32 for its cast to read. Here the operand is the
operator ``lowprec::fp8_operand`` (:func:`operand`, :func:`operands`), which ``torch.compile`` keeps
as one call, so the tensor it reads is computed once and stored in its own dtype. On CUDA it is two
Triton kernels:

- the amax (per tensor or per row): one read of the tensor (any 2-D strides; bf16, fp16 or fp32),
  each program's maximum of ``|x|`` taken as integer bits (ordered as the numbers are, NaN above
  infinity) and merged with one atomic maximum; skipped where the caller gives the per-tensor amax
  (``measured=``: with ``lowprec.kernels.Fp8.amax_in_graph`` on, a compiled FP8 kernel computes it in the
  graph, where the compiler can fuse it into the kernel that makes the tensor, a layer norm);
- the cast: the scale from the amax (or from a delayed amax), then one more read of the tensor and
  one write of its codes in each layout asked for: row-major, transposed with the token dimension
  padded to a multiple of 16 (what a weight gradient reads), or both at once.

The codes are those of :func:`lowprec.kernels.split` followed by the cast to the FP8 dtype, bit for
bit (the quotient is IEEE round-to-nearest division's, as eager's: in a tile whose scales lie in
[2^-64, 2^64] and whose values stay below 2^120 times them, the cast and delayed passes take it from
the scale's reciprocal with one fused correction, which rounds the same and costs fewer instructions
than ``tl.div_rn``; elsewhere ``tl.div_rn``): ``v = x / s``; a finite
``v`` is clamped to the format's largest value and rounded to nearest even; NaN stays NaN; an
infinite ``v`` becomes NaN in E4M3 (no infinity) and keeps its infinity in E5M2. A NaN code is
written as ``0x7F`` (its sign carries nothing). On the CPU, or without Triton, the operator computes
the same with tensor operations (:func:`reference_operand`).

An FP4 E2M1 format scaled per tensor or per row (:func:`is_e2m1`) takes the same two passes with ``v``
rounded to E2M1 before its cast (:func:`e2m1_operand`: E4M3 codes, which hold every E2M1 value exactly;
:func:`e2m1_values`: their values in bf16), as the general quantizer rounds it.

Under delayed scaling (:func:`delayed_operands`, the operator ``lowprec::fp8_operand_delayed``) the scale
comes from an amax history known before the pass, so the tensor is read once: each program of the pass
writes its codes and its tile's largest |x| (finite, and all) in slots of its own; one program after it
merges them, pushes the finite amax into the history and writes the scale (NaN where the tensor holds a
NaN or an infinity), writing every code again itself only where those written do not stand (the scale is
not the pass's: an empty history, a NaN scale). The codes, scale and history are those of
:func:`lowprec.scaling.delayed_amax` followed by :func:`operands` with that amax, bit for bit.

A weight that reaches its GEMMs as a data-parallel run's ranks hold it (gathered in its FP8 format,
dequantized to bf16, fp16 or fp32: :func:`lowprec.fsdp.as_gathered`) is read from its master (``gathered=``): the
cast pass dequantizes each code in registers and quantizes that value again under the dequantized
tensor's own scale, which is known before the pass (the largest dequantized value is the amax's own
code dequantized), so the dequantized tensor is never written: the same codes and scale as
quantizing it.

The same passes can write the codes' values in bf16 instead of the codes (:func:`values`): the operands of a bf16
tensor-core GEMM in these formats (``lowprec.kernels.Bf16TensorCore.fp8_values_from_passes``), the transposed
layout's values multiplied by their per-row scales (fp32, then rounded to bf16), which lie along its
contraction, as the general quantizer folds them.
"""

from __future__ import annotations

import torch

from .formats import Format
from .formats import format as get_format
from .rounding import round_to_grid
from .scaling import delayed_amax, scale_from_stat

try:  # Triton ships with CUDA builds of torch; the CPU build runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None

PAD = 16  # the transposed layout's last (token) dimension is padded to a multiple of this
GATHERED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)  # what a gathered weight may be dequantized to
_NAN_CODE = 0x7F


def fp8_dtype(fmt: Format | None, rounding: str = "nearest") -> torch.dtype | None:
    """The FP8 dtype of the codes :func:`operand` makes for ``fmt`` (an E4M3 or E5M2 float with its
    dtype's range, absmax-scaled per tensor or per row, rounded to nearest), else None."""
    return None if fmt is None or rounding != "nearest" else fmt.fp8_codes


def is_e2m1(fmt: Format | None, rounding: str = "nearest") -> bool:
    """Whether ``fmt`` is FP4 E2M1 (largest value 6) absmax-scaled per tensor or per row, rounded to nearest:
    its values, every one exact in E4M3, make E4M3 codes under the same scales (:func:`e2m1_operand`)."""
    return fmt is not None and rounding == "nearest" and fmt.e2m1_codes


def applies(t: torch.Tensor, fmt: Format | None, rounding: str = "nearest") -> bool:
    """Whether ``t``'s operand in ``fmt`` is made here: a non-empty 2-D floating tensor and a format
    of :func:`fp8_dtype`."""
    return fp8_dtype(fmt, rounding) is not None and t.dim() == 2 and t.numel() > 0 and t.is_floating_point()


def scales(t: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None) -> torch.Tensor:
    """The fp32 scales of ``t`` (2-D) in ``fmt``, exactly those of :func:`lowprec.scaling.group_scales`:
    ``(1,)`` per tensor, ``(rows, 1)`` per row; NaN where the group holds a NaN or an infinity.
    ``amax``: a delayed (per-tensor) amax used instead of the measured one."""
    per_row = fmt.granularity == "row"
    measured = t.abs().amax(dim=1, keepdim=True) if per_row else t.abs().amax().reshape(1)
    measured = measured.float()
    stat = measured if amax is None else amax.to(torch.float32).reshape(1)
    s = stat / torch.full((), fmt.max_value, dtype=torch.float32, device=t.device)
    s = torch.where(s > 0, s, 1.0)
    return torch.where(torch.isfinite(measured), s, float("nan"))


def reference_cast(x: torch.Tensor, s: torch.Tensor, e5m2: bool, transposed: bool, e2m1: bool = False
                   ) -> torch.Tensor:
    """The codes of ``x`` (M, K) under the scales ``s`` (``(1,)`` or ``(M, 1)``), computed with tensor
    operations: ``(M, K)``, or with ``transposed`` ``(K, M)`` padded with zero codes. ``e2m1``: E4M3 codes of
    the values rounded to FP4 E2M1 (as the general quantizer rounds them)."""
    top = 57344.0 if e5m2 else 448.0
    dt = torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn
    v = x.float() / s.reshape(-1, 1)
    if e2m1:
        out = round_to_grid(v, _E2M1, "nearest")  # finite values of the grid, NaN for a NaN or an infinity
    else:
        out = torch.where(torch.isfinite(v), v.clamp(-top, top), v)
    if not e5m2:
        out = torch.where(torch.isinf(v), float("nan"), out)
    bits = out.to(dt).view(torch.uint8)
    codes = torch.where(torch.isnan(out), torch.full_like(bits, _NAN_CODE), bits).view(dt)
    if not transposed:
        return codes.contiguous()
    t = codes.t().contiguous().view(torch.uint8)
    pad = (-t.shape[1]) % PAD
    return torch.nn.functional.pad(t, (0, pad)).view(dt) if pad else t.view(dt)


def _outputs(x: torch.Tensor, e5m2: bool, per_row: bool, rowmajor: bool, transposed: bool, values: bool = False):
    M, K = x.shape
    dt = torch.bfloat16 if values else torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn
    codes = torch.empty((M, K) if rowmajor else (0,), dtype=dt, device=x.device)
    codes_t = torch.empty((K, M if values else M + (-M) % PAD) if transposed else (0,), dtype=dt, device=x.device)
    s = torch.empty((M, 1) if per_row else (1,), dtype=torch.float32, device=x.device)
    return codes, codes_t, s


if triton is not None:
    # `_fast`'s bounds: the scales whose reciprocals give exact quotients, and the largest x r it lets through
    _FAST_LO = tl.constexpr(2.0 ** -64)
    _FAST_HI = tl.constexpr(2.0 ** 64)
    _FAST_TOP = tl.constexpr(2.0 ** 120)

    @triton.jit
    def _amax_kernel(x_ptr, out_ptr, M, K, stride_xm, stride_xk, PER_ROW: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr):
        # |x| as the bits of a non-negative fp32 number: ordered as the numbers are, NaN above inf
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rm64 = rm.to(tl.int64)
        k0 = tl.program_id(1) * BLOCK_K * CHUNKS
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
        for c in tl.static_range(CHUNKS):
            rk = k0 + c * BLOCK_K + tl.arange(0, BLOCK_K)
            inside = (rm[:, None] < M) & (rk[None, :] < K)
            x = tl.load(x_ptr + rm64[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk, mask=inside,
                        other=0.0)
            acc = tl.maximum(acc, x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF)
        if PER_ROW:
            tl.atomic_max(out_ptr + rm, tl.max(acc, axis=1), mask=rm < M, sem="relaxed")
        else:
            tl.atomic_max(out_ptr, tl.max(tl.max(acc, axis=1), axis=0), sem="relaxed")

    @triton.jit
    def _fp8_value(v, E5M2: tl.constexpr):
        # the value of a finite v's code (clamped, rounded to nearest even), as fp32: the conversion
        # saturates (cvt.rn.satfinite), which is the clamp
        if E5M2:
            return v.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.float32)
        return v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.float32)

    @triton.jit
    def _narrow(v, GATHERED: tl.constexpr):
        # v (fp32) rounded to the dtype a gathered weight is dequantized to: 1 bf16, 2 fp16, 3 fp32
        if GATHERED == 1:
            return v.to(tl.bfloat16).to(tl.float32)
        if GATHERED == 2:
            return v.to(tl.float16).to(tl.float32)
        return v

    @triton.jit
    def _scale(stat, measured, TOP: tl.constexpr):
        # the scale, as `scales` computes it: stat / max (IEEE division), 1 where that is 0, NaN where the
        # measured amax is not finite (the group holds a NaN or an infinity)
        s = tl.div_rn(stat, tl.zeros_like(stat) + TOP)
        s = tl.where(s > 0, s, 1.0)
        return tl.where(measured < float("inf"), s, float("nan"))

    @triton.jit
    def _load_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk, EVEN: tl.constexpr = False):
        # the tile of x at rows rm, columns rk, as fp32 (0 outside the tensor); EVEN: the tile lies inside it
        if EVEN:
            return tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk
                           ).to(tl.float32)
        inside = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + rk.to(tl.int64)[None, :] * stride_xk, mask=inside,
                    other=0.0)
        return x.to(tl.float32)

    @triton.jit
    def _quotient(x, s, r, FAST: tl.constexpr):
        # x / s rounded to nearest even, as IEEE division rounds it. FAST: from r, 1 / s rounded to nearest,
        # with one correction (Markstein): q = x r, then q + (x - q s) r, each rounded once (the residual
        # x - q s is exact under a fused multiply-add); that is x / s correctly rounded wherever x / s, r
        # and the residual are normal, which `_fast` ensures for every |x / s| an FP8 code can tell apart
        # from zero (>= 2^-20); below that the code is a zero with x's sign, restored here for x = -0
        if FAST:
            q = x * r
            q = tl.fma(tl.fma(q, -s, x), r, q)
            sign = x.to(tl.int32, bitcast=True) & -2147483648
            return (q.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)
        return tl.div_rn(x, s)

    @triton.jit
    def _fast(s, top):
        # whether a tile takes the quotient from the reciprocal: every |x| <= top (finite) and every scale
        # s of the tile in [2^-64, 2^64], so that r = 1 / s is normal, the residuals of every quotient of
        # 2^-20 or more are multiples of 2^-146 with 24 bits at most (normal or exact subnormals), and no
        # x r reaches 2^120 (finite, its code saturated or NaN-free); else IEEE division. Returns (fast, r)
        r = tl.div_rn(tl.zeros_like(s) + 1.0, s)
        ok = (s >= _FAST_LO) & (s <= _FAST_HI) & (top * r < _FAST_TOP)
        return tl.min(ok.to(tl.int32), axis=0) > 0, r

    @triton.jit
    def _round_e2m1(v):
        # v rounded to FP4 E2M1 as `lowprec.rounding.round_float_grid` rounds it: |v| clamped to 6, its
        # quantum 2^(max(floor(log2 |v|), 0) - 1) from the exponent bits, the multiple of it nearest (ties to
        # even: adding and taking away 2^23 rounds a number below 2^22 to an integer so), v's sign; NaN for a
        # NaN or an infinity (E2M1 has no infinity)
        a = tl.minimum(tl.abs(v), 6.0)
        e = tl.maximum((a.to(tl.int32, bitcast=True) >> 23) - 127, 0) - 1
        quantum = ((e + 127) << 23).to(tl.float32, bitcast=True)
        r = a * ((127 - e) << 23).to(tl.float32, bitcast=True)
        r = (r + 8388608.0) - 8388608.0
        out = tl.minimum(r * quantum, 6.0)
        out = (out.to(tl.int32, bitcast=True) | (v.to(tl.int32, bitcast=True) & -2147483648)).to(tl.float32,
                                                                                                  bitcast=True)
        return tl.where(tl.abs(v) < float("inf"), out, float("nan"))

    @triton.jit
    def _store_codes(x, s, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2: tl.constexpr,
                     ROWMAJOR: tl.constexpr, TRANSPOSED: tl.constexpr, VALUES: tl.constexpr = False,
                     FOLD: tl.constexpr = False, r=None, FAST: tl.constexpr = False, EVEN: tl.constexpr = False,
                     E2M1: tl.constexpr = False):
        # the codes of the tile x (fp32) under the scales s (one per row of the tile), in each layout asked for;
        # VALUES: their values in bf16 instead (exact), the transposed layout's multiplied by the scales (FOLD).
        # FAST: the quotients from r (as `_fast` gives it); EVEN: the tile lies inside both layouts (no padding
        # columns in it); E2M1: the quotients rounded to FP4 E2M1 first (their E4M3 codes are then exact)
        if FAST:
            v = _quotient(x, s[:, None], r[:, None], True)
        else:
            v = tl.div_rn(x, s[:, None])
        if E2M1:
            v = _round_e2m1(v)
        # the conversion saturates (cvt.rn.satfinite): it clamps a finite v to +-TOP (a clamp of its own
        # costs time: this pass is bound by its arithmetic nearly as much as by memory); an infinite v,
        # which it would saturate too, and NaN get their codes here. Under FAST every v is finite, but the
        # selects stay: without them, the codes of an fp32 tile written in both layouts came out wrong in
        # every fourth row of the transposed layout (Triton 3.6, sm_90), and with them they are right
        if E5M2:
            bits = v.to(tl.float8e5, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
            bits = tl.where(v == float("inf"), 0x7C, tl.where(v == float("-inf"), 0xFC, bits.to(tl.int32)))
            bits = tl.where(v != v, 0x7F, bits)
        else:
            bits = v.to(tl.float8e4nv, fp_downcast_rounding="rtne").to(tl.uint8, bitcast=True)
            bits = tl.where(tl.abs(v) < float("inf"), bits.to(tl.int32), 0x7F)
        rm64 = rm.to(tl.int64)
        rk64 = rk.to(tl.int64)
        if VALUES:
            if E5M2:
                val = bits.to(tl.uint8).to(tl.float8e5, bitcast=True).to(tl.float32)
            else:
                val = bits.to(tl.uint8).to(tl.float8e4nv, bitcast=True).to(tl.float32)
            if ROWMAJOR:
                tl.store(y_ptr + rm64[:, None] * stride_y + rk64[None, :], val.to(tl.bfloat16),
                         mask=(rm[:, None] < M) & (rk[None, :] < K))
            if TRANSPOSED:
                if FOLD:
                    val = val * s[:, None]
                tl.store(yt_ptr + rk64[None, :] * stride_yt + rm64[:, None], val.to(tl.bfloat16),
                         mask=(rk[None, :] < K) & (rm[:, None] < M))
        elif EVEN:
            if ROWMAJOR:
                tl.store(y_ptr + rm64[:, None] * stride_y + rk64[None, :], bits.to(tl.uint8))
            if TRANSPOSED:
                tl.store(yt_ptr + rk64[None, :] * stride_yt + rm64[:, None], bits.to(tl.uint8))
        else:
            if ROWMAJOR:
                tl.store(y_ptr + rm64[:, None] * stride_y + rk64[None, :], bits.to(tl.uint8),
                         mask=(rm[:, None] < M) & (rk[None, :] < K))
            if TRANSPOSED:
                bits = tl.where(rm[:, None] < M, bits, 0).to(tl.uint8)  # the padding columns: code 0x00 (+0)
                tl.store(yt_ptr + rk64[None, :] * stride_yt + rm64[:, None], bits,
                         mask=(rk[None, :] < K) & (rm[:, None] < Mp))

    @triton.jit
    def _cast_kernel(x_ptr, amax_ptr, delayed_ptr, s_ptr, y_ptr, yt_ptr, M, K, Mp, stride_xm, stride_xk, stride_y,
                     stride_yt, TOP: tl.constexpr, E5M2: tl.constexpr, PER_ROW: tl.constexpr,
                     DELAYED: tl.constexpr, ROWMAJOR: tl.constexpr, TRANSPOSED: tl.constexpr,
                     GATHERED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                     VALUES: tl.constexpr = False, FAST: tl.constexpr = False, EVEN: tl.constexpr = False,
                     E2M1: tl.constexpr = False):
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        if PER_ROW:
            measured = tl.load(amax_ptr + rm, mask=rm < M, other=0).to(tl.float32, bitcast=True)
        else:
            measured = tl.load(amax_ptr + rm * 0).to(tl.float32, bitcast=True)
        if DELAYED:
            stat = tl.load(delayed_ptr + rm * 0).to(tl.float32)
        else:
            stat = measured
        s = _scale(stat, measured, TOP)
        x = _load_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk, EVEN)
        if GATHERED != 0:
            # x is a master weight that reaches the GEMM as its codes under s, dequantized (code x s in
            # fp32, rounded to the gathered dtype): that tensor g is quantized here in its place. Its amax
            # is the amax's own code dequantized (each step is monotonic in |x|), so g's scale is known
            # before g is; a NaN scale (a NaN or an infinity in x) makes every g NaN, and g's scale NaN
            top = _narrow(_fp8_value(tl.div_rn(measured, s), E5M2) * s, GATHERED)
            x = _narrow(_fp8_value(tl.div_rn(x, s[:, None]), E5M2) * s[:, None], GATHERED)
            s = _scale(top, top, TOP)
        if PER_ROW:
            tl.store(s_ptr + rm, s, mask=(rm < M) & (tl.program_id(1) == 0))
        else:
            tl.store(s_ptr + rm * 0, s, mask=(rm == 0) & (tl.program_id(0) == 0) & (tl.program_id(1) == 0))
        if FAST and GATHERED == 0:  # every |x| of a row is at most its measured amax
            fast, r = _fast(s, measured)
            if fast:
                _store_codes(x, s, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2, ROWMAJOR, TRANSPOSED,
                             VALUES, VALUES and PER_ROW, r, True, EVEN, E2M1)
            else:
                _store_codes(x, s, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2, ROWMAJOR, TRANSPOSED,
                             VALUES, VALUES and PER_ROW, s, False, EVEN, E2M1)
        else:
            _store_codes(x, s, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2, ROWMAJOR, TRANSPOSED,
                         VALUES, VALUES and PER_ROW, s, False, EVEN, E2M1)

    @triton.jit
    def _rows_kernel(x_ptr, s_ptr, y_ptr, M, K, stride_xm, stride_xk, stride_y, TOP: tl.constexpr, E5M2: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, K_TILES: tl.constexpr):
        # per-row scales in one kernel: each program holds whole rows, takes their amax over K, then reads
        # them again (from L2 for the most part) to write their codes; no atomics, no buffer to clear
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        acc = tl.zeros([BLOCK_M, BLOCK_K], dtype=tl.int32)
        for kt in tl.static_range(K_TILES):
            x = _load_tile(x_ptr, rm, kt * BLOCK_K + tl.arange(0, BLOCK_K), M, K, stride_xm, stride_xk)
            acc = tl.maximum(acc, x.to(tl.int32, bitcast=True) & 0x7FFFFFFF)  # |x|'s bits, NaN above inf
        measured = tl.max(acc, axis=1).to(tl.float32, bitcast=True)
        s = _scale(measured, measured, TOP)
        tl.store(s_ptr + rm, s, mask=rm < M)
        for kt in tl.static_range(K_TILES):
            rk = kt * BLOCK_K + tl.arange(0, BLOCK_K)
            x = _load_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk)
            _store_codes(x, s, rm, rk, M, K, M, y_ptr, y_ptr, stride_y, 0, E5M2, True, False)

    @triton.jit
    def _past(hist_ptr, H, HB: tl.constexpr):
        # the largest amax of the history (0 while it is empty)
        rh = tl.arange(0, HB)
        return tl.max(tl.load(hist_ptr + rh, mask=rh < H, other=0).to(tl.float32), axis=0)

    @triton.jit
    def _delayed_kernel(x_ptr, hist_ptr, part_ptr, y_ptr, yt_ptr, M, K, Mp, H, stride_xm, stride_xk, stride_y, stride_yt,
                        TOP: tl.constexpr, E5M2: tl.constexpr, ROWMAJOR: tl.constexpr, TRANSPOSED: tl.constexpr,
                        HB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, FAST: tl.constexpr = False,
                        EVEN: tl.constexpr = False):
        # delayed scaling's pass, one read of x: the scale comes from the history, so each program writes its
        # codes at once, and its tile's largest finite |x| and largest |x| (as bits: ordered as the numbers
        # are, NaN above inf) in slots of its own (no atomics: one address that every program updates would
        # serialize them)
        rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        x = _load_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk, EVEN)
        # the maxima first: taken after the codes' stores, they kept the tile's bits alive through them (half
        # again as many registers, fewer programs on each SM)
        bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
        top = tl.max(tl.max(bits, axis=1), axis=0)
        finite = top
        if top >= 0x7F800000:  # a NaN or an infinity: the finite ones' maximum apart
            finite = tl.max(tl.max(tl.where(bits < 0x7F800000, bits, 0), axis=1), axis=0)
        program = tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)
        n = tl.num_programs(0) * tl.num_programs(1)
        tl.store(part_ptr + program, finite)
        tl.store(part_ptr + n + program, top)
        # under an empty history (past 0: the scale 1) the codes written here are written again by the finish
        stat = tl.zeros([BLOCK_M], dtype=tl.float32) + _past(hist_ptr, H, HB)
        s = _scale(stat, stat, TOP)
        if FAST:  # every |x| of the tile is at most top (a NaN or an infinity among them: not fast)
            fast, r = _fast(s, top.to(tl.float32, bitcast=True))
            if fast:
                _store_codes(x, s, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2, ROWMAJOR, TRANSPOSED,
                             False, False, r, True, EVEN)
            else:
                _store_codes(x, s, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2, ROWMAJOR, TRANSPOSED,
                             False, False, s, False, EVEN)
        else:
            _store_codes(x, s, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2, ROWMAJOR, TRANSPOSED,
                         False, False, s, False, EVEN)

    @triton.jit
    def _delayed_finish(x_ptr, hist_ptr, part_ptr, s_ptr, used_ptr, y_ptr, yt_ptr, M, K, Mp, H, n, stride_xm, stride_xk,
                        stride_y, stride_yt, TOP: tl.constexpr, E5M2: tl.constexpr, ROWMAJOR: tl.constexpr,
                        TRANSPOSED: tl.constexpr, HB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                        BLOCK_P: tl.constexpr):
        # one program after the pass: merges the n programs' maxima, pushes the finite amax into the history,
        # writes the scale (NaN where x holds a NaN or an infinity) and the amax used, and, where the codes
        # written do not stand (the scale is not the pass's: the history was empty and x is not all zeros, its
        # own amax gives the scale; or the scale is NaN), writes every code again itself
        finite = tl.zeros([BLOCK_P], dtype=tl.int32)
        top = tl.zeros([BLOCK_P], dtype=tl.int32)
        for p0 in range(0, n, BLOCK_P):
            rp = p0 + tl.arange(0, BLOCK_P)
            finite = tl.maximum(finite, tl.load(part_ptr + rp, mask=rp < n, other=0))
            top = tl.maximum(top, tl.load(part_ptr + n + rp, mask=rp < n, other=0))
        now = tl.max(finite, axis=0).to(tl.float32, bitcast=True)
        measured = tl.max(top, axis=0).to(tl.float32, bitcast=True)
        rh = tl.arange(0, HB)
        past = _past(hist_ptr, H, HB)
        used = tl.where(past > 0, past, now)
        s = _scale(used, measured, TOP)
        tl.store(s_ptr, s)
        tl.store(used_ptr, used)
        older = tl.load(hist_ptr + rh - 1, mask=(rh >= 1) & (rh < H), other=0).to(tl.float32)
        tl.debug_barrier()  # every entry read before any is written
        tl.store(hist_ptr + rh, tl.where(rh == 0, now, older).to(hist_ptr.dtype.element_ty), mask=rh < H)
        if s != _scale(past, past, TOP):  # the pass's scale (1 under an empty history), or a NaN scale
            s_rows = tl.zeros([BLOCK_M], dtype=tl.float32) + s
            for m0 in range(0, Mp, BLOCK_M):
                for k0 in range(0, K, BLOCK_K):
                    rm = m0 + tl.arange(0, BLOCK_M)
                    rk = k0 + tl.arange(0, BLOCK_K)
                    x = _load_tile(x_ptr, rm, rk, M, K, stride_xm, stride_xk)
                    _store_codes(x, s_rows, rm, rk, M, K, Mp, y_ptr, yt_ptr, stride_y, stride_yt, E5M2, ROWMAJOR,
                                 TRANSPOSED)

# tile sizes (timed on an H200 over 2048..8192 x 2048..8192 bf16 inputs): the cast writing row-major codes
# only, and the cast writing the transposed layout (alone or with the row-major one)
CAST_BLOCKS = dict(BLOCK_M=64, BLOCK_K=64, num_warps=8)
CAST_BLOCKS_TRANSPOSED = dict(BLOCK_M=32, BLOCK_K=128, num_warps=4)
AMAX_BLOCKS = dict(BLOCK_M=32, BLOCK_K=256, CHUNKS=4, num_warps=8)
# delayed scaling's pass (its tiles' maxima cost it a reduction each: larger tiles than the cast's, timed on an
# H200 over 16384x512 .. 8192x8192 bf16 inputs), and the one program that finishes it (BLOCK_P programs' maxima
# a step; its tile for the codes it writes again where they do not stand)
DELAYED_BLOCKS = dict(BLOCK_M=16, BLOCK_K=256, num_warps=4)
DELAYED_BLOCKS_TRANSPOSED = dict(BLOCK_M=64, BLOCK_K=128, num_warps=8)
DELAYED_FINISH_BLOCKS = dict(BLOCK_P=2048, BLOCK_M=32, BLOCK_K=128, num_warps=8)
# per-row scales in one kernel (``ROWS_IN_ONE_KERNEL``): rows a program holds, the width of its reads
ROWS_BLOCKS = dict(BLOCK_M=8, BLOCK_K=256, num_warps=4)
# True: the cast passes (`_cast_kernel`, `_delayed_kernel`) divide by a tile's scales through their reciprocals
# with one correction, which gives the IEEE quotient (`_quotient`), in the tiles where `_fast` shows that exact
# (every tile of a tensor whose scale lies in [2^-64, 2^64] and, under a delayed amax, whose values stay below
# 2^120 times it); False: IEEE division everywhere (more instructions, the same codes). In a compiled 600M step
# on an H200 the FP8 step ran 3% faster with it, the delayed-scaling FP8 step 6%
FAST_QUOTIENT = True
# True: a per-row operand (row-major codes) is one kernel that holds whole rows (amax, then cast, per program)
# instead of an amax pass with atomics into a cleared buffer, then the cast; the same codes. Off: in a compiled
# 600M step under the paper policy on an H200 the step ran slower with it
ROWS_IN_ONE_KERNEL = False


def _even(M: int, K: int, rows: int, blocks: dict) -> bool:
    # whether every tile of the grid lies inside the tensor and its layouts (no masks needed)
    return rows == M and M % blocks["BLOCK_M"] == 0 and K % blocks["BLOCK_K"] == 0


def triton_operand(x: torch.Tensor, amax: torch.Tensor | None, e5m2: bool, per_row: bool, rowmajor: bool,
                   transposed: bool, gathered: int = 0, measured: torch.Tensor | None = None,
                   cast_blocks: dict | None = None, amax_blocks: dict | None = None, rows_blocks: dict | None = None,
                   values: bool = False, e2m1: bool = False):
    """The operator's result from the Triton kernels (CUDA): the amax (unless ``measured`` gives it),
    then the cast; per-row scales of row-major codes in one kernel where ``ROWS_IN_ONE_KERNEL`` is on.
    ``cast_blocks`` / ``amax_blocks`` / ``rows_blocks``: tile sizes other than the module's (as
    ``CAST_BLOCKS`` / ``AMAX_BLOCKS`` / ``ROWS_BLOCKS``; a benchmark's sweep), which change no code.
    ``values``: as :func:`values` (bf16 values instead of codes). ``e2m1``: as :func:`e2m1_operand`."""
    M, K = x.shape
    codes, codes_t, s = _outputs(x, e5m2, per_row, rowmajor, transposed, values)
    if (per_row and ROWS_IN_ONE_KERNEL and amax is None and measured is None and not gathered and not transposed
            and not values and not e2m1):
        r = rows_blocks or ROWS_BLOCKS
        _rows_kernel[(triton.cdiv(M, r["BLOCK_M"]),)](
            x, s, codes.view(torch.uint8), M, K, x.stride(0), x.stride(1), codes.stride(0),
            TOP=57344.0 if e5m2 else 448.0, E5M2=e5m2, K_TILES=triton.cdiv(K, r["BLOCK_K"]), **r)
        return codes, codes_t, s
    if measured is not None:  # max |x| as fp32 (NaN where x holds one): its bits are what the amax pass makes
        measured = measured.to(torch.float32).reshape(1).contiguous().view(torch.int32)
    else:
        measured = torch.zeros(M if per_row else 1, dtype=torch.int32, device=x.device)
        a = amax_blocks or AMAX_BLOCKS
        grid = (triton.cdiv(M, a["BLOCK_M"]), triton.cdiv(K, a["BLOCK_K"] * a["CHUNKS"]))
        _amax_kernel[grid](x, measured, M, K, x.stride(0), x.stride(1), PER_ROW=per_row, **a)
    rows = M + (-M) % PAD if transposed and not values else M
    c = cast_blocks or (CAST_BLOCKS_TRANSPOSED if transposed else CAST_BLOCKS)
    grid = (triton.cdiv(rows, c["BLOCK_M"]), triton.cdiv(K, c["BLOCK_K"]))
    delayed = measured if amax is None else amax.reshape(1)
    out, out_t = (codes, codes_t) if values else (codes.view(torch.uint8), codes_t.view(torch.uint8))
    _cast_kernel[grid](x, measured, delayed, s, out, out_t, M, K, rows,
                       x.stride(0), x.stride(1), codes.stride(0) if rowmajor else 0,
                       codes_t.stride(0) if transposed else 0, TOP=6.0 if e2m1 else 57344.0 if e5m2 else 448.0,
                       E5M2=e5m2, PER_ROW=per_row, DELAYED=amax is not None, ROWMAJOR=rowmajor, TRANSPOSED=transposed,
                       GATHERED=gathered, VALUES=values, FAST=FAST_QUOTIENT, EVEN=_even(M, K, rows, c), E2M1=e2m1,
                       **c)
    return codes, codes_t, s


def reference_operand(x: torch.Tensor, amax: torch.Tensor | None, e5m2: bool, per_row: bool, rowmajor: bool,
                      transposed: bool, gathered: int = 0, measured: torch.Tensor | None = None, values: bool = False,
                      e2m1: bool = False):
    """The operator's result computed with tensor operations (CPU, or no Triton); ``measured``, being
    ``x``'s own amax, changes nothing here."""
    if gathered:  # the dequantized codes of x under its own scale, then their operand
        codes, _, s = reference_operand(x, None, e5m2, False, True, False)
        x = (codes.float() * s).to(GATHERED_DTYPES[gathered - 1])
    if values:  # the codes' values in bf16, the transposed layout's times the scales where they are per row
        codes, _, s = reference_operand(x, amax, e5m2, per_row, True, False, e2m1=e2m1)
        v = codes.float()
        unused = torch.empty((0,), dtype=torch.bfloat16, device=x.device)
        v_t = ((v * s) if per_row else v).to(torch.bfloat16).t().contiguous() if transposed else unused.clone()
        return (v.to(torch.bfloat16) if rowmajor else unused), v_t, s
    s = scales(x, _E2M1_FORMATS[per_row] if e2m1 else _FORMATS[e5m2, per_row], amax)
    unused = torch.empty((0,), dtype=torch.float8_e5m2 if e5m2 else torch.float8_e4m3fn, device=x.device)
    codes = reference_cast(x, s, e5m2, False, e2m1) if rowmajor else unused
    codes_t = reference_cast(x, s, e5m2, True, e2m1) if transposed else unused.clone()
    return codes, codes_t, s


@torch.library.custom_op("lowprec::fp8_operand", mutates_args=())
def _fp8_operand(x: torch.Tensor, amax: torch.Tensor | None, e5m2: bool, per_row: bool, rowmajor: bool,
                 transposed: bool, gathered: int, measured: torch.Tensor | None = None, values: bool = False,
                 e2m1: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if e2m1 and gathered:  # the master's codes, the gathered tensor's scales (inside the operator: eager arithmetic)
        codes, codes_t, s = _fp8_operand_of(x, amax, e5m2, per_row, rowmajor, transposed, 0, measured, values, e2m1)
        return codes, codes_t, gathered_e2m1_scale(s, _E2M1_FORMATS[per_row])
    return _fp8_operand_of(x, amax, e5m2, per_row, rowmajor, transposed, gathered, measured, values, e2m1)


def _fp8_operand_of(x, amax, e5m2, per_row, rowmajor, transposed, gathered, measured, values, e2m1):
    if x.is_cuda and triton is not None:
        return triton_operand(x, amax, e5m2, per_row, rowmajor, transposed, gathered, measured, values=values,
                              e2m1=e2m1)
    return reference_operand(x, amax, e5m2, per_row, rowmajor, transposed, gathered, measured, values=values,
                             e2m1=e2m1)


@_fp8_operand.register_fake
def _(x, amax, e5m2, per_row, rowmajor, transposed, gathered, measured=None, values=False, e2m1=False):
    return _outputs(x, e5m2, per_row, rowmajor, transposed, values)


def _check_extras(fmt: Format, amax, per_row: bool, gathered, measured, values: bool, e2m1: bool) -> None:
    """``_call``'s checks of a delayed amax, a gathered weight and a measured amax (each needs one of them)."""
    if per_row and amax is not None:
        raise ValueError("fp8_cast: a delayed amax applies to per-tensor scales only")
    if values and (gathered is not None or measured is not None):
        raise ValueError("fp8_cast: bf16 values are made from the tensor itself (no gathered weight, no measured amax)")
    if e2m1 and gathered is not None and (gathered != torch.bfloat16 or amax is not None):
        raise ValueError(f"fp8_cast: a gathered E2M1 weight is read dequantized to bf16 with its own amax, not into "
                         f"{gathered}{' with a delayed amax' if amax is not None else ''}")
    if gathered is not None and not e2m1 and (per_row or amax is not None or gathered not in GATHERED_DTYPES):
        delayed = "with a delayed amax " if amax is not None else ""
        raise ValueError(f"fp8_cast: a gathered weight is read with its own per-tensor scale into one of "
                         f"{GATHERED_DTYPES}, not {fmt} {delayed}into {gathered}")
    if measured is not None and (per_row or amax is not None or gathered is not None or measured.numel() != 1):
        raise ValueError("fp8_cast: a measured amax is one number, max |t|, for a per-tensor scale with no delayed "
                         "amax and no gathered weight")


def _call(t: torch.Tensor, fmt: Format, amax, rowmajor: bool, transposed: bool, gathered: torch.dtype | None = None,
          measured: torch.Tensor | None = None, values: bool = False, e2m1: bool = False):
    # e2m1: fmt is one of `is_e2m1`, whose codes are E4M3
    dt = torch.float8_e4m3fn if e2m1 else fp8_dtype(fmt)
    if dt is None or t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"fp8_cast: {fmt} on a tensor of shape {tuple(t.shape)} is not one it makes (see applies)")
    per_row = fmt.granularity == "row"
    if per_row and transposed and t.shape[0] != 1 and not values:
        raise ValueError("fp8_cast: per-row scales lie along the contraction of the transposed layout")
    if amax is not None or gathered is not None or measured is not None:
        _check_extras(fmt, amax, per_row, gathered, measured, values, e2m1)
        if amax is not None:
            amax = amax.to(torch.float32)
    code = 0 if gathered is None else 1 + GATHERED_DTYPES.index(gathered)
    return _fp8_operand(t, amax, dt == torch.float8_e5m2, per_row, rowmajor, transposed, code, measured, values,
                        e2m1)


def operand(t: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None, transposed: bool = False,
            gathered: torch.dtype | None = None, measured: torch.Tensor | None = None):
    """``(codes, outer)`` of ``t`` (2-D) in ``fmt``, laid out as :class:`lowprec.kernels.Fp8` lays
    them out: row-major, or transposed with the token dimension padded to ``PAD`` (zero codes); the
    outer scale ``(1,)`` per tensor, ``(rows, 1)`` per row. ``amax``: a delayed per-tensor amax.
    ``gathered`` (a dtype of ``GATHERED_DTYPES``; per-tensor ``fmt``, no ``amax``): the operand, in
    ``fmt``, of ``t``'s codes in ``fmt`` dequantized to that dtype (what :func:`lowprec.fsdp.as_gathered`
    hands a layer), computed from ``t`` in the same two passes without writing that tensor out.
    ``measured`` (per-tensor ``fmt``, no ``amax``, no ``gathered``): ``t.abs().amax()``, which the
    caller computed (a compiled graph computes it in the kernel that makes ``t``): the amax pass is
    skipped, the result is the same. Only where :func:`applies`."""
    codes, codes_t, s = _call(t, fmt, amax, not transposed, transposed, gathered, measured)
    return (codes_t if transposed else codes), s


def operands(t: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None, gathered: torch.dtype | None = None,
             measured: torch.Tensor | None = None):
    """Both layouts from one pass (per-tensor scales): ``((codes, outer), (codes_t, outer))``.
    ``amax``, ``gathered``, ``measured``: as for :func:`operand`."""
    if fmt.granularity != "tensor":
        raise ValueError(f"fp8_cast.operands: both layouts need a per-tensor scale, not {fmt}")
    codes, codes_t, s = _call(t, fmt, amax, True, True, gathered, measured)
    return (codes, s), (codes_t, s)


def _e2m1_call(name: str, t: torch.Tensor, fmt: Format, amax, rowmajor: bool, transposed: bool, values: bool,
               gathered: torch.dtype | None = None):
    if not is_e2m1(fmt) or not t.is_floating_point():
        raise ValueError(f"fp8_cast.{name}: {fmt} on a tensor of shape {tuple(t.shape)} is not one it makes "
                         "(an FP4 E2M1 format scaled per tensor or per row, a non-empty 2-D floating tensor)")
    return _call(t, fmt, amax, rowmajor, transposed, gathered, values=values, e2m1=True)


def e2m1_operand(t: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None, transposed: bool = False,
                 gathered: torch.dtype | None = None):
    """``(codes, outer)`` of ``t`` (2-D) in an FP4 E2M1 format (:func:`is_e2m1`) as E4M3 codes, which hold
    every E2M1 value exactly, under the format's scales, laid out as :func:`operand` lays them out: the
    general quantizer's values cast to E4M3, bit for bit (a NaN's code aside, written ``0x7F``), in the same
    two passes as an FP8 operand's (the amax, then the scale, the division, the rounding to E2M1 and the
    codes). ``amax``: a delayed per-tensor amax. ``gathered=torch.bfloat16`` (no ``amax``): the operand of
    ``t``'s codes in ``fmt`` dequantized to bf16 (what :func:`lowprec.fsdp.as_gathered` hands a layer),
    from ``t`` itself (:func:`gathered_e2m1_scale`)."""
    codes, codes_t, s = _e2m1_call("e2m1_operand", t, fmt, amax, not transposed, transposed, False, gathered)
    return (codes_t if transposed else codes), s


def e2m1_operands(t: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None,
                  gathered: torch.dtype | None = None):
    """Both layouts of :func:`e2m1_operand` from one pass (per-tensor scales): ``((codes, outer), (codes_t,
    outer))``. ``amax``, ``gathered``: as for :func:`e2m1_operand`."""
    if fmt.granularity != "tensor":
        raise ValueError(f"fp8_cast.e2m1_operands: both layouts need a per-tensor scale, not {fmt}")
    codes, codes_t, s = _e2m1_call("e2m1_operands", t, fmt, amax, True, True, False, gathered)
    return (codes, s), (codes_t, s)


def gathered_e2m1_scale(s: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The scales of an E2M1 operand of ``g = as_gathered(t, fmt, bf16)`` from ``s``, those of ``t``'s: ``g``'s
    values are bf16(code × s), each within 2^-9 of code × s, so ``g``'s amax is bf16(6 s) (its code-6
    element: every row or tensor holds one, or is all zeros with s = 1), its scale bf16(6 s) / 6, and each of
    its values divided by that scale lies within 2^-8 of its code, nearer to it than to any other E2M1
    value: ``g``'s codes are ``t``'s. That holds while code × s stays a normal number (|t|'s row amax above
    2^-121); a row holding a NaN or an infinity has a NaN scale in both."""
    top = (s * 6.0).to(torch.bfloat16).float()  # g's amax: its code-6 element, as dequantize computes it
    return torch.where(torch.isfinite(top), scale_from_stat(top, fmt), float("nan"))


def e2m1_values(t: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None, rowmajor: bool = True,
                transposed: bool = False):
    """The operands of a bf16 tensor-core GEMM on ``t``'s FP4 E2M1 values, from the passes of
    :func:`e2m1_operand`: ``(values, values_t, outer)`` as :func:`values` gives them for an FP8 format."""
    return _e2m1_call("e2m1_values", t, fmt, amax, rowmajor, transposed, True)


def values(t: torch.Tensor, fmt: Format, amax: torch.Tensor | None = None, rowmajor: bool = True,
           transposed: bool = False):
    """The operands of a bf16 tensor-core GEMM on ``t``'s FP8 values (:class:`lowprec.kernels.Bf16TensorCore`),
    from the same two passes as :func:`operand`'s codes: ``(values, values_t, outer)``, ``values`` the codes'
    values in bf16 (exact), row-major, where ``rowmajor``; ``values_t`` the same transposed (``(K, M)``, no
    padding), where ``transposed``, multiplied by the scales first (fp32, then rounded to bf16) where they
    are per row, since they then lie along that layout's contraction; ``outer`` the scales, ``(1,)`` or
    ``(rows, 1)``, which apply to ``values`` as they stand and to a per-tensor ``values_t``.
    ``amax``: a delayed per-tensor amax. Empty tensors stand for the layouts not asked for."""
    return _call(t, fmt, amax, rowmajor, transposed, values=True)


def triton_delayed_operand(x: torch.Tensor, history: torch.Tensor, e5m2: bool, rowmajor: bool, transposed: bool,
                           cast_blocks: dict | None = None):
    """The delayed operator's result from Triton (CUDA): the pass, then one program that finishes it;
    ``(codes, codes_t, s, used)``, ``history`` pushed in place. ``cast_blocks``: as :func:`triton_operand`'s."""
    M, K = x.shape
    codes, codes_t, s = _outputs(x, e5m2, False, rowmajor, transposed)
    used = torch.empty((), dtype=torch.float32, device=x.device)
    rows = M + (-M) % PAD if transposed else M
    c = cast_blocks or (DELAYED_BLOCKS_TRANSPOSED if transposed else DELAYED_BLOCKS)
    grid = (triton.cdiv(rows, c["BLOCK_M"]), triton.cdiv(K, c["BLOCK_K"]))
    n = grid[0] * grid[1]
    partial = torch.empty(2 * n, dtype=torch.int32, device=x.device)  # each program's two maxima
    out, out_t = codes.view(torch.uint8), codes_t.view(torch.uint8)
    strides = (x.stride(0), x.stride(1), codes.stride(0) if rowmajor else 0, codes_t.stride(0) if transposed else 0)
    H = history.numel()
    const = dict(TOP=57344.0 if e5m2 else 448.0, E5M2=e5m2, ROWMAJOR=rowmajor, TRANSPOSED=transposed,
                 HB=triton.next_power_of_2(H))
    _delayed_kernel[grid](x, history, partial, out, out_t, M, K, rows, H, *strides, **const, **c, FAST=FAST_QUOTIENT,
                          EVEN=_even(M, K, rows, c))
    _delayed_finish[(1,)](x, history, partial, s, used, out, out_t, M, K, rows, H, n, *strides, **const,
                          **DELAYED_FINISH_BLOCKS)
    return codes, codes_t, s, used


def reference_delayed_operand(x: torch.Tensor, history: torch.Tensor, e5m2: bool, rowmajor: bool, transposed: bool):
    """The delayed operator's result computed with tensor operations (CPU, or no Triton): the amax
    :func:`lowprec.scaling.delayed_amax` gives (which pushes the history), then :func:`reference_operand`."""
    used = delayed_amax(history, x)
    return (*reference_operand(x, used, e5m2, False, rowmajor, transposed), used)


@torch.library.custom_op("lowprec::fp8_operand_delayed", mutates_args=("history",))
def _fp8_operand_delayed(x: torch.Tensor, history: torch.Tensor, e5m2: bool, rowmajor: bool, transposed: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if x.is_cuda and triton is not None:
        return triton_delayed_operand(x, history, e5m2, rowmajor, transposed)
    return reference_delayed_operand(x, history, e5m2, rowmajor, transposed)


@_fp8_operand_delayed.register_fake
def _(x, history, e5m2, rowmajor, transposed):
    return (*_outputs(x, e5m2, False, rowmajor, transposed), x.new_empty((), dtype=torch.float32))


def delayed_operands(t: torch.Tensor, fmt: Format, history: torch.Tensor, rowmajor: bool = True,
                     transposed: bool = True):
    """Delayed scaling's operands of ``t`` (2-D) in ``fmt`` (per-tensor), in one read of ``t`` on CUDA:
    ``(op, op_t, used)``, ``op`` / ``op_t`` as :func:`operands` gives them with ``amax=used`` (None for a
    layout not asked for), ``used`` the amax they are scaled by, which
    :func:`lowprec.scaling.delayed_amax` gives, and ``history`` pushed as it pushes it: the same codes,
    scale and history bit for bit. The scale comes from the history, so each program of the pass writes
    its codes at once; one program after the pass pushes the history. Where the codes the pass wrote do
    not stand (the history is all zeros, its first step, and ``t`` is not: the scale is then ``t``'s own
    amax; or ``t`` holds a NaN or an infinity: the scale is NaN, every code NaN) that program writes all
    of them again alone, a slow pass that only such a step takes."""
    dt = fp8_dtype(fmt)
    if dt is None or fmt.granularity != "tensor" or t.dim() != 2 or t.numel() == 0:
        raise ValueError(f"fp8_cast.delayed_operands: {fmt} on a tensor of shape {tuple(t.shape)} is not one it "
                         "makes (a per-tensor FP8 format, a non-empty 2-D tensor)")
    if (history.dim() != 1 or history.numel() == 0 or not history.is_floating_point() or history.device != t.device
            or not history.is_contiguous()):
        raise ValueError(f"fp8_cast.delayed_operands: the history is a non-empty contiguous 1-D float tensor on "
                         f"{t.device}, not {tuple(history.shape)} {history.dtype} with strides {history.stride()} "
                         f"on {history.device}")
    codes, codes_t, s, used = _fp8_operand_delayed(t, history, dt == torch.float8_e5m2, rowmajor, transposed)
    return (codes, s) if rowmajor else None, (codes_t, s) if transposed else None, used


# the format of each (E5M2?, per row?) the operator is called with: its reference quantizes in it
_FORMATS = {(e, r): get_format("fp8_e5m2" if e else "fp8_e4m3", granularity="row" if r else "tensor")
            for e in (False, True) for r in (False, True)}
_E2M1_FORMATS = {r: get_format("fp4_e2m1", granularity="row" if r else "tensor") for r in (False, True)}
_E2M1 = _E2M1_FORMATS[False]


__all__ = ["GATHERED_DTYPES", "PAD", "applies", "delayed_operands", "e2m1_operand", "e2m1_operands", "e2m1_values",
           "fp8_dtype", "gathered_e2m1_scale", "is_e2m1", "operand", "operands", "reference_cast",
           "reference_delayed_operand", "reference_operand", "scales", "triton_delayed_operand", "triton_operand",
           "values"]
