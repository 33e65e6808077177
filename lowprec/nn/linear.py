"""QLinear: ``y = x W^T + b`` with each of its three GEMMs in the formats of a LayerPrecision.

Storage ``latent``: ``weight`` is an ordinary float Parameter (the master), quantized in every
forward; its gradient passes the weight STE. Storage ``native``: see :mod:`lowprec.nn.native`.
The bias stays in the dtype it was given (bf16/fp32). How the GEMMs run is the layer's
:class:`~lowprec.plan.GemmPlan` (``layer.plan``), built once per device; :mod:`lowprec.gemm` runs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from .. import gemm
from ..fsdp import as_gathered
from ..plan import GemmPlan, build_plan
from ..precision import FULL_PRECISION, LayerPrecision
from ..telemetry import maybe_record, recording
from .native import NativeWeightMixin, OperandCache, check_module_precision, resident_param_bytes


class QLinear(NativeWeightMixin, nn.Module):
    """Drop-in for ``nn.Linear`` governed by ``precision``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 precision: LayerPrecision = FULL_PRECISION, *, device=None, dtype=None, weight: torch.Tensor | None = None):
        super().__init__()
        check_module_precision(precision)
        self.in_features, self.out_features = in_features, out_features
        self.precision = precision
        self.telemetry_slot = None
        self._plan: GemmPlan | None = None
        self._plan_error: ValueError | None = None
        self._plan_device: torch.device | None = None
        self._operands = OperandCache()
        # (format, dtype): the GEMMs see the latent weight as a data-parallel run's ranks hold it,
        # gathered in that format and dequantized to that dtype (lowprec.fsdp.as_gathered); None: as it is
        self.gathered_as = None
        if weight is None:
            weight = torch.empty(out_features, in_features, device=device, dtype=dtype)
            if weight.device.type != "meta":
                nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
        if tuple(weight.shape) != (out_features, in_features):
            raise ValueError(f"weight shape {tuple(weight.shape)} != ({out_features}, {in_features})")
        if self.is_native:
            self._init_native(weight)
            self.register_parameter("weight", None)
        else:
            self.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, device=weight.device, dtype=dtype or weight.dtype))
        else:
            self.register_parameter("bias", None)
        self._init_delayed(weight.device)
        self._io = gemm.LayerIO(self._operands, self._record, getattr(self, "amax_history_grad", None), self._recording)
        self._replan()

    def _record(self, operand, x, fmt):
        if self.telemetry_slot is not None:  # else nothing to record (and, compiled, nothing more to trace)
            maybe_record(self, operand, x, fmt)

    def _recording(self) -> bool:
        return recording(self)

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

    def _history(self, operand: str):
        """``operand``'s amax history, which its GEMMs push at each call (None with current scaling)."""
        name = self._delayed.get(operand)
        if name is None or (operand == "weight" and self.is_native):
            return None
        return getattr(self, name)

    # ---- the plan ----------------------------------------------------------------------------------
    def plan_for(self, device) -> GemmPlan:
        """This layer's plan on ``device`` (a torch device or a described GPU such as ``"sm90"``)."""
        return build_plan(self.precision, self.in_features, self.out_features, device)

    def _replan(self) -> None:
        """Build the plan for the device the weight is on (when it is placed and whenever it moves)."""
        dev = (self.weight if self.weight is not None else self.w_data).device
        self._plan, self._plan_error, self._plan_device = None, None, dev
        if dev.type != "meta":
            try:
                self._plan = self.plan_for(dev)
            except ValueError as e:  # e.g. backend tensorcore while the model is still on the CPU
                self._plan_error = e

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._replan()
        return out

    @property
    def plan(self) -> GemmPlan:
        """The plan for the device the weight is on (built when the layer is placed or moved)."""
        dev = (self.weight if self.weight is not None else self.w_data).device
        if self._plan_device != dev:
            self._replan()
        if self._plan is None:
            raise self._plan_error or ValueError(f"QLinear on {dev} is not placed on a device yet")
        return self._plan

    def backend_note(self) -> str:
        """The plan, in one line (or why none can be built where the weight is now)."""
        dev = (self.weight if self.weight is not None else self.w_data).device
        if dev.type == "meta":
            return f"{self.precision.backend} (not placed yet)"
        try:
            return self.plan.describe()
        except ValueError as e:
            return f"{self.precision.backend} (on {dev}: {e})"

    # ---- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QLinear expects last dimension {self.in_features}, got input {tuple(x.shape)}")
        plan = self.plan
        if self._delayed:  # the buffer is replaced when the module moves
            self._io.grad_history = self._buffers.get("amax_history_grad")
        x2 = x.reshape(-1, self.in_features)
        hist_x = self._history("input")
        gathered = None
        if self.is_native:
            w, carrier, hist_w = (self.w_data, self.w_scale, self.w_global), self._grad_carrier, None
        else:
            weight, carrier, gathered = self.weight, None, self.gathered_as
            if gathered is not None and (self._delayed or not gemm.gathered_applies(plan, gathered)):
                weight, gathered = as_gathered(weight, *gathered), None  # the GEMMs read it as any weight
            w = (weight, None, None)
            hist_w = self._history("weight")
        y = gemm.QLinearFunction.apply(x2, *w, self.bias, carrier, hist_x, hist_w, plan, self._io, gathered)
        return y.reshape(*x.shape[:-1], self.out_features)

    def recurrent_gemms(self, weights: bool = True) -> tuple[gemm.RecurrentGemms, tuple | None]:
        """This layer's GEMMs for a caller that applies it once per step of a recurrence inside one
        autograd node of its own, with the weight gradient of all steps as ONE GEMM
        (:class:`~lowprec.gemm.RecurrentGemms`: what it computes exactly as the layer, and what not).

        Returns ``(gemms, weights)``: ``weights`` = ``(weight, None, None, None)`` (latent) or
        ``(w_data, w_scale, w_global, carrier)`` (native) are the tensors the caller's node takes as
        inputs, hands back to ``gemms``' calls, and returns ``gemms.wgrad``'s gradients for. Build
        it where the layer would be called (a forward hook of a unit that gathers the weight has
        run); the layer's own forward hooks do not run. A weight read as gathered (``gathered_as``) is
        handed over as ``as_gathered(weight, ...)``. ``weights=False``: ``(gemms, None)``, computing no
        tensor (what a caller's backward looks the gemms up with). ``ValueError`` for a layer with a bias."""
        if self.bias is not None:
            raise ValueError("recurrent_gemms: a layer with a bias (its gradient would be one more sum over the steps)")
        plan = self.plan
        if self._delayed:  # the buffers are replaced when the module moves
            self._io.grad_history = self._buffers.get("amax_history_grad")
        history = {op: getattr(self, name) for op, name in self._delayed.items()}
        if self.is_native:
            tensors = (self.w_data, self.w_scale, self.w_global, self._grad_carrier)
            history.pop("weight", None)
        elif weights:
            weight = self.weight if self.gathered_as is None else as_gathered(self.weight, *self.gathered_as)
            tensors = (weight, None, None, None)
        gemms = gemm.RecurrentGemms(plan, self._io, history.get("input"), history.get("weight"))
        return gemms, tensors if weights else None

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
