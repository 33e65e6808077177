"""The three GEMMs of a quantized linear layer, run as its :class:`~lowprec.plan.GemmPlan` says.

For ``y = x W^T + b`` with ``x: (M, K)`` (M tokens), ``W: (N, K)``::

    fprop  y  = Q(x; fprop.input)  @ Q(W; fprop.weight)^T
    dgrad  dx = Q(dy; dgrad.grad)  @ Q(W; dgrad.weight)
    wgrad  dW = Q(dy; wgrad.grad)^T @ Q(x; wgrad.input)      (then the weight STE)

``Q(t; fmt)`` quantizes (identity for ``None``); each GEMM runs on the kernel its plan names
(:mod:`lowprec.kernels`), so nothing here decides anything. Activation gradients pass straight
through to ``x`` (identity STE); the weight gradient is multiplied by the weight pseudo-gradient
of ``LayerPrecision.ste`` (latent storage). What backward reuses from forward (FP8 codes of the
weight and the input) is the plan's ``reuse_*``.

The autograd function receives tensors, the plan and a :class:`LayerIO` (the layer's operand cache,
telemetry and the gradient's amax history), never the module. A native weight's gradient is the
gradient of its ``carrier`` input (see :mod:`lowprec.nn.native`), so autograd accumulates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import gemv
from .formats import Format
from .kernels import GEMV_MAX_ROWS, KERNELS
from .plan import GemmPlan
from .qtensor import QTensor
from .scaling import quantize_dequantize
from .ste import STES


@dataclass(eq=False)
class LayerIO:
    """What a layer's GEMMs touch besides tensors: ``cache.get(key, tag, make)`` (quantized weight
    operands shared within a step, see :class:`lowprec.nn.native.OperandCache`),
    ``record(operand, tensor_or_thunk, fmt)`` (telemetry) and ``grad_history`` (delayed scaling of
    the gradient: an amax history updated in place)."""

    cache: object
    record: Callable | None = None
    grad_history: torch.Tensor | None = None


@torch.no_grad()
def delayed_amax(history: torch.Tensor | None, t: torch.Tensor):
    """Delayed scaling (Transformer Engine's DelayedScaling): the amax used now is the max of the
    history (this tensor's own amax while the history is empty); this amax is then pushed into the
    history, in place. None without a history."""
    if history is None:
        return None
    now = torch.where(torch.isfinite(t), t.detach().abs(), 0).amax().float() if t.numel() else history.new_zeros(())
    past = history.amax()
    used = torch.where(past > 0, past, now)
    history.copy_(torch.cat([now.reshape(1), history[:-1]]))
    return used


def _for(fmt: Format | None, amax):
    """A delayed amax applies only to per-tensor absmax formats."""
    return amax if fmt is not None and fmt.scale == "absmax" and fmt.granularity == "tensor" else None


def _weight_operand(kernel, fmt, transposed, plan: GemmPlan, w, io: LayerIO, amax=None):
    """Operand of the weight (``w``: the master, or the native ``(data, scale, global)``), shared
    through the layer's cache while the weight is unchanged."""
    p = plan.precision
    if p.storage == "native":
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
    tag = tuple((t._version, t.data_ptr()) for t in (w if isinstance(w, tuple) else (w,)) if t is not None)
    return io.cache.get((kernel.name, fmt, transposed), tag, make)


def _native(plan: GemmPlan, w) -> QTensor:
    """The native weight ``(data, scale, global)`` as a QTensor (views, no copy)."""
    fmt, K = plan.precision.weight, plan.in_features
    padded = K + (-K) % fmt.block if fmt.is_scaled and fmt.granularity == "block" else K
    return QTensor(*w, fmt, (plan.out_features, K), padded)


class QLinearFunction(torch.autograd.Function):
    """Inputs: x2 (M, K); w_a, w_b, w_c: the latent master weight (and two Nones), or the native
    weight's packed data, scale and global scale; bias or None; carrier (native: the leaf whose
    gradient is the weight's; else None); amax_x, amax_w (delayed scaling, or None); plan; io."""

    @staticmethod
    def forward(ctx, x2, w_a, w_b, w_c, bias, carrier, amax_x, amax_w, plan: GemmPlan, io: LayerIO):
        p, fp = plan.precision, plan.fprop
        native = p.storage == "native"
        w = (w_a, w_b, w_c) if native else w_a
        if io.record is not None:
            io.record("input", x2, fp.a)
            io.record("weight", (lambda: _native(plan, w).dequantize()) if native else w_a, fp.b)
        out_dtype = x2.dtype
        A = B = None
        if plan.gemv is not None and x2.is_cuda and x2.shape[0] <= GEMV_MAX_ROWS:
            xq = KERNELS["emulated"].operand(x2, fp.a, amax=_for(fp.a, amax_x))[0]
            y = gemv.ternary_gemv(xq, w_a, w_b, plan.out_features).to(out_dtype)
        else:
            k = KERNELS[fp.kernel]
            A = k.operand(x2, fp.a, amax=_for(fp.a, amax_x))
            B = _weight_operand(k, fp.b, False, plan, w, io, amax_w)
            y = k.mm(A, B, out_dtype, fast_accum=fp.kernel.startswith("fp8"))
        if bias is not None:
            y = y + bias.to(out_dtype)
        keep_x = plan.reuse_input and A is not None
        keep_w = plan.reuse_weight and B is not None
        ctx.plan, ctx.io = plan, io
        ctx.meta = (bias is not None, None if bias is None else bias.dtype, w_a.dtype, x2.dtype, keep_x, keep_w)
        ctx.save_for_backward(None if keep_x else x2, w_a, w_b, w_c,
                              *(A if keep_x else (None, None)), *(B if keep_w else (None, None)))
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, w_a, w_b, w_c, xa, xs, wb, ws = ctx.saved_tensors
        plan, io = ctx.plan, ctx.io
        has_bias, bias_dtype, w_dtype, x_dtype, keep_x, keep_w = ctx.meta
        p, dg, wg = plan.precision, plan.dgrad, plan.wgrad
        native = p.storage == "native"
        w = (w_a, w_b, w_c) if native else w_a
        dy = dy.contiguous()
        if io.record is not None:
            io.record("grad", dy, dg.a)
        amax_g = delayed_amax(io.grad_history, dy)
        rnd = p.grad_rounding
        dx = dw = None
        G = None
        if ctx.needs_input_grad[0]:
            k = KERNELS[dg.kernel]
            G = k.operand(dy, dg.a, rounding=rnd, amax=_for(dg.a, amax_g))
            B = k.transposed((wb, ws)) if keep_w else None
            B = B if B is not None else _weight_operand(k, dg.b, True, plan, w, io)
            dx = k.mm(G, B, x_dtype)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[5]:
            k = KERNELS[wg.kernel]
            A = k.transposed(G) if plan.reuse_grad and G is not None else None
            if A is None:
                A = k.operand(dy, wg.a, rounding=rnd, amax=_for(wg.a, amax_g) if wg.a == dg.a else None, transposed=True)
            B = k.transposed((xa, xs)) if keep_x else k.operand(x2, wg.b, transposed=True)
            dw = k.mm(A, B, torch.float32 if native else w_dtype)
            if not native:
                pseudo = weight_pseudo_grad(w_a, plan.fprop.b, p.ste)
                dw = dw if pseudo is None else (dw.float() * pseudo).to(w_dtype)
        db = dy.sum(0).to(bias_dtype) if has_bias and ctx.needs_input_grad[4] else None
        if native:  # the weight's gradient goes to the carrier
            return dx, None, None, None, db, dw, None, None, None, None
        return dx, dw, None, None, db, None, None, None, None, None


def weight_pseudo_grad(weight: torch.Tensor, fmt: Format | None, ste: str) -> torch.Tensor | None:
    """The weight STE's factor ``g(W / s)`` (None for the identity STE)."""
    if fmt is None or ste == "identity":
        return None
    _, s = quantize_dequantize(weight.detach(), fmt)
    u = torch.where(s > 0, weight.detach().float() / s, 0.0)
    return STES[ste](u, fmt.max_value)


__all__ = ["QLinearFunction", "LayerIO", "delayed_amax", "weight_pseudo_grad"]
