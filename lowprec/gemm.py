"""The three GEMMs of a quantized linear layer, on the emulated and the tensor-core backend.

For ``y = x W^T + b`` with ``x: (M, K)`` (M tokens), ``W: (N, K)``::

    fprop  y  = Q(x; fprop.input)  @ Q(W; fprop.weight)^T
    dgrad  dx = Q(dy; dgrad.grad)  @ Q(W; dgrad.weight)
    wgrad  dW = Q(dy; wgrad.grad)^T @ Q(x; wgrad.input)      (then the weight STE)

``Q(t; fmt)`` is quantize -> dequantize (identity for ``None``). Activation gradients pass
straight through to ``x`` (identity STE); the weight gradient is multiplied by the layer's weight
pseudo-gradient (``LayerPrecision.ste``).

Backends (one mode per layer, chosen by :func:`plan_gemms`):

- ``emulated``: the reference. Operands are quantized exactly per their formats, dequantized to
  fp32 and multiplied in fp32. Runs anywhere.
- ``tensorcore``: FP8 ``torch._scaled_mm`` for every GEMM whose two operands are on an FP8 grid
  (fp8_e4m3/fp8_e5m2 and, exactly, ternary, binary and fp4_e2m1 codes, which are all E4M3 values)
  with per-tensor or per-row scales. A weight's per-output-channel scale is applied to the output
  in fprop and folded into ``dy``'s columns in dgrad (exact). wgrad contracts over tokens, so its
  operands take per-tensor scales there. Other operands (block-scaled MX/NVFP4, FP4 activations,
  int8, fp16) are quantized exactly, then cast to bf16 and multiplied on bf16 tensor cores —
  "emulated on tensor cores". The cast is exact for bf16, E2M1/E4M3 codes times a power-of-two
  block scale (MX) and unscaled E2M1; it rounds once more (relative error <= 2^-9) for fp16
  values, int8 codes times an fp32 scale, NVFP4 (E4M3 block scale times fp32 tensor scale) and
  unquantized fp32 operands. Use ``emulated`` where that last rounding matters.
- ``bf16``: no quantization at all (``auto`` keeps GEMMs too small for FP8 to pay off here).
"""

from __future__ import annotations

import torch

from . import kernels
from .formats import Format
from .scaling import CHUNK_ELEMENTS, fake_quant, quantize_dequantize, quantize_groups, quantize_large, to_groups
from .ste import STES
from .telemetry import maybe_record

MODES = ("emulated", "tensorcore", "bf16")
# auto: FP8 tensor-core GEMMs only where both weight dimensions reach AUTO_MIN_DIM and the GEMM has
# at least AUTO_MIN_WORK multiply-adds (tokens x in x out) at its first call. Measured on an H100
# (docs/benchmarks.md, FFN fwd+bwd): d=1024 FP8 0.79-0.80x bf16; d=2048 0.79x at 4096 tokens
# (2^36 MACs per GEMM) but 1.06x at 16384 (2^38); d=4096 1.12x at 4096 tokens (2^38).
AUTO_MIN_DIM = 2048
AUTO_MIN_WORK = 2**38


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


def tensorcore_available(device: torch.device) -> tuple[bool, str]:
    """(available, reason): FP8 tensor cores need CUDA with compute capability >= 8.9."""
    if device.type != "cuda":
        return False, f"device {device} is not CUDA"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"compute capability {cap[0]}.{cap[1]} < 8.9 has no FP8 tensor cores"
    return True, "ok"


def plan_gemms(precision, in_features: int, out_features: int, device: torch.device,
               tokens: int | None = None) -> tuple[str, str]:
    """(mode, note) for a layer: how its GEMMs run and why. ``tokens``: rows of the first input
    (None before any call: ``auto`` then judges by the weight's shape alone)."""
    backend = precision.backend
    if not precision.is_quantized:
        return "emulated", "full precision"
    if backend == "emulated":
        return "emulated", "emulated (reference)"
    ok, why = tensorcore_available(device)
    if backend == "tensorcore" and not ok:
        raise RuntimeError(f"backend 'tensorcore' unavailable: {why}; use backend 'auto' or 'emulated'")
    if not ok:
        return "emulated", f"emulated ({why})"
    if backend == "auto" and precision.storage == "latent":
        if min(in_features, out_features) < AUTO_MIN_DIM:
            return "bf16", f"bf16 (GEMM {out_features}x{in_features} below FP8 break-even {AUTO_MIN_DIM})"
        if tokens is not None and tokens * in_features * out_features < AUTO_MIN_WORK:
            return "bf16", f"bf16 ({tokens}x{in_features}x{out_features} GEMM below FP8 break-even 2^38 MACs)"
    fp8 = [g for g in ("fprop", "dgrad", "wgrad") if _gemm_on_fp8(precision, g)]
    emu = [g for g in ("fprop", "dgrad", "wgrad") if g not in fp8]
    note = "tensorcore fp8: " + ("/".join(fp8) or "none")
    if emu:
        note += "; emulated in bf16: " + "/".join(emu)
        if any(f is not None and f.bits == 4 and f.kind == "float" for f in (precision.operand("fprop", "input"), precision.grad)):
            note += " (FP4 activations/gradients: no FP4 tensor cores on this GPU)"
    return "tensorcore", note


