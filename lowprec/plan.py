"""GemmPlan: how one quantized linear layer computes, decided once per device.

A linear layer ``y = x W^T + b`` (``x: (M, K)`` tokens by ``in_features``, ``W: (N, K)``) runs
three GEMMs per training step, each written as ``A @ B^T``::

    fprop  y  = Q(x)  @ Q(W)^T          A = x    (M, K)   B = W    (N, K)
    dgrad  dx = Q(dy) @ Q(W)            A = dy   (M, N)   B = W^T  (K, N)
    wgrad  dW = Q(dy)^T @ Q(x)          A = dy^T (N, M)   B = x^T  (K, M)

``Q`` quantizes an operand in its *own* layout (per-token scales are per row of ``x`` and ``dy``;
a weight's block scales run along ``K``), so a scale granularity either survives the transposition
(per-tensor) or ends up along the contraction (per-token scales in wgrad, a per-output-channel
weight scale in dgrad), where no FP8 GEMM can apply it.

:func:`build_plan` turns a :class:`~lowprec.LayerPrecision`, a device and the layer's shape into
an immutable :class:`GemmPlan`: for each GEMM its operand formats and one kernel from
:mod:`lowprec.kernels`, with the reason; which quantized operands backward reuses from forward;
and a packed small-batch kernel for fprop where one applies. Backends:

- ``emulated``: every GEMM on the reference kernel.
- ``auto``: per GEMM the first supported kernel that computes the policy's formats: exact FP8
  tensor cores, else bf16 tensor cores on the quantized operands, else the reference. ``auto``
  never drops a format: where no fast kernel applies it is the reference, not plain bf16.
- ``tensorcore``: as ``auto``, but the device must have FP8 tensor cores (an error otherwise).
- ``unquantized``: the formats are not applied at all; GEMMs run in plain bf16. An explicit choice
  for speed comparisons; reports name every such layer.

Plans can be built for a described device (``"sm90"``, ``"sm89"``, ``"cpu"``) on any machine, so
the decisions are testable without the hardware.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from . import kernels
from .formats import Format
from .precision import GEMMS, LayerPrecision


@dataclass(frozen=True)
class DeviceSpec:
    """What a plan needs to know of a device: its type and CUDA compute capability."""

    type: str  # "cpu" | "cuda" | "meta" | ...
    capability: tuple[int, int] | None = None

    @classmethod
    def of(cls, device) -> "DeviceSpec":
        """From a ``DeviceSpec``, a ``torch.device``/string (a CUDA device is queried) or a
        described GPU ``"smXY"`` (e.g. ``"sm90"`` for an H100)."""
        if isinstance(device, DeviceSpec):
            return device
        if isinstance(device, str) and (m := re.fullmatch(r"sm_?(\d)(\d)", device)):
            return cls("cuda", (int(m.group(1)), int(m.group(2))))
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"unknown device {device!r}; give a torch device or a described GPU such as 'sm90'") from e
        if dev.type == "cuda":
            return cls("cuda", tuple(torch.cuda.get_device_capability(dev)))
        return cls(dev.type)

    @property
    def fp8_tensor_cores(self) -> tuple[bool, str]:
        """(available, reason): FP8 tensor cores need CUDA compute capability >= 8.9."""
        if self.type != "cuda":
            return False, f"device {self} is not CUDA"
        if self.capability < (8, 9):
            return False, f"{self} (compute capability {self.capability[0]}.{self.capability[1]}) has no FP8 tensor cores"
        return True, "ok"

    def __str__(self) -> str:
        return f"sm{self.capability[0]}{self.capability[1]}" if self.type == "cuda" and self.capability else self.type


@dataclass(frozen=True)
class GemmSpec:
    """One GEMM of the plan: ``a``/``b`` are the formats of its operands ``A``/``B`` (None: not
    quantized), ``kernel`` the registry name that runs it, ``reason`` why (the kernels passed over)."""

    name: str
    a: Format | None
    b: Format | None
    kernel: str
    reason: str

    @property
    def exact(self) -> bool:
        """True if the kernel multiplies the quantized operands without rounding them again."""
        return kernels.KERNELS[self.kernel].exact_for(self.name, self.a, self.b)


# operand roles of A and B per GEMM, and whether their quantization rows are the contraction
ROLES = {"fprop": ("input", "weight"), "dgrad": ("grad", "weight"), "wgrad": ("grad", "input")}


@dataclass(frozen=True)
class GemmPlan:
    """How a layer of ``in_features -> out_features`` runs on ``device`` (see the module doc).

    ``reuse_weight``: dgrad takes fprop's weight operand (FP8 codes or quantized values: one
    quantization of the weight per step, however often the layer is called); ``reuse_input``: wgrad
    takes fprop's quantized input (with FP8, 1 byte per activation saved instead of 2);
    ``reuse_grad``: wgrad takes dgrad's quantized gradient. ``gemv``: a kernel for fprop when at most ``kernels.GEMV_MAX_ROWS`` tokens
    come (the packed ternary weight read directly), or None."""

    precision: LayerPrecision
    device: DeviceSpec
    in_features: int
    out_features: int
    fprop: GemmSpec
    dgrad: GemmSpec
    wgrad: GemmSpec
    reuse_weight: bool = False
    reuse_input: bool = False
    reuse_grad: bool = False
    gemv: str | None = None

    @property
    def gemms(self) -> tuple[GemmSpec, GemmSpec, GemmSpec]:
        return self.fprop, self.dgrad, self.wgrad

    @property
    def unquantized(self) -> bool:
        """True if the layer's formats are not applied (backend ``unquantized``)."""
        return self.precision.backend == "unquantized" and self.precision.is_quantized

    def describe(self) -> str:
        """One line for reports: the kernel of each GEMM (and the GEMV), ``*`` marking kernels that
        round quantized operands to bf16 once more."""
        if self.unquantized:
            return "UNQUANTIZED bf16 (formats not applied)"
        by_kernel: dict[str, list[str]] = {}
        for g in self.gemms:
            by_kernel.setdefault(g.kernel + ("" if g.exact else "*"), []).append(g.name)
        text = ", ".join(f"{k}: {'/'.join(v)}" for k, v in by_kernel.items())
        if len(by_kernel) == 1:
            text = next(iter(by_kernel))
        if self.gemv:
            text += f" (+{self.gemv} for <= {kernels.GEMV_MAX_ROWS} tokens)"
        return f"{text} [{self.device}]"


