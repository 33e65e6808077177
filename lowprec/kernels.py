"""The kernel registry: every way a GEMM ``C = A @ B^T`` of a quantized layer can run.

A kernel quantizes each operand exactly per its format and multiplies. An operand is a pair
``(values, outer)``: ``values`` hold the quantized elements, ``outer`` (fp32, ``(1,)`` per tensor,
``(rows, 1)`` per row, or None) a scale that factors out of the GEMM and multiplies ``C``'s rows
(for ``A``) or columns (for ``B``). A scale can factor out only if it is constant along the
contraction: per-tensor scales always, per-row (per-token, per-output-channel) scales only while the
operand is not transposed. Every other scale is folded into ``values``.

==========================  =====================================================================
``emulated``                The reference: operands quantized then dequantized to fp32
                            (:func:`lowprec.scaling.fake_quant`), fp32 matmul. Any format, device.
``fp8_tensorwise``          ``torch._scaled_mm`` on FP8 tensor cores (CUDA, compute capability
                            >= 8.9): both operands on an FP8 grid with per-tensor scales. FP8
                            grids hold E4M3/E5M2 and, exactly, ternary, binary and E2M1 codes.
``fp8_rowwise``             The same with per-row scales where they factor out (CUDA >= 9.0).
``int8_tensorcore``         ``torch._int_mm`` on int8 tensor cores (CUDA, compute capability >= 8.0; or the CPU),
                            int32 accumulation: both operands integers within +-127 with per-tensor
                            or (untransposed) per-row scales (int8, ternary, binary), fprop and
                            dgrad (wgrad contracts over the tokens, whose count a plan does not
                            know: int32 could overflow). Opt-in: not in ``AUTO_ORDER``
                            (:data:`AUTO_ORDER_INT8` tries it before ``bf16_tensorcore``).
``bf16_tensorcore``         Quantized element values (and folded scales) in bf16, bf16 tensor-core
                            GEMM with fp32 accumulation, outer scales on the fp32 output. Exact
                            whenever the folded values fit bf16 (FP8/FP4/int8/ternary/binary
                            codes, MX power-of-two and NVFP4 E4M3 block scales); otherwise it
                            rounds each operand once more (relative error <= 2^-9).
``matmul``                  Both operands unquantized: a plain matmul in their dtype.
``bf16``                    Backend ``unquantized`` only: formats NOT applied, plain bf16 GEMM.
``packed_ternary_gemv``     fprop with at most ``GEMV_MAX_ROWS`` tokens, native ternary weight:
                            reads the 2-bit codes directly (:mod:`lowprec.gemv`).
==========================  =====================================================================

Each kernel answers ``check_support(gemm, a, b, device, shape) -> (ok, reason)``; a plan
(:mod:`lowprec.plan`) asks them in order and keeps the first that can run. ``exact_for`` says
whether a kernel multiplies the quantized operands with no further rounding (accumulation order
aside), i.e. whether it equals the reference up to fp32 summation order.
"""

from __future__ import annotations

import abc
import functools

import torch
import torch.nn.functional as F

from . import fp8_cast, gemv
from .common import to_dtype
from .formats import Format
from .scaling import (
    CHUNK_ELEMENTS,
    delayed_amax,
    fake_quant,
    from_groups,
    quantize_groups,
    quantize_large,
    to_groups,
)

triton = fp8_cast.triton  # None without Triton (the CPU build of torch)
GEMV_MAX_ROWS = gemv.GEMV_MAX_ROWS
# operands of each GEMM that are transposed, i.e. whose quantization rows lie along the contraction
TRANSPOSED = {"fprop": (False, False), "dgrad": (False, True), "wgrad": (True, True)}
_MM_FP32_OUT = hasattr(torch.ops.aten.mm, "dtype")  # bf16 x bf16 -> fp32 output (CUDA)


# ---- operand grids ---------------------------------------------------------------------------
def fp8_grid(fmt: Format | None) -> torch.dtype | None:
    """The float8 dtype that holds every element of ``fmt`` exactly, with a per-tensor or per-row
    scale usable by ``_scaled_mm``; None if there is none."""
    if fmt is None or not fmt.is_scaled or fmt.granularity not in ("tensor", "row"):
        return None
    if fmt.kind in ("ternary", "binary"):
        return torch.float8_e4m3fn
    if fmt.kind == "float" and (fmt.exp_bits, fmt.man_bits) in ((4, 3), (2, 1)):
        return torch.float8_e4m3fn
    if fmt.kind == "float" and (fmt.exp_bits, fmt.man_bits) == (5, 2):
        return torch.float8_e5m2
    return None


def int8_grid(fmt: Format | None) -> int:
    """The largest magnitude of ``fmt``'s elements if they are integers within int8 (+-127) under a
    per-tensor or per-row scale, that an int8 GEMM multiplies as they are; else 0."""
    if fmt is None or not fmt.is_scaled or fmt.granularity not in ("tensor", "row"):
        return 0
    if fmt.kind in ("ternary", "binary"):
        return 1
    return int(fmt.max_value) if fmt.kind == "int" and fmt.max_value <= 127 else 0