def _gemm_on_fp8(precision, gemm: str) -> bool:
    a, b = {"fprop": ("input", "weight"), "dgrad": ("grad", "weight"), "wgrad": ("grad", "input")}[gemm]
    da, db = fp8_grid(precision.operand(gemm, a)), fp8_grid(precision.operand(gemm, b))
    return da is not None and db is not None and not (da == db == torch.float8_e5m2)


# ---- quantization helpers --------------------------------------------------------------------
def _fq(t: torch.Tensor, fmt, rounding="nearest", amax=None) -> torch.Tensor:
    """Quantize-dequantize to fp32 (``None``: plain fp32)."""
    if fmt is None:
        return t.float()
    amax = amax if (fmt.scale == "absmax" and fmt.granularity == "tensor") else None
    return fake_quant(t, fmt, rounding=rounding, amax=amax)


def _fp8_operand(t: torch.Tensor, fmt: Format, rounding="nearest", amax=None, tensorwise=False):
    """(codes in float8, scale) with ``t ~= codes * scale``; scale is (rows, 1) or a 1-element
    tensor. ``tensorwise`` forces a per-tensor scale (for GEMMs contracting over rows)."""
    if tensorwise and fmt.granularity != "tensor":
        fmt = fmt.with_scaling("tensor")
    if not (fmt.scale == "absmax" and fmt.granularity == "tensor"):
        amax = None
    if t.numel() > CHUNK_ELEMENTS:  # e.g. a 16384 x 65536 weight: no float32 copy of it
        codes, s = quantize_large(t, fmt, rounding=rounding, amax=amax, out_dtype=fp8_grid(fmt), scaled=False)
        return codes, (s.reshape(1) if fmt.granularity == "tensor" else s.reshape(-1, 1))
    xg, _ = to_groups(t, fmt)
    values, s, _, _ = quantize_groups(xg, fmt, rounding, None, amax)
    codes = values.reshape(t.shape).to(fp8_grid(fmt))
    return codes, (s.reshape(1) if fmt.granularity == "tensor" else s.reshape(-1, 1))


def _w_fq(layer, weight, fmt, amax=None):
    """The weight operand, fake-quantized to fp32. A native weight is already on its grid and is
    used as stored (re-deriving an absmean scale from dequantized codes would change it)."""
    if layer.is_native:
        w = layer.dequantized_native()
        return w if fmt == layer.precision.weight else _fq(w, fmt)
    return layer.weight_cache(("fq", fmt), weight, amax, lambda: _fq(weight, fmt, amax=amax))


def _w_bf16(layer, weight, fmt, amax=None):
    """The weight operand fake-quantized, in bf16 (for GEMMs emulated on bf16 tensor cores)."""
    key = ("bf16", fmt)
    if layer.is_native:
        return layer.weight_cache(key, None, None, lambda: _w_fq(layer, weight, fmt).to(torch.bfloat16))
    if fmt is None:
        return layer.weight_cache(key, weight, amax, lambda: weight.to(torch.bfloat16))
    return layer.weight_cache(key, weight, amax, lambda: fake_quant(weight, fmt, amax=amax, out_dtype=torch.bfloat16))


def _w_fp8(layer, weight, fmt, amax=None):
    """The weight operand as (FP8 codes, scale)."""
    if layer.is_native:
        if fmt == layer.precision.weight:
            return layer.native_fp8_operand()
        return _fp8_operand(layer.dequantized_native(), fmt)
    return layer.weight_cache(("fp8", fmt), weight, amax, lambda: _fp8_operand(weight, fmt, amax=amax))


