"""lowprec: number formats, exact quantization, packed tensors, STE, precision-aware layers,
their GEMM plans and kernel registry, per-layer policies, loss scaling and numerics telemetry for
low-precision training."""

from .formats import FORMATS, Format, format
from .precision import LayerPrecision
from .kernels import KERNELS
from .plan import DeviceSpec, GemmPlan, build_plan
from .qtensor import QTensor, predicted_nbytes, quantize
from .scaling import quantize_dequantize
from .ste import STES, fake_quantize
from .telemetry import Telemetry
from . import nn  # noqa: E402  (layers need the names above)
from .policy import PolicyReport, PrecisionPolicy, apply_policy  # noqa: E402  (policies build lowprec.nn layers)
from .loss_scaler import LossScaler

__all__ = [
    "FORMATS", "Format", "format", "QTensor", "quantize", "quantize_dequantize", "predicted_nbytes",
    "fake_quantize", "STES", "LayerPrecision", "Telemetry", "nn",
    "PrecisionPolicy", "apply_policy", "PolicyReport", "LossScaler", "GemmPlan", "DeviceSpec", "build_plan",
    "KERNELS",
]
