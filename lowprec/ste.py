"""Straight-through estimators: differentiable fake quantization.

``fake_quantize(x, fmt, ste=...)`` returns ``Q(x) = s * round(x / s)`` in ``x``'s dtype (the
scale ``s`` of each element's group, see :mod:`lowprec.formats`). Rounding has zero derivative
almost everywhere, so the backward pass uses a pseudo-gradient ``dQ/dx ~= g(u)`` of the
normalized input ``u = x / s``; the scale is treated as a constant (as in BitNet and larq).
``m`` below is the format's largest element magnitude (``fmt.max_value``; 1 for ternary/binary).
"""

from __future__ import annotations

import torch

from .common import to_dtype
from .formats import format as get_format
from .scaling import quantize_dequantize

SWISH_BETA = 5.0  # larq's default beta for SwishSign


def _identity(u, m):
    """identity: forward Q(x); backward dL/dx = dL/dQ, i.e. g(u) = 1 (Bengio et al. 2013)."""
    return None


def _clipped(u, m):
    """clipped: forward Q(x); backward g(u) = 1 if |u| <= m else 0 — no gradient for inputs
    outside the representable range (saturated values); for binary this is larq's ``ste_sign``."""
    return (u.abs() <= m).to(u.dtype)


def _approx_sign(u, m):
    """approx_sign (binary; Liu et al. 2018, Bi-Real Net; larq ``approx_sign``):
    forward Q(x) = s * sign(x); backward g(u) = 2 - 2|u| for |u| < 1, else 0
    (the derivative of the piecewise-quadratic approximation of sign)."""
    return (2.0 - 2.0 * u.abs()).clamp(min=0.0)


def _swish_sign(u, m, beta=SWISH_BETA):
    """swish_sign (binary; Darabi et al. 2018, BNN+; larq ``swish_sign``, beta = 5):
    forward Q(x) = s * sign(x); backward
    g(u) = beta * (2 - beta * u * tanh(beta * u / 2)) / (1 + cosh(beta * u))."""
    bu = beta * u
    return beta * (2.0 - bu * torch.tanh(bu / 2.0)) / (1.0 + torch.cosh(bu))


STES = {"identity": _identity, "clipped": _clipped, "approx_sign": _approx_sign, "swish_sign": _swish_sign}
_BINARY_ONLY = ("approx_sign", "swish_sign")


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, fmt, ste, rounding, generator):
        xq, s = quantize_dequantize(x.detach(), fmt, rounding=rounding, generator=generator)
        if ste == "identity":
            ctx.pseudo = None
        else:
            u = torch.where(s > 0, x.detach().float() / s, 0.0)
            ctx.pseudo = STES[ste](u, fmt.max_value)
        return to_dtype(xq, x.dtype)

    @staticmethod
    def backward(ctx, grad):
        if ctx.pseudo is not None:
            grad = (grad.float() * ctx.pseudo).to(grad.dtype)
        return grad, None, None, None, None


def fake_quantize(x: torch.Tensor, fmt, *, ste: str = "identity", rounding: str = "nearest",
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Quantize-dequantize ``x`` through ``fmt``, differentiable through the STE ``ste``
    (one of ``STES``: identity, clipped, and for binary approx_sign, swish_sign)."""
    fmt = get_format(fmt)
    if ste not in STES:
        raise ValueError(f"unknown ste {ste!r}; choose one of {', '.join(STES)}")
    if ste in _BINARY_ONLY and fmt.kind != "binary":
        raise ValueError(f"ste {ste!r} is a pseudo-gradient of sign(); use it with the binary format, not {fmt.name!r}")
    return _FakeQuantize.apply(x, fmt, ste, rounding, generator)
