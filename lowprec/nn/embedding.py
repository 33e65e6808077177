"""QEmbedding: a lookup table whose rows are in the weight format of a LayerPrecision.

Forward ``out = Q(W)[idx]``; the gradient arriving at ``out`` is quantized to the ``grad``
format (``wgrad.grad`` override) before it is scattered into the table's gradient.
``input`` formats do not apply (the input is indices). Latent storage: ``weight`` is the float
master and gets the STE gradient; native: the table lives packed (see :mod:`lowprec.nn.native`).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..precision import FULL_PRECISION, LayerPrecision
from ..scaling import quantize_dequantize
from ..ste import fake_quantize
from ..telemetry import maybe_record
from .native import NativeWeightMixin, check_module_precision, resident_param_bytes


class _QuantizeGrad(torch.autograd.Function):
    """Identity forward; backward quantize-dequantizes the incoming gradient."""

    @staticmethod
    def forward(ctx, x, fmt, rounding, layer):
        ctx.fmt, ctx.rounding, ctx.layer = fmt, rounding, layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        maybe_record(ctx.layer, "grad", g, ctx.fmt)
        return quantize_dequantize(g, ctx.fmt, rounding=ctx.rounding)[0].to(g.dtype), None, None, None


class QEmbedding(NativeWeightMixin, nn.Module):
    """Drop-in for ``nn.Embedding`` (no max_norm / sparse) governed by ``precision``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 precision: LayerPrecision = FULL_PRECISION, *, device=None, dtype=None, weight: torch.Tensor | None = None):
        super().__init__()
        check_module_precision(precision)
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.precision = precision
        self.telemetry_slot = None
        if weight is None:
            weight = torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype)
            if weight.device.type != "meta":
                nn.init.normal_(weight)
        if tuple(weight.shape) != (num_embeddings, embedding_dim):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({num_embeddings}, {embedding_dim})")
        if self.is_native:
            self._init_native(weight)
            self.register_parameter("weight", None)
        else:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)

    @classmethod
    def from_float(cls, emb: nn.Embedding, precision: LayerPrecision) -> "QEmbedding":
        if emb.max_norm is not None or emb.sparse:
            raise ValueError("QEmbedding does not support max_norm or sparse embeddings")
        return cls(emb.num_embeddings, emb.embedding_dim, emb.padding_idx, precision, weight=emb.weight)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        p = self.precision
        fmt = p.operand("fprop", "weight")
        if self.is_native:
            table = self.native_weight.dequantize(torch.float32)
            table.requires_grad_(True)
            table.register_hook(self._native_hook)
        else:
            maybe_record(self, "weight", self.weight, fmt)
            table = self.weight if fmt is None else fake_quantize(self.weight, fmt, ste=p.ste)
        out = F.embedding(idx, table, self.padding_idx)
        g = p.operand("wgrad", "grad")
        if g is not None and out.requires_grad:
            out = _QuantizeGrad.apply(out, g, p.grad_rounding, self)
        return out

    def _native_hook(self, grad):
        self.accumulate_native_grad(grad)
        return None

    def resident_bytes(self) -> int:
        return self.native_nbytes() if self.is_native else resident_param_bytes(self.weight)

    def weight_bits(self) -> float:
        fmt = self.precision.weight
        if self.is_native:
            return 8 * self.native_nbytes() / (self.num_embeddings * self.embedding_dim)
        return 8.0 * self.weight.element_size() if fmt is None else fmt.effective_bits

    def backend_note(self) -> str:
        return "lookup (dequantized rows)"

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, {self.precision.describe()}, "
                f"storage={self.precision.storage}")