# True: a bf16 tensor-core GEMM takes an FP8 GEMM's operand of the same tensor and format (its codes in bf16,
# per-row scales folded in: the same values) instead of quantizing the tensor again; False: it quantizes it
# itself (the plans as they were, for a side-by-side measurement). Read when a plan is built
BF16_TAKES_FP8_CODES = True


def _reusable(src: GemmSpec, dst: GemmSpec, fmt_src, fmt_dst) -> bool:
    """Whether ``dst`` can take the operand ``src`` quantized, transposed: the same kernel and format (or
    the other FP8 kernel, for a per-tensor format: :func:`lowprec.kernels.same_operand`), or
    the same format from an int8 or FP8 kernel for the bf16 kernel (int8 integers and E4M3/E5M2 codes are
    exact in bf16: its operand is the codes in bf16, as quantizing again gives), and no per-row scale
    that the transposition would put along an FP8 GEMM's contraction (the reference and bf16 kernels fold
    such scales into the values, exactly as quantizing again would)."""
    into_bf16 = dst.kernel == "bf16_tensorcore" and (src.kernel == "int8_tensorcore"
                                                     or (BF16_TAKES_FP8_CODES and src.kernel.startswith("fp8")))
    if not (kernels.same_operand(src.kernel, dst.kernel, fmt_src) or into_bf16) or fmt_src != fmt_dst \
            or src.kernel == "bf16":
        return False
    return not dst.kernel.startswith("fp8") or fmt_src.granularity != "row"


def build_plan(precision: LayerPrecision, in_features: int, out_features: int, device) -> GemmPlan:
    """The :class:`GemmPlan` of a layer (see the module doc). ``device``: a torch device or a
    described one (``"sm90"``). ``ValueError`` if ``backend="tensorcore"`` and the device has no
    FP8 tensor cores."""
    dev = DeviceSpec.of(device)
    backend = precision.backend
    if backend == "tensorcore" and precision.is_quantized:
        ok, why = dev.fp8_tensor_cores
        if not ok:
            raise ValueError(f"backend 'tensorcore' unavailable: {why}; use backend 'auto' or 'emulated'")
    shape = (in_features, out_features)
    specs = {}
    for gemm in GEMMS:
        a, b = (precision.operand(gemm, op) for op in ROLES[gemm])
        if backend == "unquantized" or (a is None and b is None):
            kernel, reason = ("bf16" if backend == "unquantized" else "matmul"), "operands not quantized"
        elif backend == "emulated":
            kernel, reason = "emulated", "backend emulated"
        else:
            kernel, reason = kernels.select(gemm, a, b, dev, shape)
        specs[gemm] = GemmSpec(gemm, a, b, kernel, reason)
    fp, dg, wg = specs["fprop"], specs["dgrad"], specs["wgrad"]
    reuse_weight = _reusable(fp, dg, fp.b, dg.b)
    reuse_input = _reusable(fp, wg, fp.a, wg.b)
    reuse_grad = _reusable(dg, wg, dg.a, wg.a)
    gemv = None
    if precision.storage == "native" and backend in ("auto", "tensorcore") and fp.b == precision.weight:
        ok, _ = kernels.KERNELS["packed_ternary_gemv"].check_support("fprop", fp.a, fp.b, dev, shape)
        gemv = "packed_ternary_gemv" if ok else None
    return GemmPlan(precision, dev, in_features, out_features, fp, dg, wg, reuse_weight, reuse_input, reuse_grad, gemv)


__all__ = ["DeviceSpec", "GemmSpec", "GemmPlan", "build_plan", "ROLES"]
