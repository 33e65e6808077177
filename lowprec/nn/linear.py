"""QLinear: ``y = x W^T + b`` with each of its three GEMMs in the formats of a LayerPrecision.

Storage ``latent``: ``weight`` is an ordinary float Parameter (the master), quantized in every
forward; its gradient passes the weight STE. Storage ``native``: see :mod:`lowprec.nn.native`.
The bias stays in the dtype it was given (bf16/fp32). How the GEMMs run: :mod:`lowprec.gemm`.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import gemm
from ..precision import FULL_PRECISION, LayerPrecision
from .native import NativeWeightMixin, check_module_precision, resident_param_bytes


class QLinear(NativeWeightMixin, nn.Module):
    """Drop-in for ``nn.Linear`` governed by ``precision``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 precision: LayerPrecision = FULL_PRECISION, *, device=None, dtype=None, weight: torch.Tensor | None = None):
        super().__init__()
        check_module_precision(precision)
        self.in_features, self.out_features = in_features, out_features
        self.precision = precision
        self.telemetry_slot = None
        self._plan = None  # (device, mode, note, tokens), made at the first forward on a device
        if weight is None:
            weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
            if weight.device.type != "meta":
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({out_features}, {in_features})")
        if self.is_native:
            self._init_native(weight)
            self.register_parameter("weight", None)
            # backward must run even if nothing upstream needs a gradient, to deliver the
            # native weight's gradient: this 0-d tensor is an input that requires grad
            self._anchor = torch.zeros((), requires_grad=True)
        else:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
            self._anchor = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=dtype or weight.dtype))
        else:
            self.register_parameter("bias", None)
        self._init_delayed(weight.device)

    @classmethod
    def from_float(cls, linear: nn.Linear, precision: LayerPrecision) -> "QLinear":
        """A QLinear with ``linear``'s weight (the same Parameter when latent) and bias."""
        q = cls(linear.in_features, linear.out_features, bias=False, precision=precision, weight=linear.weight)
        q.bias = linear.bias
        return q

    # ---- delayed scaling ----------------------------------------------------------------------
    def _init_delayed(self, device):
        self._delayed = {}
        if self.precision.scaling != "delayed":
            return
        for operand in ("input", "weight", "grad"):
            fmt = self.precision.operand("fprop" if operand != "grad" else "dgrad", operand)
            if fmt is not None and fmt.scale == "absmax" and fmt.granularity == "tensor":
                buf = torch.zeros(self.precision.amax_history, device=device)
                self.register_buffer(f"amax_history_{operand}", buf)
                self._delayed[operand] = f"amax_history_{operand}"

    @torch.no_grad()
    def delayed_amax(self, operand: str, t: torch.Tensor):
        """Delayed scaling (Transformer Engine's DelayedScaling): the amax used now is the max of
        the last ``amax_history`` amaxes (this one if the history is empty); this tensor's amax is
        then pushed into the history. None for operands with current scaling."""
        name = self._delayed.get(operand)
        if name is None or (operand == "weight" and self.is_native):
            return None
        hist = getattr(self, name)
        now = torch.where(torch.isfinite(t), t.detach().abs(), 0).amax().float() if t.numel() else hist.new_zeros(())
        past = hist.amax()
        used = torch.where(past > 0, past, now)
        hist.copy_(torch.cat([now.reshape(1), hist[:-1]]))
        return used

    # ---- GEMM plan, STE ---------------------------------------------------------------------------
    def _ensure_plan(self, device: torch.device, tokens: int | None = None) -> None:
        """Decide how the GEMMs run on ``device`` (once per device: ``auto`` judges by the
        weight's shape and the token count of the first call)."""
        if self._plan is None or self._plan[0] != device or (self._plan[3] is None and tokens is not None):
            mode, note = gemm.plan_gemms(self.precision, self.in_features, self.out_features, device, tokens)
            self._plan = (device, mode, note, tokens)

    @property
    def gemm_mode(self) -> str | None:
        """How this layer's GEMMs ran at its last forward (``gemm.MODES``); None before any."""
        return None if self._plan is None else self._plan[1]

    def backend_note(self) -> str:
        """How this layer's GEMMs run (decided for the device of its weight, or of its last input)."""
        if self._plan is None:
            dev = (self.weight if self.weight is not None else self.w_data).device
            if dev.type == "meta":
                return f"{self.precision.backend} (not placed yet)"
            try:
                return gemm.plan_gemms(self.precision, self.in_features, self.out_features, dev)[1]
            except RuntimeError as e:  # e.g. tensorcore asked for, weights still on the CPU
                return f"{self.precision.backend} (on {dev}: {e})"
        return self._plan[2]

    def weight_pseudo_grad(self, weight: torch.Tensor):
        if self.is_native:
            return None
        return gemm.weight_pseudo_grad(weight, self.precision.operand("fprop", "weight"), self.precision.ste)

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QLinear expects last dimension {self.in_features}, got input {tuple(x.shape)}")
        self._ensure_plan(x.device, x.numel() // self.in_features)
        if self.is_native:
            weight, anchor = self.w_data, self._anchor  # read through the layer, on demand
        else:
            weight, anchor = self.weight, None
        x2 = x.reshape(-1, self.in_features)
        y = gemm.QLinearFunction.apply(x2, weight, self.bias, anchor, self)
        return y.reshape(*x.shape[:-1], self.out_features)

    # ---- accounting ---------------------------------------------------------------------------
    def resident_bytes(self) -> int:
        """Bytes this layer keeps between steps: weight storage (packed + scales when native, the
        float master when latent) + bias."""
        w = self.native_nbytes() if self.is_native else resident_param_bytes(self.weight)
        return w + resident_param_bytes(self.bias)

    def weight_bits(self) -> float:
        """Bits per weight element of the format the weight computes in (scales included)."""
        fmt = self.precision.weight
        if self.is_native:
            return 8 * self.native_nbytes() / (self.in_features * self.out_features)
        if fmt is None:
            return 8.0 * self.weight.element_size()
        return fmt.effective_bits

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self.precision.describe()}, storage={self.precision.storage}, backend={self.precision.backend}")