def bf16_exact(fmt: Format | None, transposed: bool) -> bool:
    """Whether an operand of ``fmt`` enters a bf16 GEMM with no rounding (None: the operand is the
    compute dtype, taken as exact)."""
    if fmt is None:
        return True
    elements_fit = (fmt.kind == "float" and fmt.man_bits <= 7 and fmt.exp_bits <= 8) or \
        (fmt.kind == "int" and fmt.max_value <= 256) or fmt.kind in ("ternary", "binary")
    if not elements_fit:
        return False
    if not fmt.is_scaled or fmt.granularity == "tensor" or fmt.scale in ("e8m0", "nvfp4"):
        return True  # outer scale, or a folded block scale that keeps the values exact
    return fmt.granularity == "row" and not transposed


# ---- operands: (values, outer scale) -----------------------------------------------------------
def split(t: torch.Tensor, fmt: Format, *, rounding="nearest", amax=None, transposed=False):
    """``(values, outer)`` of ``t`` quantized per ``fmt`` in ``t``'s own layout (fp32 values in
    ``t``'s shape, already transposed if ``transposed``); see the module doc."""
    xg, groups = to_groups(t, fmt)
    values, s, stored, g = quantize_groups(xg, fmt, rounding, None, amax)
    return _outer(values, s, stored, g, groups, fmt, transposed)


def split_qtensor(q, transposed=False):
    """``(values, outer)`` of a packed :class:`~lowprec.QTensor` (no re-quantization)."""
    groups = q._groups()
    s = q.group_scales()
    g = q.global_scale
    return _outer(q.values(), s, q.scale, g, groups, q.fmt, transposed)


def _outer(values, s, stored, g, groups, fmt: Format, transposed: bool):
    if fmt.is_scaled and (fmt.granularity == "tensor" or (fmt.granularity == "row" and not transposed)):
        outer = s.reshape(1) if fmt.granularity == "tensor" else s.reshape(-1, 1)
    elif fmt.scale == "nvfp4":  # fold the E4M3 block scale (exact), keep the fp32 tensor scale
        outer, values = g.reshape(1), values * stored.to(torch.float32).reshape(-1, 1)
    else:
        outer, values = None, values * s
    v = from_groups(values, groups)
    return (v.t() if transposed else v), outer


def _plain_cast(fmt: Format) -> torch.dtype | None:
    """The torch dtype whose cast is ``fmt``'s rounding to nearest, for an unscaled float format with
    infinities (bf16, fp16, fp8 E5M2), else None."""
    if fmt.kind != "float" or fmt.is_scaled or not fmt.has_inf or fmt.bits >= 32:
        return None
    return fmt.torch_dtype


def _saturating_cast(t: torch.Tensor, fmt: Format) -> torch.Tensor:
    """``t`` rounded to nearest onto ``fmt`` (see ``_plain_cast``), in its dtype: finite values
    clamped to +-max first (saturation), inf and NaN kept; a tensor already in that dtype is
    returned as it is (its finite values are within range)."""
    dt = _plain_cast(fmt)
    if t.dtype == dt:
        return t
    x = t.float()
    return torch.where(torch.isfinite(x), x.clamp(-fmt.max_value, fmt.max_value), x).to(dt)


