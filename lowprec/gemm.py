"""The three GEMMs of a quantized linear layer, run as its :class:`~lowprec.plan.GemmPlan` says.

For ``y = x W^T + b`` with ``x: (M, K)`` (M tokens), ``W: (N, K)``::

    fprop  y  = Q(x; fprop.input)  @ Q(W; fprop.weight)^T
    dgrad  dx = Q(dy; dgrad.grad)  @ Q(W; dgrad.weight)
    wgrad  dW = Q(dy; wgrad.grad)^T @ Q(x; wgrad.input)      (then the weight STE)

``Q(t; fmt)`` quantizes (identity for ``None``); each GEMM runs on the kernel its plan names
(:mod:`lowprec.kernels`), so nothing here decides anything. Activation gradients pass straight
through to ``x`` (identity STE); the weight gradient is multiplied by the weight pseudo-gradient
of ``LayerPrecision.ste`` (latent storage). What backward reuses from forward (FP8 codes of the
weight and the input) is the plan's ``reuse_*``; where dgrad runs on bf16 tensor cores beside an FP8 wgrad
with the same per-tensor gradient format, dgrad takes the gradient's codes wgrad's pass makes
(``BF16_DGRAD_TAKES_WGRAD_CODES``).

The autograd function receives tensors, the plan and a :class:`LayerIO` (the layer's operand cache,
telemetry and the gradient's amax history), never the module. A native weight's gradient is the
gradient of its ``carrier`` input (see :mod:`lowprec.nn.native`), so autograd accumulates it.

:class:`RecurrentGemms` runs the same GEMMs for a layer applied once per step of a recurrence:
fprop and dgrad per step, wgrad once over all steps stacked (see its doc for what that changes).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from . import gemv
from .common import to_dtype
from .formats import Format
from .fsdp import as_gathered
from .kernels import GEMV_MAX_ROWS, KERNELS, same_operand
from .plan import GemmPlan
from .qtensor import QTensor
from .scaling import delayed_amax, quantize_dequantize
from .ste import STES


@dataclass(eq=False)
class LayerIO:
    """What a layer's GEMMs touch besides tensors: ``cache.get(key, tag, make)`` (quantized weight
    operands shared within a step, see :class:`lowprec.nn.native.OperandCache`),
    ``record(operand, tensor_or_thunk, fmt)`` (telemetry), ``grad_history`` (delayed scaling of
    the gradient: an amax history updated in place) and ``recording()`` (whether ``record`` records
    anything now; without it, whether there is a ``record``)."""

    cache: object
    record: Callable | None = None
    grad_history: torch.Tensor | None = None
    recording: Callable[[], bool] | None = None

    def records(self) -> bool:
        return self.record is not None and (self.recording is None or self.recording())


def _for(fmt: Format | None, amax):
    """A delayed amax applies only to per-tensor absmax formats."""
    return amax if fmt is not None and fmt.scale == "absmax" and fmt.granularity == "tensor" else None


def gathered_applies(plan: GemmPlan, gathered) -> bool:
    """Whether the GEMMs of ``plan`` read a weight that reaches them gathered, ``gathered = (fmt,
    dtype)`` (:func:`lowprec.fsdp.as_gathered`), from its master (``QLinearFunction``'s ``gathered``):
    the weight operands are then made from the master without the dequantized tensor written out.
    Where they are not, the layer hands its GEMMs ``as_gathered(master, fmt, dtype)`` itself."""
    fmt, dtype = gathered
    p = plan.precision
    return (p.storage == "latent" and p.ste == "identity" and plan.gemv is None and plan.fprop.b == fmt
            and plan.reuse_weight and KERNELS[plan.fprop.kernel].reads_gathered(fmt, dtype))


def _weight_operand(kernel, fmt, transposed, plan: GemmPlan, w, io: LayerIO, amax=None, gathered=None):
    """Operand of the weight (``w``: the master, or the native ``(data, scale, global)``), shared
    through the layer's cache while the weight is unchanged. ``gathered``: as ``QLinearFunction``'s."""
    p = plan.precision
    if gathered is not None:
        # (a tuple indexed by an int: torch 2.11's dynamo raises on a bool index, breaking the graph)
        make = lambda: kernel.gathered_operands(w, fmt, gathered[1], rowmajor=not transposed,  # noqa: E731
                                                transposed=transposed)[1 if transposed else 0]
    elif p.storage == "native":
        q = _native(plan, w)
        if fmt == p.weight:  # as stored: re-deriving a scale from dequantized codes could change it
            make = lambda: kernel.operand_from_qtensor(q, transposed)  # noqa: E731
        else:
            make = lambda: kernel.operand(q.dequantize(torch.float32), fmt, transposed=transposed)  # noqa: E731
    else:
        amax = _for(fmt, amax)
        make = lambda: kernel.operand(w, fmt, amax=amax, transposed=transposed)  # noqa: E731
    if amax is not None or torch.compiler.is_compiling():
        return make()
    tag = _version_tag(w)
    key = (kernel.name, fmt, transposed, gathered)
    # kernels captured into a CUDA graph must not read a tensor a cache kept from another step (a
    # replay would not look the cache up again: it would read a stale operand); they share the
    # operands derived inside the same capture instead (`shared_operands`)
    if (w[0] if isinstance(w, tuple) else w).is_cuda and torch.cuda.is_current_stream_capturing():
        shared = getattr(_CAPTURE, "operands", None)
        if shared is None:
            return make()
        if (io, key, tag) not in shared:
            shared[io, key, tag] = make()
        return shared[io, key, tag]
    return io.cache.get(key, tag, make)


def _version_tag(w) -> tuple:
    """What identifies the weight ``w`` (a tensor or the native tuple) as it is now: its tensors'
    versions and addresses."""
    return tuple((t._version, t.data_ptr()) for t in (w if isinstance(w, tuple) else (w,)) if t is not None)


_CAPTURE = threading.local()


@contextlib.contextmanager
def shared_operands():
    """Within: weight operands derived while a CUDA graph is captured are shared by every kernel of
    that capture that needs the same operand of the same weight (each replay then derives it once),
    and dropped on leaving. Without it, a captured GEMM derives its weight operand itself."""
    before = getattr(_CAPTURE, "operands", None)
    _CAPTURE.operands = {}
    try:
        yield
    finally:
        _CAPTURE.operands = before


@contextlib.contextmanager
def loop_scope(t: torch.Tensor):
    """Within: a loop of steps on ``t``'s device, run inside a CUDA graph capture that opened no
    `shared_operands` table (a compiled step's whole-graph capture), gets a table of its own, so its
    steps share the weight operands its first step derives inside the capture. Elsewhere a no-op."""
    if t.is_cuda and torch.cuda.is_current_stream_capturing() and getattr(_CAPTURE, "operands", None) is None:
        with shared_operands():
            yield
    else:
        yield


def _hold_scope(t: torch.Tensor):
    """Where a weight operand derived now may be taken again: inside the CUDA graph capture in
    progress on ``t``'s device, only by that capture (its `shared_operands` table, or a token of its
    own without one); outside any capture, by steps outside captures (None). A capture that took an
    operand derived before it would record reads of memory its replays do not refresh: every later
    replay would read that step's weights (or, once the operand is freed, whatever took its memory)."""
    if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
        return None
    table = getattr(_CAPTURE, "operands", None)
    return table if table is not None else object()


def _native(plan: GemmPlan, w) -> QTensor:
    """The native weight ``(data, scale, global)`` as a QTensor (views, no copy)."""
    fmt, K = plan.precision.weight, plan.in_features
    padded = K + (-K) % fmt.block if fmt.is_scaled and fmt.granularity == "block" else K
    return QTensor(*w, fmt, (plan.out_features, K), padded)


def _gemv_applies(plan: GemmPlan, x2) -> bool:
    """Whether fprop of ``x2`` runs on the packed ternary GEMV."""
    return plan.gemv is not None and x2.is_cuda and x2.shape[0] <= GEMV_MAX_ROWS


def _input_operand(x, plan: GemmPlan, amax=None, fusable=False):
    """fprop's operand of ``x`` (where the packed GEMV runs, the reference kernel's values, which it
    reads); ``amax``: a delayed amax, or None (current scaling); ``fusable``: as tensor operations
    only (``GemmKernel.fusable_operand``)."""
    k = KERNELS["emulated" if _gemv_applies(plan, x) else plan.fprop.kernel]
    return (k.fusable_operand if fusable else k.operand)(x, plan.fprop.a, amax=_for(plan.fprop.a, amax))


def _grad_operand(dy, plan: GemmPlan, amax=None, fusable=False):
    """dgrad's operand of ``dy``; ``amax``, ``fusable`` as for `_input_operand`."""
    fmt, k = plan.dgrad.a, KERNELS[plan.dgrad.kernel]
    return (k.fusable_operand if fusable else k.operand)(dy, fmt, rounding=plan.precision.grad_rounding,
                                                         amax=_for(fmt, amax))


# True: where dgrad runs on the bf16 kernel and wgrad on an FP8 one with the same per-tensor gradient format
# (per-tensor activations beside a weight scaled per output channel, whose scale lies along dgrad's
# contraction), the FP8 kernel's pass makes the gradient's codes in both layouts and dgrad takes the row-major
# ones in bf16: the same values (the codes are exact in bf16), one quantization of the gradient instead of
# two. False: each of the two GEMMs quantizes the gradient itself
BF16_DGRAD_TAKES_WGRAD_CODES = True


def _grad_from_wgrad(plan: GemmPlan) -> bool:
    """Whether backward makes the gradient's operands with wgrad's FP8 kernel and dgrad's bf16 kernel takes
    them (``BF16_DGRAD_TAKES_WGRAD_CODES``)."""
    dg, wg = plan.dgrad, plan.wgrad
    return (BF16_DGRAD_TAKES_WGRAD_CODES and not plan.reuse_grad and dg.kernel == "bf16_tensorcore"
            and wg.kernel.startswith("fp8") and dg.a is not None and dg.a == wg.a and dg.a.granularity == "tensor"
            and plan.precision.grad_rounding == "nearest")


def _operand_pair(kernel: str, t, fmt, rounding: str, history=None):
    """``(op, op_t, amax)``: ``t``'s operand for ``kernel`` and, where the kernel makes both in one pass,
    the transposed one a later GEMM reuses (else None: that GEMM transposes ``op`` itself); under
    delayed scaling (``history``: ``t``'s amax history, pushed here) ``amax`` is the amax they are scaled
    by (where the kernel reads the history in the same pass: :meth:`GemmKernel.delayed_operands`), else
    None."""
    k = KERNELS[kernel]
    if history is not None and _for(fmt, history) is not None:
        return k.delayed_operands(t, fmt, history, rounding=rounding)
    amax = delayed_amax(history, t)
    return (*k.operands(t, fmt, rounding=rounding), amax)


def _fprop(x2, w, amax_x, amax_w, plan: GemmPlan, io: LayerIO, A=None, B=None, gathered=None):
    """``y = Q(x2) Q(W)^T`` (no bias) in ``x2``'s dtype -> ``(y, A, B)``, the quantized operands
    of ``x2`` and ``W`` (None where the packed GEMV ran). ``w``: the master weight, or the native
    ``(data, scale, global)``. ``A`` / ``B``: the operand of ``x2`` / of ``W`` where the caller
    computed it already (``A``: the GEMV's input operand where the GEMV runs). ``gathered``: as
    ``QLinearFunction``'s."""
    p, fp = plan.precision, plan.fprop
    native = p.storage == "native"
    if io.record is not None:
        io.record("input", x2, fp.a)
        seen = (lambda: _native(plan, w).dequantize()) if native else w
        if gathered is not None:
            seen = lambda: as_gathered(w.detach(), *gathered)  # noqa: E731
        io.record("weight", seen, fp.b)
    A = A if A is not None else _input_operand(x2, plan, amax_x)
    if _gemv_applies(plan, x2):
        # a compiled graph calls the GEMV as its operator (one opaque call); eager code calls the function: the
        # operator's dispatch costs the host about as long as the GEMV runs at a recurrent step's size
        call = gemv.packed_gemv if torch.compiler.is_compiling() else gemv.ternary_gemv
        return to_dtype(call(A[0], w[0], w[1], plan.out_features), x2.dtype), None, None
    k = KERNELS[fp.kernel]
    B = B if B is not None else _weight_operand(k, fp.b, False, plan, w, io, amax_w, gathered)
    return k.mm(A, B, x2.dtype, fast_accum=fp.kernel.startswith("fp8")), A, B



# True (the default): a dgrad on bf16 tensor cores whose weight operand folds a per-row scale into its values
# (a weight scaled per output channel, whose scale lies along dgrad's contraction) and whose gradient operand
# has a per-tensor scale folds that scale into the weight's values too, bf16(codes * row scale * gradient
# scale), so the GEMM writes its bf16 output itself instead of an fp32 product that a pass then scales and
# rounds. One bf16 rounding of the weight operand either way (of a product with one factor more), so the
# results differ from the other way's in the last bits, not in accuracy. False: the gradient's scale
# multiplies the fp32 product. In one process on an H200 a compiled 600M step under the paper policy took 2%
# less time folded (experiments.bench_train's @dgrad-scales-product)
BF16_DGRAD_FOLDS_GRAD_SCALE = True


def _dgrad(dy, w, B_fprop, amax_g, plan: GemmPlan, io: LayerIO, out_dtype, G=None, B=None, gathered=None,
           fold=False):
    """``dx = Q(dy) Q(W)`` -> ``(dx, G, B)``, the quantized operands of ``dy`` and ``W``.
    ``B_fprop``: fprop's weight operand where the plan reuses it, else None. ``G`` / ``B``: the
    operand of ``dy`` / dgrad's weight operand where the caller computed it already. ``gathered``:
    as ``QLinearFunction``'s. ``fold``: ``BF16_DGRAD_FOLDS_GRAD_SCALE`` applies (this call's weight operand
    is its own: the returned ``B`` then holds the gradient's scale)."""
    k = KERNELS[plan.dgrad.kernel]
    G = G if G is not None else _grad_operand(dy, plan, amax_g)
    if (B is None and fold and B_fprop is not None and plan.dgrad.kernel == "bf16_tensorcore"
            and G[1] is not None and G[1].numel() == 1 and B_fprop[1] is not None and B_fprop[1].numel() > 1):
        v, row = B_fprop  # fprop's codes and their per-row scale: both scales into the values, one rounding
        B = k.transposed((v, row.reshape(-1, 1).float() * G[1].float().reshape(())))
        return k.mm((G[0], None), B, out_dtype), G, B
    if B is None:
        B = k.transposed(B_fprop) if B_fprop is not None else None
        B = B if B is not None else _weight_operand(k, plan.dgrad.b, True, plan, w, io, gathered=gathered)
    return k.mm(G, B, out_dtype), G, B


@functools.cache
def _operand_function(plan: GemmPlan, gemm: str):
    """One function object per plan and GEMM (a compiled caller guards on its identity), computing
    the operand as tensor operations its caller's compiled function fuses."""
    return functools.partial(_input_operand if gemm == "fprop" else _grad_operand, plan=plan, fusable=True)


def _wgrad(dy, x2, A_fprop, G, amax_g, w_a, plan: GemmPlan, A_t=None, G_t=None, dtype=None):
    """``dW = Q(dy)^T Q(x2)`` (then the weight STE when latent): fp32 for a native weight (its
    carrier's gradient), else in the master's dtype (``dtype``: in that one, then cast to the
    master's). ``A_fprop``/``G``: fprop's input operand and dgrad's gradient operand where the plan
    reuses them, else None; ``A_t``/``G_t``: the same already transposed, where they were made so
    with them (they are then taken as they are)."""
    p, dg, wg = plan.precision, plan.dgrad, plan.wgrad
    native = p.storage == "native"
    k = KERNELS[wg.kernel]
    A = G_t if G_t is not None else k.transposed(G) if plan.reuse_grad and G is not None else None
    if A is None:
        A = k.operand(dy, wg.a, rounding=p.grad_rounding, amax=_for(wg.a, amax_g) if wg.a == dg.a else None,
                      transposed=True)
    B = A_t if A_t is not None else k.transposed(A_fprop) if A_fprop is not None else \
        k.operand(x2, wg.b, transposed=True)
    dw = k.mm(A, B, torch.float32 if native else dtype or w_a.dtype)
    if not native:
        pseudo = weight_pseudo_grad(w_a, plan.fprop.b, p.ste)
        dw = dw if pseudo is None else (dw.float() * pseudo).to(dw.dtype)
    return dw if native else dw.to(w_a.dtype)


class QLinearFunction(torch.autograd.Function):
    """Inputs: x2 (M, K); w_a, w_b, w_c: the latent master weight (and two Nones), or the native
    weight's packed data, scale and global scale; bias or None; carrier (native: the leaf whose
    gradient is the weight's; else None); hist_x, hist_w (delayed scaling: the amax histories of the
    input and of a latent weight, pushed in place by this call; or None); plan; io;
    gathered: None, or ``(fmt, dtype)`` where the GEMMs see the latent weight as a data-parallel
    run's ranks hold it, ``as_gathered(w_a, fmt, dtype)`` (:func:`lowprec.fsdp.as_gathered`; only
    where `gathered_applies`): its operands are made from the master, its gradient computed in
    ``dtype`` and handed to the master in the master's dtype, the numbers of that composition."""

    @staticmethod
    def forward(ctx, x2, w_a, w_b, w_c, bias, carrier, hist_x, hist_w, plan: GemmPlan, io: LayerIO, gathered=None):
        native = plan.precision.storage == "native"
        gemv = _gemv_applies(plan, x2)
        A = A_t = B = B_t = None
        # a later GEMM takes an operand made in both layouts only from a kernel that makes the same operand
        # (`same_operand`; another kernel takes the row-major one and transposes it itself: `GemmKernel.transposed`)
        if plan.reuse_input and not gemv and same_operand(plan.fprop.kernel, plan.wgrad.kernel, plan.fprop.a):
            A, A_t, amax_x = _operand_pair(plan.fprop.kernel, x2, plan.fprop.a, "nearest", hist_x)
        else:
            amax_x = delayed_amax(hist_x, x2)
        if (plan.reuse_weight and not native and not gemv and torch.compiler.is_compiling()
                and same_operand(plan.fprop.kernel, plan.dgrad.kernel, plan.fprop.b)):
            # dgrad's weight operand from fprop's pass (eager steps share fprop's through the layer's cache)
            k, fmt = KERNELS[plan.fprop.kernel], plan.fprop.b
            if gathered is not None:
                B, B_t = k.gathered_operands(w_a, fmt, gathered[1])
                amax_w = delayed_amax(hist_w, w_a)
            else:
                B, B_t, amax_w = _operand_pair(plan.fprop.kernel, w_a, fmt, "nearest", hist_w)
        else:
            amax_w = delayed_amax(hist_w, w_a)
        y, A, B = _fprop(x2, (w_a, w_b, w_c) if native else w_a, amax_x, amax_w, plan, io, A, B, gathered)
        if bias is not None:
            y = y + bias.to(y.dtype)
        keep_x = plan.reuse_input and A is not None
        keep_w = plan.reuse_weight and B is not None
        x_t = keep_x and A_t is not None  # what is kept of x is wgrad's operand itself
        w_t = keep_w and B_t is not None  # and of the weight, dgrad's
        ctx.plan, ctx.io, ctx.gathered = plan, io, gathered
        ctx.meta = (bias is not None, None if bias is None else bias.dtype, x2.dtype, keep_x, keep_w, x_t, w_t)
        ctx.save_for_backward(None if keep_x else x2, w_a, w_b, w_c,
                              *((A_t if x_t else A) if keep_x else (None, None)),
                              *((B_t if w_t else B) if keep_w else (None, None)))
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, w_a, w_b, w_c, xa, xs, wb, ws = ctx.saved_tensors
        plan, io, gathered = ctx.plan, ctx.io, ctx.gathered
        has_bias, bias_dtype, x_dtype, keep_x, keep_w, x_t, w_t = ctx.meta
        native = plan.precision.storage == "native"
        w = (w_a, w_b, w_c) if native else w_a
        dy = dy.contiguous()
        if io.record is not None:
            io.record("grad", dy, plan.dgrad.a)
        dx = dw = G = G_t = None
        wgrad = ctx.needs_input_grad[1] or ctx.needs_input_grad[5]
        if (ctx.needs_input_grad[0] and wgrad and plan.reuse_grad
                and same_operand(plan.dgrad.kernel, plan.wgrad.kernel, plan.dgrad.a)):  # wgrad's dy operand, same pass
            G, G_t, amax_g = _operand_pair(plan.dgrad.kernel, dy, plan.dgrad.a, plan.precision.grad_rounding,
                                           io.grad_history)
        elif ctx.needs_input_grad[0] and wgrad and _grad_from_wgrad(plan):  # both from wgrad's FP8 pass
            G8, G_t, amax_g = _operand_pair(plan.wgrad.kernel, dy, plan.wgrad.a, "nearest", io.grad_history)
            G_t = G_t if G_t is not None else KERNELS[plan.wgrad.kernel].transposed(G8)
            G = (G8[0].to(torch.bfloat16), G8[1])
        else:
            amax_g = delayed_amax(io.grad_history, dy)
        if ctx.needs_input_grad[0]:
            dx, G, _ = _dgrad(dy, w, (wb, ws) if keep_w and not w_t else None, amax_g, plan, io, x_dtype, G,
                              (wb, ws) if w_t else None, gathered, fold=BF16_DGRAD_FOLDS_GRAD_SCALE)
        if wgrad:
            kept = (xa, xs) if keep_x else None
            dw = _wgrad(dy, x2, None if x_t else kept, G, amax_g, w_a, plan, kept if x_t else None, G_t,
                        None if gathered is None else gathered[1])
        db = dy.sum(0).to(bias_dtype) if has_bias and ctx.needs_input_grad[4] else None
        if native:  # the weight's gradient goes to the carrier
            return dx, None, None, None, db, dw, None, None, None, None, None
        return dx, dw, None, None, db, None, None, None, None, None, None


# True: a recurrence's one wgrad GEMM takes the operands its steps made where they are its own, bit for bit
# (`RecurrentGemms.steps_operands`: formats that round each element alone); False: it quantizes the stacked
# steps again. In one process on an H200 the 600M hybrid under the paper policy (an fp16 LSTM, bf16 activations)
# took 6.9% more tokens/s with it (experiments.bench_train's @lstm-wgrad-requantizes)
RECURRENT_WGRAD_TAKES_STEPS = True


@dataclass(frozen=True, eq=False)
class RecurrentGemms:
    """A layer ``y = x W^T`` (no bias) applied once per step of a recurrence, ``x_t`` (M, K) at
    step t, by a caller whose own autograd node spans all the steps (``QLinear.recurrent_gemms``
    builds it; the caller's node takes the ``weights`` that comes with it as inputs and hands them
    back to every call)::

        fprop  y_t  = Q(x_t) Q(W)^T                      per step, as QLinear's forward
        dgrad  dx_t = Q(dy_t) Q(W)                       per step, as QLinear's backward
        wgrad  dW   = Q([dy_1; ...; dy_T])^T Q([x_1; ...; x_T])     ONE GEMM over the T·M rows

    fprop and dgrad are QLinear's own (same operands, scales, kernels, telemetry records and
    delayed-scaling history updates, call for call), so they compute bit for bit what calling the
    layer per step does. A per-step caller's autograd would instead add T weight gradients of rank
    M, each written out as a full (N, K) tensor; here ``wgrad`` applies the plan's wgrad formats
    and kernel to the stacked operands, with current scaling. What that changes:

    - formats without a per-tensor scale (unscaled casts: bf16, fp16; per-row: a per-token int8
      input; blocks along a row: MX, NVFP4's E4M3 block scales) quantize each row alone, so the
      operands are the per-step ones and only the rounding of the sum differs: one GEMM rounded
      once to the weight's dtype instead of T GEMMs each rounded to it and added in it (with bf16
      weights the stacked sum is the more accurate one), and a latent weight's STE factor applied
      once to the sum instead of to each step's gradient;
    - a per-tensor scale (FP8 ``granularity: tensor``, NVFP4's fp32 tensor scale) is now ONE scale
      over all T steps instead of one per step: every operand is still on the format's grid, but
      steps whose amax is far below the largest step's lose relative precision (and may flush
      to zero) where their own scale would have kept it;
    - under delayed scaling, wgrad's operands take current scaling over the stacked steps;
    - stochastic rounding of the gradient (``grad_rounding: stochastic``) draws its random numbers
      in another order, so dgrad too matches the per-step calls in distribution only.

    The weight's operands are derived once per loop, not once per step: fprop's by the forward
    loop's first step (without a weight history), dgrad's (fprop's transposed, or its own where
    the plan does not reuse fprop's: the packed GEMV ran, or dgrad's weight format or kernel is
    another) by the backward's first step, and taken by the steps after it (also inside a CUDA
    graph's capture, where a per-step layer call derives them again at every step).

    Weight-gradient hooks see what they see for a per-step caller: autograd sums the T per-step
    gradients of a leaf before its hooks run, so hooks on the latent weight, the native carrier's
    post-accumulate hook (``native_grad_hook``) and ``native_grad`` get the one whole gradient.
    """

    plan: GemmPlan
    io: LayerIO
    input_history: torch.Tensor | None = None  # delayed scaling of the input (an amax history)
    weight_history: torch.Tensor | None = None
    # the weight operands of a loop's steps, derived by its first step and taken by the others (no
    # cache lookup, and none to miss: inside a CUDA graph's capture every lookup would derive it
    # again): fprop's from the first step of a forward loop to ``end_forward``; dgrad's, with what
    # it was derived from (the fprop operand it transposes, or the weights' versions), for the steps
    # of a backward; each with the capture it was derived in (`_hold_scope`), where alone it is taken
    _held_fprop: list = field(default_factory=list, repr=False)
    _held: list = field(default_factory=list, repr=False)
    # input_cast(x) / grad_cast(dy) are operands in the plan's formats, not x and dy themselves (as a
    # plain nn.Linear's are): a recurrence keeps x and dy apart from them
    operand_is_input = False

    @property
    def native(self) -> bool:
        return self.plan.precision.storage == "native"

    def _w(self, weights):
        return tuple(weights[:3]) if self.native else weights[0]

    def fprop(self, x, weights, a=None):
        """One step: ``x`` (M, K) -> ``(y, saved)``: y (M, N) in ``x``'s dtype, exactly the
        layer's output for ``x``; ``saved``: the tensors (or Nones) this step's dgrad needs.
        ``a``: ``input_cast(x)``, where the caller computed it already."""
        amax_x = delayed_amax(self.input_history, x)
        amax_w = delayed_amax(self.weight_history, weights[0])
        # a weight history moves its amax at every step; a compiled graph shares the operand itself
        hold = self.weight_history is None and not torch.compiler.is_compiling()
        scope = _hold_scope(x)
        B = self._held_fprop[0][1] if hold and self._held_fprop and self._held_fprop[0][0] is scope else None
        y, _, B = _fprop(x, self._w(weights), amax_x, amax_w, self.plan, self.io, a, B)
        if hold and B is not None:
            self._held_fprop[:] = [(scope, B)]
        if self.plan.reuse_weight and B is not None:
            return y, B
        return y, (None, None)

    def end_forward(self):
        """The forward loop is over: drop fprop's weight operand kept for its steps."""
        self._held_fprop.clear()

    def dgrad(self, dy, weights, saved, need_dx: bool = True, g=None):
        """One step's backward: ``dy`` (M, N) -> ``dx`` (M, K) in ``dy``'s dtype, or None without
        ``need_dx`` (the step's gradient is still recorded and enters the amax history, as a
        per-step call whose input needs no gradient does). Steps in reverse order. ``g``:
        ``grad_cast(dy)``, where the caller computed it already."""
        dy = dy.contiguous()
        if self.io.record is not None:
            self.io.record("grad", dy, self.plan.dgrad.a)
        amax_g = delayed_amax(self.io.grad_history, dy)
        if not need_dx:
            return None
        B_fprop = saved if saved[0] is not None else None
        w = self._w(weights)
        hold = not torch.compiler.is_compiling()
        # what dgrad's weight operand comes from: fprop's operand (that very tensor), or the weights
        source = (B_fprop[0] if B_fprop is not None else _version_tag(w)) if hold else None
        scope = _hold_scope(dy)
        B = None
        if hold and self._held:
            kept_scope, kept, kept_B = self._held[0]
            same = kept is source or (isinstance(kept, tuple) and isinstance(source, tuple) and kept == source)
            if same and kept_scope is scope:
                B = kept_B
        dx, _, B = _dgrad(dy, w, B_fprop, amax_g, self.plan, self.io, dy.dtype, g, B)
        if hold:
            self._held[:] = [(scope, source, B)]
        return dx

    @property
    def grad_slots(self) -> tuple[int, ...]:
        """The positions in ``weights`` that ``wgrad`` returns a gradient for."""
        return (3,) if self.native else (0,)

    @property
    def stateless(self) -> bool:
        """No amax history that a step updates in place: a caller may rerun any step's
        quantization and get the same operands (``fprop_saved``)."""
        return self.input_history is None and self.weight_history is None and self.io.grad_history is None

    @property
    def input_cast(self):
        """``x -> fprop's operand of x`` (``a``), one function for every step (the kernel's operand: an
        elementwise cast for an unscaled format, the amax reduction and the scaled cast for a scaled
        one, as tensor operations: ``GemmKernel.fusable_operand``), where no delayed scaling is involved,
        else None: a caller may compute it together with the work that produces ``x`` (an LSTM's cell:
        in its compiled kernel) and pass it to ``fprop`` as ``a``."""
        if self.input_history is not None:
            return None
        return _operand_function(self.plan, "fprop")

    @property
    def grad_cast(self):
        """As ``input_cast``, for dgrad's gradient operand (``dgrad``'s ``g``); None also where the
        gradient is rounded stochastically (its random draws stay in ``dgrad``)."""
        if self.io.grad_history is not None or self.plan.precision.grad_rounding != "nearest":
            return None
        return _operand_function(self.plan, "dgrad")

    @property
    def recording(self) -> bool:
        """Whether a step's calls record telemetry now (Python work at every step)."""
        return self.io.records()

    def fprop_saved(self, weights, rows: int, device) -> tuple:
        """What ``fprop`` returns as ``saved`` for a step of ``rows`` rows on ``device``, derived
        again (the layer's operand cache, or the same deterministic quantization), for a caller
        that could not keep it. Only where ``stateless``."""
        plan = self.plan
        if not plan.reuse_weight or (plan.gemv is not None and device.type == "cuda" and rows <= GEMV_MAX_ROWS):
            return (None, None)
        return _weight_operand(KERNELS[plan.fprop.kernel], plan.fprop.b, False, plan, self._w(weights), self.io)

    def steps_operands(self, ad: torch.dtype) -> tuple[bool, bool]:
        """``(grad, input)``: whether wgrad's operand of the stacked gradients / inputs is the steps' own
        dgrad / fprop operands stacked, so that a caller may keep those (``grad_cast`` / ``input_cast``
        made each of them at its step) and hand them to ``wgrad`` instead of the T·M rows it would
        quantize again. So where the plan has wgrad share that operand with the other GEMM (same kernel,
        same format) on the bf16 kernel, for a format that rounds each element alone (no scale: bf16,
        fp16): the operand of the stacked rows is then the stacked rows' operands, bit for bit.
        The input side only for activations ``ad`` in bf16 (the operand's dtype: the caller keeps it in
        place of the step's input, which it keeps in ``ad``), and not where the packed GEMV runs. Neither
        with ``RECURRENT_WGRAD_TAKES_STEPS`` off."""
        if not RECURRENT_WGRAD_TAKES_STEPS:
            return False, False
        p = self.plan

        def shared(gemm, fmt, reuse):
            return (reuse and gemm.kernel == p.wgrad.kernel == "bf16_tensorcore" and gemm.a == fmt
                    and fmt is not None and not fmt.is_scaled)
        grad = self.grad_cast is not None and shared(p.dgrad, p.wgrad.a, p.reuse_grad)
        x = (self.input_cast is not None and p.gemv is None and ad == torch.bfloat16
             and shared(p.fprop, p.wgrad.b, p.reuse_input))
        return grad, x

    def wgrad(self, dy, x, weights, operands: tuple[bool, bool] = (False, False)):
        """The weight gradient of all steps: ``dy`` (T·M, N) and ``x`` (T·M, K), the steps stacked
        -> gradients for ``weights`` (the weight's, or the native carrier's, the rest None).
        ``operands``: whether ``dy`` / ``x`` are the stacked steps' operands already
        (``steps_operands``), which wgrad then takes as they are."""
        k = KERNELS[self.plan.wgrad.kernel]
        G_t, A_t = (k.transposed((t, None)) if taken else None for t, taken in zip((dy, x), operands))
        dw = _wgrad(dy.contiguous(), x, None, None, None, weights[0], self.plan, A_t=A_t, G_t=G_t)
        return (None, None, None, dw) if self.native else (dw, None, None, None)


def weight_pseudo_grad(weight: torch.Tensor, fmt: Format | None, ste: str) -> torch.Tensor | None:
    """The weight STE's factor ``g(W / s)`` (None for the identity STE)."""
    if fmt is None or ste == "identity":
        return None
    _, s = quantize_dequantize(weight.detach(), fmt)
    u = torch.where(s > 0, weight.detach().float() / s, 0.0)
    return STES[ste](u, fmt.max_value)


__all__ = ["QLinearFunction", "RecurrentGemms", "LayerIO", "delayed_amax", "gathered_applies", "weight_pseudo_grad",
           "shared_operands"]