def _scaled_mm(a, sa, b_t, sb, out_dtype, fast_accum=False):
    """``(a * sa) @ (b_t * sb)^T`` on FP8 tensor cores: a (M, K) row-major, b_t (N, K) row-major;
    sa (M, 1) or (1,), sb (N, 1) or (1,). ``fast_accum``: Hopper's faster FP8 accumulation (used
    for fprop only, as torchao does).

    Per-row scales use cuBLAS's rowwise kernel when both operands are E4M3; otherwise (E5M2 with
    per-row scales) the GEMM runs with unit scales into fp32 and the row/column scales multiply
    the output — the same product, since scaling a row of ``a`` scales that row of the result."""
    M, N = a.shape[0], b_t.shape[0]
    if sa.numel() == 1 and sb.numel() == 1:
        return torch._scaled_mm(a, b_t.t(), scale_a=sa.reshape(()), scale_b=sb.reshape(()), out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    if a.dtype == b_t.dtype == torch.float8_e4m3fn:
        sa = sa.reshape(-1, 1).expand(M, 1).contiguous()
        sb = sb.reshape(1, -1).expand(1, N).contiguous()
        out = torch._scaled_mm(a, b_t.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16, use_fast_accum=fast_accum)
        return out.to(out_dtype)
    one = torch.ones((), device=a.device)
    out = torch._scaled_mm(a, b_t.t(), scale_a=one, scale_b=one, out_dtype=torch.float32, use_fast_accum=fast_accum)
    return (out * sa.reshape(-1, 1) * sb.reshape(1, -1)).to(out_dtype)


def _pad_rows(t: torch.Tensor, multiple: int = 16) -> torch.Tensor:
    pad = (-t.shape[0]) % multiple
    return torch.nn.functional.pad(t, (0, 0, 0, pad)) if pad else t


def _bf16_gemm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    return (a.to(torch.bfloat16) @ b_t.to(torch.bfloat16).t()).float()


# ---- the autograd function -------------------------------------------------------------------
class QLinearFunction(torch.autograd.Function):
    """Inputs: x2 (M, K), weight (N, K) (the latent master; for a native layer its packed
    buffer, read through the layer), bias or None, anchor (a 0-d tensor that requires grad so
    backward always runs for native weights), layer (the module: precision, mode, amax
    histories, weight caches, native-grad sink, telemetry)."""

    @staticmethod
    def forward(ctx, x2, weight, bias, anchor, layer):
        p = layer.precision
        mode = layer.gemm_mode
        f_in, f_w = p.operand("fprop", "input"), p.operand("fprop", "weight")
        maybe_record(layer, "input", x2, f_in)
        maybe_record(layer, "weight", lambda: layer.dequantized_native() if layer.is_native else weight, f_w)
        amax_x = layer.delayed_amax("input", x2)
        amax_w = layer.delayed_amax("weight", weight)
        out_dtype = x2.dtype
        empty = x2.new_empty(0)
        w_keep = x_keep = (empty, empty)
        if mode == "tensorcore" and kernels.use_ternary_gemv(layer, x2, f_w):
            # few tokens: the GEMV is memory-bound, reading 2-bit codes beats any FP8 GEMM
            y = kernels.ternary_gemv(_fq(x2, f_in, amax=amax_x), layer).to(out_dtype)
        elif mode == "tensorcore" and _gemm_on_fp8(p, "fprop"):
            xa, sx = _fp8_operand(x2, f_in, amax=amax_x)
            wb, sw = _w_fp8(layer, weight, f_w, amax_w)
            y = _scaled_mm(xa, sx, wb, sw, out_dtype, fast_accum=True)
            # backward reuses FP8 operands instead of quantizing them again (and keeps 1 byte per
            # activation instead of 2): the weight for dgrad, the input for wgrad (per-tensor there)
            if p.operand("dgrad", "weight") == f_w:
                w_keep = (wb, sw)
            if p.operand("wgrad", "input") == f_in and sx.numel() == 1 and _gemm_on_fp8(p, "wgrad"):
                x_keep = (xa, sx)
        elif mode == "tensorcore":
            y = _bf16_gemm(_fq(x2, f_in, amax=amax_x), _w_bf16(layer, weight, f_w, amax_w)).to(out_dtype)
        elif mode == "bf16":
            y = (x2.to(torch.bfloat16) @ weight.to(torch.bfloat16).t()).to(out_dtype)
        else:
            y = (_fq(x2, f_in, amax=amax_x) @ _w_fq(layer, weight, f_w, amax_w).t()).to(out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.layer = layer
        ctx.has_bias = bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.w_dtype = weight.dtype
        ctx.x_dtype = x2.dtype
        ctx.save_for_backward(x2 if not x_keep[0].numel() else empty, weight, *w_keep, *x_keep)
        return y

    @staticmethod
    def backward(ctx, dy):
        x2, weight, wb_kept, sw_kept, xa_kept, sx_kept = ctx.saved_tensors
        layer = ctx.layer
        p = layer.precision
        mode = layer.gemm_mode
        dy = dy.contiguous()
        f_g = p.operand("dgrad", "grad")
        maybe_record(layer, "grad", dy, f_g)
        amax_g = layer.delayed_amax("grad", dy)
        rnd = p.grad_rounding
        dx = dw = None
        g_keep = None
        needs_x, needs_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1] or layer.is_native
        # dgrad
        if needs_x:
            f_wd = p.operand("dgrad", "weight")
            if mode == "tensorcore" and _gemm_on_fp8(p, "dgrad"):
                wb, sw = (wb_kept, sw_kept) if wb_kept.numel() else _w_fp8(layer, weight, f_wd)
                if sw.numel() != 1:  # per-output-channel weight scale: fold into dy's columns
                    dy_s, sw = dy.float() * sw.reshape(1, -1), sw.new_ones(1)
                else:
                    dy_s = dy
                ga, sg = _fp8_operand(dy_s, f_g, rnd, amax=None if dy_s is not dy else amax_g)
                dx = _scaled_mm(ga, sg, wb.t().contiguous(), sw, ctx.x_dtype)
                if dy_s is dy and sg.numel() == 1 and p.operand("wgrad", "grad") == f_g and not dy.shape[0] % 16:
                    g_keep = (ga, sg)  # wgrad reuses the per-tensor FP8 gradient
            elif mode == "tensorcore":
                dx = _bf16_gemm(_fq(dy, f_g, rnd, amax_g), _w_bf16(layer, weight, f_wd).t()).to(ctx.x_dtype)
            elif mode == "bf16":
                dx = (dy.to(torch.bfloat16) @ weight.to(torch.bfloat16)).to(ctx.x_dtype)
            else:
                dx = (_fq(dy, f_g, rnd, amax_g) @ _w_fq(layer, weight, f_wd)).to(ctx.x_dtype)
        # wgrad
        if needs_w:
            f_gw, f_xw = p.operand("wgrad", "grad"), p.operand("wgrad", "input")
            if mode == "tensorcore" and _gemm_on_fp8(p, "wgrad"):
                ga, sg = g_keep if g_keep is not None else _fp8_operand(_pad_rows(dy), f_gw, rnd, tensorwise=True)
                if xa_kept.numel():
                    xb, sx = _pad_rows(xa_kept), sx_kept
                else:
                    xb, sx = _fp8_operand(_pad_rows(x2), f_xw, tensorwise=True)
                dw = _scaled_mm(ga.t().contiguous(), sg, xb.t().contiguous(), sx, torch.float32)
            elif mode == "tensorcore":
                dw = _bf16_gemm(_fq(dy, f_gw, rnd).t(), _fq(x2, f_xw).t())
            elif mode == "bf16":
                dw = (dy.to(torch.bfloat16).t() @ x2.to(torch.bfloat16)).float()
            else:
                dw = _fq(dy, f_gw, rnd).t() @ _fq(x2, f_xw)
            pseudo = layer.weight_pseudo_grad(weight)
            if pseudo is not None:
                dw = dw * pseudo
            if layer.is_native:
                layer.accumulate_native_grad(dw)
                dw = None
            else:
                dw = dw.to(ctx.w_dtype)
        db = dy.sum(0).to(ctx.bias_dtype) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return dx, dw, db, None, None


def weight_pseudo_grad(weight: torch.Tensor, fmt: Format | None, ste: str) -> torch.Tensor | None:
    """The weight STE's factor ``g(W / s)`` (None for the identity STE)."""
    if fmt is None or ste == "identity":
        return None
    _, s = quantize_dequantize(weight.detach(), fmt)
    u = torch.where(s > 0, weight.detach().float() / s, 0.0)
    return STES[ste](u, fmt.max_value)