def _fp16_rounded(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` (finite values within fp16's range) rounded to the nearest fp16 value, ties to
    even, in fp32, computed on the bits: ``x.to(float16).float()`` without an fp16 intermediate,
    which inductor may drop when it fuses a chain of casts (it rewrites fp32 -> fp16 -> bf16 as
    fp32 -> bf16, and its Triton kernels keep fp16 intermediates in fp32), changing the values by
    double rounding. Subnormals (|x| < 2^-14) round to multiples of 2^-24; inf and NaN are kept."""
    bits = x.view(torch.int32)
    normal = ((bits + (0xFFF + ((bits >> 13) & 1))) & -0x2000).view(torch.float32)  # 10 mantissa bits, RNE
    subnormal = torch.round(x * 2.0**24) * 2.0**-24  # exact scaling; round() is half to even
    out = torch.where(x.abs() < 2.0**-14, subnormal, normal)
    return torch.where(torch.isnan(x), x, out)


def _bf16_rounded(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``x`` rounded to the nearest bf16 value, ties to even, in fp32, computed on the bits (as
    :func:`_fp16_rounded`, which see); the identity on values that are bf16 already; NaN kept."""
    bits = x.view(torch.int32)
    out = ((bits + (0x7FFF + ((bits >> 16) & 1))) & -0x10000).view(torch.float32)
    return torch.where(torch.isnan(x), x, out)


def _bf16_values(t: torch.Tensor, fmt: Format) -> torch.Tensor:
    """The bf16 tensor-core operand values of ``t`` for a plain-cast ``fmt`` (see ``_plain_cast``):
    the saturating cast, then bf16 (through fp32, as the general path: NaN bits). Under
    ``torch.compile`` fp16 is rounded on the bits (:func:`_fp16_rounded`), so that the compiled
    kernel gets the same values; eager, the two casts (fewer kernels) give them."""
    if _plain_cast(fmt) == torch.float16 and t.dtype != torch.float16 and torch.compiler.is_compiling():
        x = t.float()
        if t.dtype == torch.bfloat16:  # inductor folds y.to(bf16).float() in one graph into y: rounded again
            x = _bf16_rounded(x)
        x = torch.where(torch.isfinite(x), x.clamp(-fmt.max_value, fmt.max_value), x)
        return _fp16_rounded(x).to(torch.bfloat16)
    v = _saturating_cast(t, fmt)
    return v if v.dtype == torch.bfloat16 else v.float().to(torch.bfloat16)


# Eager, on CUDA, `_plain_values` writes the bf16 operand values of an unscaled fp16 or bf16 format in one
# Triton kernel (one read of the tensor, one write of the values) instead of the cast's chain of tensor
# operations (to fp32, the finite test, the clamp, the selection, the casts: ten passes over a bf16 tensor,
# with fp32 temporaries; beyond CHUNK_ELEMENTS, chunk by chunk); the same values. A recurrence derives its
# weight's operand this way once per loop.
PLAIN_CAST_IN_ONE_KERNEL = True
_PLAIN_BLOCK = 4096  # elements a program

if triton is not None:
    tl = triton.language

    @triton.jit
    def _plain_values_kernel(x_ptr, y_ptr, n, TOP: tl.constexpr, FP16: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.where(tl.abs(x) < float("inf"), tl.minimum(tl.maximum(x, -TOP), TOP), x)  # finite: saturated
        if FP16:  # rounded to nearest even (Triton's downcast), then widened exactly
            x = x.to(tl.float16).to(tl.float32)
        tl.store(y_ptr + offs, x.to(tl.bfloat16), mask=mask)


def _plain_values_applies(t: torch.Tensor, fmt: Format) -> bool:
    """Whether `_plain_values` writes ``t``'s values in its one kernel: CUDA with Triton, eager (a compiled
    graph fuses the tensor operations itself), an fp16 or bf16 target, a contiguous, nonempty float tensor
    that is not bf16 already for the bf16 format (that is its own operand)."""
    dt = _plain_cast(fmt)
    return (PLAIN_CAST_IN_ONE_KERNEL and triton is not None and t.is_cuda and not torch.compiler.is_compiling()
            and dt in (torch.float16, torch.bfloat16) and not t.dtype == dt == torch.bfloat16
            and t.dtype in (torch.float32, torch.bfloat16, torch.float16) and t.is_contiguous() and t.numel() > 0)


def _plain_values(t: torch.Tensor, fmt: Format) -> torch.Tensor:
    """`_bf16_values` (the values, NaN kept: its bits may be another NaN's), in one kernel where
    `_plain_values_applies`."""
    if not _plain_values_applies(t, fmt):
        return _bf16_values(t, fmt)
    y = torch.empty(t.shape, dtype=torch.bfloat16, device=t.device)
    with torch.cuda.device(t.device):
        _plain_values_kernel[(triton.cdiv(t.numel(), _PLAIN_BLOCK),)](
            t, y, t.numel(), TOP=float(fmt.max_value), FP16=_plain_cast(fmt) == torch.float16, BLOCK=_PLAIN_BLOCK,
            num_warps=8)
    return y


@functools.cache
def _bf16_cast(fmt: Format):
    """One function object per format (a compiled caller guards on its identity)."""
    return functools.partial(_bf16_values, fmt=fmt)


def _pad_last(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    """Zero-pad the last (contraction) dimension: zeros add nothing to the GEMM."""
    pad = (-t.shape[-1]) % multiple
    if not pad:
        return t
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # pad the bytes: 0x00 is +0.0
        return F.pad(t.view(torch.uint8), (0, pad)).view(t.dtype)
    return F.pad(t, (0, pad))


def _scale_output(c: torch.Tensor, sa, sb) -> torch.Tensor:
    if sa is not None:
        c = c * sa
    if sb is not None:
        c = c * sb.reshape(1, -1)
    return c


# ---- kernels ------------------------------------------------------------------------------------
class Kernel:
    """One way to run a GEMM: what it supports (``check_support``) and whether it is exact there."""

    name = ""
    summary = ""

    def check_support(self, gemm, a, b, device, shape) -> tuple[bool, str]:
        return True, "ok"

    def exact_for(self, gemm, a, b) -> bool:
        return True


class GemmKernel(Kernel, abc.ABC):
    """A kernel that prepares its operands itself: ``operand`` / ``operand_from_qtensor`` (in the
    layout ``A`` or ``B`` of ``C = A @ B^T``), ``transposed`` and ``mm``."""

    @abc.abstractmethod
    def operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        """``(values, outer)`` of ``t`` quantized per ``fmt`` (None: unquantized)."""

    def operand_from_qtensor(self, q, transposed=False):
        return self.operand(q.dequantize(torch.float32), None, transposed=transposed)

    @abc.abstractmethod
    def mm(self, A, B, out_dtype, fast_accum=False) -> torch.Tensor:
        """``A @ B^T`` with the outer scales applied, in ``out_dtype``: a tensor of its own, not one
        an earlier operation returned as well (:func:`lowprec.common.to_dtype` says why)."""

    def transposed(self, op):
        """The operand of the transposed tensor, from an untransposed one (backward reuses the
        weight operand of fprop this way); None where the outer scale would lie along the
        contraction (it must be folded: quantize again)."""
        v, outer = op
        return None if (outer is not None and outer.numel() != 1) else (v.t(), outer)

    def operands(self, t, fmt, *, rounding="nearest", amax=None):
        """``(op, op_t)``: ``t``'s operand and, where this kernel makes both in one pass, the operand
        of ``t`` transposed (what ``transposed(op)`` gives); else ``op_t`` is None."""
        return self.operand(t, fmt, rounding=rounding, amax=amax), None

    def delayed_operands(self, t, fmt, history, *, rounding="nearest"):
        """``(op, op_t, amax)``: ``operands(t, fmt, amax=amax)`` under delayed scaling, ``amax`` the one
        :func:`lowprec.scaling.delayed_amax` gives (it pushes ``t``'s amax into ``history``, in place)."""
        amax = delayed_amax(history, t)
        return (*self.operands(t, fmt, rounding=rounding, amax=amax), amax)

    def reads_gathered(self, fmt, dtype) -> bool:
        """Whether ``gathered_operands`` makes, from a weight's master, the operands in ``fmt`` of that
        weight as a data-parallel run's ranks hold it: gathered in ``fmt``, dequantized to ``dtype``
        (:func:`lowprec.fsdp.as_gathered`), without that tensor written out."""
        return False

    def gathered_operands(self, w, fmt, dtype, *, rowmajor=True, transposed=True):
        """``(op, op_t)`` of ``as_gathered(w, fmt, dtype)`` in ``fmt`` (each layout asked for, else
        None), computed from ``w``: only where ``reads_gathered``."""
        raise NotImplementedError(f"{self.name} does not read a gathered weight from its master")

    def fusable_operand(self, t, fmt, *, rounding="nearest", amax=None):
        """``operand(t, fmt)`` (untransposed) as tensor operations only, for a caller that computes it
        in a compiled function together with the work that produced ``t`` (an LSTM step's cell: for
        a few rows, one fused kernel costs less than passes of their own)."""
        return self.operand(t, fmt, rounding=rounding, amax=amax)

    def plain_cast(self, fmt, rounding="nearest"):
        """A function ``t -> values`` with ``operand(t, fmt, rounding=rounding) == (values, None)``
        (untransposed) that reads nothing but ``t``, elementwise, where this kernel has one for
        ``fmt``; else None. A caller may compute it inside its own fused kernel (an LSTM cell
        computes the next step's GEMM input together with the step's state)."""


class Emulated(GemmKernel):
    name = "emulated"
    summary = "reference: fake-quantized fp32 operands, fp32 matmul"

    def operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        v = t.float() if fmt is None else fake_quant(t, fmt, rounding=rounding, amax=amax)
        return (v.t() if transposed else v), None

    def operand_from_qtensor(self, q, transposed=False):
        v = q.dequantize(torch.float32)
        return (v.t() if transposed else v), None

    def mm(self, A, B, out_dtype, fast_accum=False):
        return to_dtype(A[0] @ B[0].t(), out_dtype)


class Matmul(GemmKernel):
    name = "matmul"
    summary = "unquantized operands: matmul in their dtype"

    def check_support(self, gemm, a, b, device, shape):
        return (a is None and b is None), "operands are quantized"

    def operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        return (t.t() if transposed else t), None

    def mm(self, A, B, out_dtype, fast_accum=False):
        dt = torch.promote_types(A[0].dtype, B[0].dtype)
        return to_dtype(A[0].to(dt) @ B[0].to(dt).t(), out_dtype)


class Unquantized(Matmul):
    name = "bf16"
    summary = "formats NOT applied: plain bf16 GEMM (backend unquantized)"

    def exact_for(self, gemm, a, b):
        return a is None and b is None

    def operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        t = t.to(torch.bfloat16)
        return (t.t() if transposed else t), None


# True (the default): an FP4 E2M1 operand with a per-tensor or per-row absmax scale (the paper policy's
# feed-forward and head weights) is made by the FP8 operand's two Triton passes (lowprec.fp8_cast.e2m1_operand:
# E4M3 codes for the FP8 kernels; lowprec.fp8_cast.e2m1_values: bf16 values for bf16_tensorcore); False: by the
# general quantizer's tensor operations, which the compiler fuses into kernels of its own. The same codes and
# values either way; in one process on an H200 a compiled 600M step under the paper policy took 2-3% less time
# with the passes (its bf16 dgrad takes fprop's E4M3 codes: one amax and one cast per weight)
E2M1_FROM_PASSES = True


# True (the default): an FP4 E2M1 weight that reaches its layer gathered in its format and dequantized to bf16
# (one process computing in bf16 parameters as a sharded run's ranks do) has its FP8 operand made from its
# master, the dequantized copy not written (the same codes and scales: lowprec.fp8_cast.gathered_e2m1_scale).
# False: the layer is handed the dequantized copy and quantizes it (one more quantization of the weight a
# step). In one process on an H200 a compiled 600M step under the paper policy in bf16 parameters took 3% less
# time from the master, and its first compile half as long (experiments.bench_train's @e2m1-from-copy)
E2M1_GATHERED_FROM_MASTER = True


def _e2m1_from_passes(t, fmt, rounding) -> bool:
    return (E2M1_FROM_PASSES and fp8_cast.is_e2m1(fmt, rounding) and t.dim() == 2 and t.numel() > 0
            and t.is_floating_point())


class Bf16TensorCore(GemmKernel):
    name = "bf16_tensorcore"
    summary = "quantized values in bf16 on bf16 tensor cores, outer scales on the fp32 output"

    def check_support(self, gemm, a, b, device, shape):
        return (device.type == "cuda"), f"device {device} is not CUDA"

    def exact_for(self, gemm, a, b):
        ta, tb = TRANSPOSED[gemm]
        return bf16_exact(a, ta) and bf16_exact(b, tb)

    # True: on CUDA, an operand in an E4M3/E5M2 format with a per-tensor or per-row scale is made by the FP8
    # operand's two Triton passes (lowprec.fp8_cast), which write the codes' values in bf16 (both layouts at
    # once where backward reuses one); False (the default): the general quantizer's tensor operations, which
    # a compiled step fuses into the kernels around them. The same values either way; in a compiled 600M
    # step under the paper policy on an H200 the passes made the step slower (the operator's input must be
    # stored, so a GELU's output is computed again for it, and a gradient's amax is taken twice)
    fp8_values_from_passes = False
    # True: compiled, an operand with per-row scales quantizes the tensor as stored (a no-op view the compiler
    # must store first) instead of its expression: the compiler otherwise fuses the row reduction and the
    # quantization into the kernel that makes the tensor, computing it again in each of that kernel's loops
    # (a GELU's backward, three times), and quantizing the value it computes in fp32 before its rounding to
    # bf16: eager's values only with the view. Off by default: a compiled 600M step under the paper policy
    # on an H200 took 3% longer with it
    row_operands_read_stored = False

    def _from_passes(self, t, fmt, rounding):
        # lowprec.fp8_cast's function that makes this operand's values from its passes, or None
        if self.fp8_values_from_passes and t.is_cuda and fp8_cast.applies(t, fmt, rounding):
            return fp8_cast.values
        return fp8_cast.e2m1_values if _e2m1_from_passes(t, fmt, rounding) else None

    def operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        if passes := self._from_passes(t, fmt, rounding):  # the values in bf16 from lowprec.fp8_cast's passes
            v, v_t, s = passes(t, fmt, amax=amax, rowmajor=not transposed, transposed=transposed)
            return (v_t, s if fmt.granularity == "tensor" else None) if transposed else (v, s)
        if (self.row_operands_read_stored and fmt is not None and fmt.is_scaled and fmt.granularity == "row"
                and torch.compiler.is_compiling()):
            t = torch.as_strided(t, t.shape, t.stride())
        return self._general_operand(t, fmt, rounding=rounding, amax=amax, transposed=transposed)

    def operands(self, t, fmt, *, rounding="nearest", amax=None):
        if passes := self._from_passes(t, fmt, rounding):  # both layouts from the same two passes
            v, v_t, s = passes(t, fmt, amax=amax, rowmajor=True, transposed=True)
            return (v, s), (v_t, s if fmt.granularity == "tensor" else None)
        return super().operands(t, fmt, rounding=rounding, amax=amax)

    def fusable_operand(self, t, fmt, *, rounding="nearest", amax=None):
        return self._general_operand(t, fmt, rounding=rounding, amax=amax)  # tensor operations: the same values

    def _general_operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        if fmt is None:
            v, outer = t, None
            v = v.t() if transposed else v
        elif rounding == "nearest" and _plain_cast(fmt) is not None and (
                t.numel() <= CHUNK_ELEMENTS or t.dtype == _plain_cast(fmt) == torch.bfloat16
                or _plain_values_applies(t, fmt)):
            # an unscaled format torch has a dtype for: the saturating cast, in few passes (a
            # recurrence calls this at every step) or one kernel; the same values as the general
            # path. A large tensor otherwise goes piece by piece below (no float32 copies of it)
            v = _plain_values(t, fmt)
            return (v.t() if transposed else v), None
        elif t.numel() > CHUNK_ELEMENTS and not torch.compiler.is_compiling() and fmt.scale != "nvfp4":
            # eager, e.g. a 16384 x 65536 weight: bf16 values written piece by piece, no float32
            # copy of it; the scales that stay outside the GEMM as in split(), the others folded
            outside = fmt.is_scaled and (fmt.granularity == "tensor" or (fmt.granularity == "row" and not transposed))
            v, s = quantize_large(t, fmt, rounding=rounding, amax=amax, out_dtype=torch.bfloat16, scaled=not outside)
            outer = (s.reshape(1) if fmt.granularity == "tensor" else s.reshape(-1, 1)) if outside else None
            return (v.t() if transposed else v), outer
        else:
            v, outer = split(t, fmt, rounding=rounding, amax=amax, transposed=transposed)
        return v.to(torch.bfloat16), outer

    def operand_from_qtensor(self, q, transposed=False):
        v, outer = split_qtensor(q, transposed)
        return v.to(torch.bfloat16), outer

    def plain_cast(self, fmt, rounding="nearest"):
        if fmt is None or rounding != "nearest" or _plain_cast(fmt) is None:
            return None
        return _bf16_cast(fmt)

    def transposed(self, op):
        """Per-row scales fold into the values, as quantizing the transposed tensor would: the
        element values are exact in bf16, so the fp32 products and their bf16 rounding are the same.
        An int8 kernel's operand (integers within +-127) and an FP8 kernel's row-major one (E4M3/E5M2
        codes) are taken in bf16 the same way."""
        v, outer = op
        if outer is None or outer.numel() == 1:
            return v.to(torch.bfloat16).t(), outer
        return (v.float() * outer).to(torch.bfloat16).t(), None

    def mm(self, A, B, out_dtype, fast_accum=False):
        """fp32 accumulation; with no outer scale to apply and a bf16 output (activations computed in
        bf16), the GEMM rounds its accumulators to bf16 itself: one kernel, 2 bytes written per
        element instead of an fp32 product and a cast (on CUDA torch's
        ``allow_bf16_reduced_precision_reduction`` applies to it, as to any bf16 matmul)."""
        a, b = A[0], B[0].t()
        if A[1] is None and B[1] is None and out_dtype == torch.bfloat16:
            return a @ b
        c = torch.mm(a, b, out_dtype=torch.float32) if (_MM_FP32_OUT and a.is_cuda) else (a @ b).float()
        return to_dtype(_scale_output(c, A[1], B[1]), out_dtype)


class _CodesKernel(GemmKernel):
    """A kernel that multiplies element codes in a dtype of their own (``code_dtype(fmt)``), the
    tensor or untransposed row scales kept outside the GEMM: both operands row-major ``(rows, K)``
    (``_layout``)."""

    @staticmethod
    @abc.abstractmethod
    def code_dtype(fmt) -> torch.dtype:
        """The dtype holding every element of ``fmt`` exactly."""

    def operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        dtype = self.code_dtype(fmt)
        if t.numel() > CHUNK_ELEMENTS and not torch.compiler.is_compiling() and fmt.granularity != "block":
            # eager, e.g. a 16384 x 65536 weight: no float32 copy of it
            codes, s = quantize_large(t, fmt, rounding=rounding, amax=amax, out_dtype=dtype, scaled=False)
            outer = s.reshape(1) if fmt.granularity == "tensor" else s.reshape(-1, 1)
        else:
            v, outer = split(t, fmt, rounding=rounding, amax=amax)
            codes = v.to(dtype)
        return self._layout(codes, outer, transposed)

    def operand_from_qtensor(self, q, transposed=False):
        v, outer = split_qtensor(q)
        return self._layout(v.to(self.code_dtype(q.fmt)), outer, transposed)

    @staticmethod
    def _layout(codes, outer, transposed):
        return (codes.t().contiguous() if transposed else codes), outer

    def transposed(self, op):
        return None if op[1].numel() != 1 else self._layout(op[0], op[1], True)


class Fp8(_CodesKernel):
    """FP8 ``torch._scaled_mm``; ``rowwise`` admits per-row outer scales."""

    def __init__(self, rowwise: bool):
        self.rowwise = rowwise
        self.name = "fp8_rowwise" if rowwise else "fp8_tensorwise"
        self.summary = f"FP8 tensor cores, {'per-row' if rowwise else 'per-tensor'} scales"

    def check_support(self, gemm, a, b, device, shape):
        ok, why = device.fp8_tensor_cores
        if not ok:
            return False, why
        if self.rowwise and device.capability < (9, 0):
            return False, f"{device}: row-wise FP8 GEMMs need compute capability 9.0"
        grids = [fp8_grid(a), fp8_grid(b)]
        for fmt, grid, transposed in zip((a, b), grids, TRANSPOSED[gemm]):
            if grid is None:
                return False, f"{fmt or 'unquantized'} is not on an FP8 grid with tensor/row scales"
            if fmt.granularity == "row" and transposed:
                return False, f"{gemm}: per-row scales of {fmt} lie along the contraction"
        if grids[0] == grids[1] == torch.float8_e5m2:
            return False, "E5M2 x E5M2 is not an FP8 tensor-core GEMM"
        rows = any(f.granularity == "row" for f in (a, b))
        if rows != self.rowwise:
            return False, "per-row scales" if rows else "per-tensor scales only"
        if any(n % 16 for n in shape):
            return False, f"layer {shape[0]}->{shape[1]}: FP8 GEMMs need dimensions divisible by 16"
        return True, "ok"

    @staticmethod
    def code_dtype(fmt):
        return fp8_grid(fmt)

    # True: compiled, a per-tensor operand's amax is a reduction in the graph, which the compiler fuses into
    # the kernel that makes the tensor where it can (a layer norm, its backward), instead of a pass of its
    # own; False (the default): the operator's own amax pass, as in eager. The same codes either way; in one
    # process on an H200 the training step ran as fast either way, within the run-to-run spread
    amax_in_graph = False
    # with the amax in the graph: the reduction reads the tensor as stored for the operator (a no-op view the
    # compiler must store first), so the tensor is computed once (a layer norm's kernel also takes the amax, a
    # GELU's output gets a reduction kernel of its own); False: the reduction reads the tensor's expression,
    # which the compiler may compute twice (a GELU once in the reduction, once in the kernel storing it)
    amax_reads_stored = True

    def _measured(self, t, fmt, amax):
        if (self.amax_in_graph and amax is None and fmt.granularity == "tensor"
                and torch.compiler.is_compiling()):
            if self.amax_reads_stored:
                t = torch.as_strided(t, t.shape, t.stride())
            return t.abs().amax()
        return None

    def operand(self, t, fmt, *, rounding="nearest", amax=None, transposed=False):
        # an E4M3/E5M2 format with a per-tensor or per-row scale: the amax, then the codes in the layout
        # asked for, each one Triton pass on CUDA (lowprec.fp8_cast); the general quantizer's codes
        if fp8_cast.applies(t, fmt, rounding):
            return fp8_cast.operand(t, fmt, amax=amax, transposed=transposed, measured=self._measured(t, fmt, amax))
        if _e2m1_from_passes(t, fmt, rounding):
            return fp8_cast.e2m1_operand(t, fmt, amax=amax, transposed=transposed)
        return super().operand(t, fmt, rounding=rounding, amax=amax, transposed=transposed)

    def operands(self, t, fmt, *, rounding="nearest", amax=None):
        if fp8_cast.applies(t, fmt, rounding) and fmt.granularity == "tensor":
            return fp8_cast.operands(t, fmt, amax=amax, measured=self._measured(t, fmt, amax))
        return super().operands(t, fmt, rounding=rounding, amax=amax)

    def delayed_operands(self, t, fmt, history, *, rounding="nearest"):
        # a per-tensor E4M3/E5M2 format: both layouts in one read of t, the history pushed by the same pass
        if fp8_cast.applies(t, fmt, rounding) and fmt.granularity == "tensor":
            return fp8_cast.delayed_operands(t, fmt, history)
        return super().delayed_operands(t, fmt, history, rounding=rounding)

    def fusable_operand(self, t, fmt, *, rounding="nearest", amax=None):
        return super().operand(t, fmt, rounding=rounding, amax=amax)  # the general quantizer: the same codes

    def reads_gathered(self, fmt, dtype):
        if fp8_cast.is_e2m1(fmt):  # from the FP8 passes, in bf16 (lowprec.fp8_cast.gathered_e2m1_scale)
            return E2M1_FROM_PASSES and E2M1_GATHERED_FROM_MASTER and dtype == torch.bfloat16
        return fp8_cast.fp8_dtype(fmt) is not None and fmt.granularity == "tensor" and dtype in fp8_cast.GATHERED_DTYPES

    def gathered_operands(self, w, fmt, dtype, *, rowmajor=True, transposed=True):
        if not self.reads_gathered(fmt, dtype):
            raise ValueError(f"{self.name}: a weight gathered in {fmt} and read in {dtype} is not one it reads")
        e2m1 = fp8_cast.is_e2m1(fmt)
        if rowmajor and transposed:  # both layouts from one pass
            return (fp8_cast.e2m1_operands if e2m1 else fp8_cast.operands)(w, fmt, gathered=dtype)
        op = (fp8_cast.e2m1_operand if e2m1 else fp8_cast.operand)(w, fmt, transposed=transposed, gathered=dtype)
        return (None, op) if transposed else (op, None)

    @staticmethod
    def _layout(codes, outer, transposed):
        return (_pad_last(codes.t().contiguous()) if transposed else codes), outer

    def mm(self, A, B, out_dtype, fast_accum=False):
        """``A @ B^T``: cuBLAS wants A row-major and B^T column-major, i.e. both (rows, K)
        row-major here. Per-row scales use the row-wise kernel when both operands are E4M3;
        otherwise (E5M2 with per-row scales) unit scales into fp32 and the scales on the output."""
        a, sa = A
        b, sb = B
        if sa.numel() == 1 and sb.numel() == 1:
            return torch._scaled_mm(a, b.t(), scale_a=sa.reshape(()), scale_b=sb.reshape(()),
                                    out_dtype=out_dtype, use_fast_accum=fast_accum)
        M, N = a.shape[0], b.shape[0]
        if a.dtype == b.dtype == torch.float8_e4m3fn:
            sa = sa.reshape(-1, 1).expand(M, 1).contiguous()
            sb = sb.reshape(1, -1).expand(1, N).contiguous()
            out = torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
            return to_dtype(out, out_dtype)
        one = torch.ones((), device=a.device)
        out = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast_accum)
        return to_dtype(_scale_output(out, sa.reshape(-1, 1), sb), out_dtype)


class Int8TensorCore(_CodesKernel):
    """``torch._int_mm``: int8 x int8 -> int32 on int8 tensor cores, the outer scales on the output.
    Exact (integer sums, no overflow: ``check_support`` bounds the contraction)."""

    name = "int8_tensorcore"
    summary = "int8 tensor cores (int32 accumulation), outer scales on the fp32 output"
    MIN_ROWS = 17  # torch._int_mm on CUDA takes more than 16 rows: fewer are padded with zeros

    def check_support(self, gemm, a, b, device, shape):
        if device.type != "cpu" and (device.type != "cuda" or device.capability is None or device.capability < (8, 0)):
            return False, f"{device}: int8 tensor-core GEMMs need CUDA compute capability 8.0 (or the CPU)"
        if gemm == "wgrad":
            return False, "wgrad contracts over the tokens, whose count the plan does not know (int32 could overflow)"
        peaks = [int8_grid(a), int8_grid(b)]
        for fmt, peak, transposed in zip((a, b), peaks, TRANSPOSED[gemm]):
            if not peak:
                return False, f"{fmt or 'unquantized'} is not an integer grid within int8 with tensor/row scales"
            if fmt.granularity == "row" and transposed:
                return False, f"{gemm}: per-row scales of {fmt} lie along the contraction"
        if any(n % 8 for n in shape):
            return False, f"layer {shape[0]}->{shape[1]}: int8 GEMMs need dimensions divisible by 8"
        contraction = shape[0] if gemm == "fprop" else shape[1]
        if contraction * peaks[0] * peaks[1] >= 2**31:
            return False, f"a contraction of {contraction} could overflow int32"
        return True, "ok"

    @staticmethod
    def code_dtype(fmt):
        return torch.int8

    def mm(self, A, B, out_dtype, fast_accum=False):
        """``A @ B^T``: ``A`` row-major, ``B^T`` column-major (``B`` row-major), as cuBLAS's int8
        GEMM takes them; int32 out, exactly converted to fp32 below 2^24 (beyond, rounded once)."""
        (a, sa), (b, sb) = A, B
        M = a.shape[0]
        if M < self.MIN_ROWS:
            a = F.pad(a, (0, 0, 0, self.MIN_ROWS - M))
        c = torch._int_mm(a.contiguous(), b.t())[:M].float()
        return to_dtype(_scale_output(c, sa, sb), out_dtype)


class PackedTernaryGemv(Kernel):
    """Reads the packed codes itself (:func:`lowprec.gemv.ternary_gemv`): no operand preparation."""

    name = "packed_ternary_gemv"
    summary = f"fprop with <= {GEMV_MAX_ROWS} tokens reading 2-bit ternary codes (Triton)"

    def check_support(self, gemm, a, b, device, shape):
        if gemm != "fprop":
            return False, "fprop only"
        if gemv.triton is None or device.type != "cuda":
            return False, "needs CUDA and Triton"
        if b is None or b.kind != "ternary" or b.granularity != "tensor" or shape[0] % 4:
            return False, "needs a native per-tensor ternary weight, in_features divisible by 4"
        return True, "ok"

    def exact_for(self, gemm, a, b):
        return bf16_exact(a, False)


KERNELS: dict[str, Kernel] = {k.name: k for k in (
    Emulated(), Matmul(), Unquantized(), Bf16TensorCore(), Fp8(False), Fp8(True), Int8TensorCore(),
    PackedTernaryGemv())}
AUTO_ORDER = ("fp8_tensorwise", "fp8_rowwise", "bf16_tensorcore", "emulated")
# the same with the int8 tensor-core GEMM tried before bf16 (``lowprec.kernels.AUTO_ORDER = AUTO_ORDER_INT8``
# before the layers are placed: int8 x ternary/binary/int8 fprop and dgrad on int8 tensor cores)
AUTO_ORDER_INT8 = ("fp8_tensorwise", "fp8_rowwise", "int8_tensorcore", "bf16_tensorcore", "emulated")


def same_operand(k1: str, k2: str, fmt) -> bool:
    """Whether kernels ``k1`` and ``k2`` make the same operand of a tensor in ``fmt`` (codes, scale and
    layouts), so that one may take the other's: the same kernel, or the two FP8 kernels with a per-tensor
    scale (the row-wise one takes a per-tensor operand beside a per-row one, e.g. a per-tensor input
    times a weight scaled per output channel)."""
    if k1 == k2:
        return True
    return k1 in _FP8_KERNELS and k2 in _FP8_KERNELS and fmt is not None and fmt.granularity == "tensor"


_FP8_KERNELS = ("fp8_tensorwise", "fp8_rowwise")


def select(gemm: str, a, b, device, shape) -> tuple[str, str]:
    """(kernel name, reason): the first kernel of ``AUTO_ORDER`` that supports this GEMM."""
    passed = []
    for name in AUTO_ORDER:
        ok, why = KERNELS[name].check_support(gemm, a, b, device, shape)
        if ok:
            return name, "; ".join(passed) or "first choice"
        passed.append(f"not {name}: {why}")
    raise AssertionError("the emulated kernel supports every GEMM")  # pragma: no cover


__all__ = ["KERNELS", "Kernel", "GemmKernel", "AUTO_ORDER", "AUTO_ORDER_INT8", "select", "same_operand", "fp8_grid",
           "int8_grid", "bf16_exact", "split", "split_qtensor", "GEMV_MAX_ROWS", "TRANSPOSED"]
