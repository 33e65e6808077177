"""Every tensor the library's autograd.Functions return from forward is made by one operation.

torch.compile (torch 2.11) traces a Function's forward into a graph that returns every
intermediate besides the outputs. A cast to the dtype a tensor already has (or an in-place fill)
returns its input: one tensor, two graph nodes. The tensor is then returned twice, and autograd
gives its gradient to the later place, so backward receives zeros for the real output: with
``train.compile=true`` a bias-free QLinear (the head, attention and FFN projections) or a
fake-quantized embedding passed a zero gradient on, and no weight before it trained. Eager runs
and newer compilers (which drop such duplicates) never show it, so the invariant is tested here
directly: each returned tensor is returned by exactly one torch call inside forward.
"""
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from torch.overrides import TorchFunctionMode

from lowprec import LayerPrecision, fake_quantize
from lowprec.distributed import _ReduceScatterRows
from lowprec.gemm import LayerIO, QLinearFunction
from lowprec.nn import QLinear
from lowprec.nn.native import OperandCache


class Producers(TorchFunctionMode):
    """Counts, per tensor, the torch calls (functions and Tensor methods) that returned it."""

    def __init__(self):
        super().__init__()
        self.calls: Counter[int] = Counter()
        self._alive: list[torch.Tensor] = []  # ids stay unique while the tensors live

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.calls[id(t)] += 1
                self._alive.append(t)
        return out

    def of(self, t: torch.Tensor) -> int:
        return self.calls[id(t)]


BF16 = {"weight": "bf16", "input": "bf16", "grad": "bf16"}
FP8_TENSOR = {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"}, "grad": "fp8_e5m2"}
# (fprop kernel, precision fields, described device): every GEMM kernel that runs on CPU tensors
KERNEL_CASES = {
    "emulated": (BF16, "cpu"),
    "matmul": ({}, "cpu"),
    "bf16": ({**BF16, "backend": "unquantized"}, "cpu"),
    "bf16_tensorcore": (BF16, "sm80"),
    "fp8_tensorwise": (FP8_TENSOR, "sm90"),
    "fp8_rowwise": ({"weight": "fp8_e4m3", "input": "fp8_e4m3", "grad": "fp8_e5m2"}, "sm90"),  # both E4M3
    "fp8_rowwise-e5m2": ({"weight": "fp8_e4m3", "input": "fp8_e5m2", "grad": "fp8_e5m2"}, "sm90"),  # unit scales
}


def rowwise_scaled_mm_on_cpu() -> bool:
    """Whether this torch's CPU ``_scaled_mm`` takes per-row scales (torch 2.11's does not)."""
    a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(KERNEL_CASES))
def test_a_bias_free_layer_returns_its_gemm_result(case, dtype):
    """QLinearFunction without a bias returns the fprop kernel's result: made once, whether or not
    it already has the activation dtype (fp32 activations: the emulated, plain and bf16-tensor-core
    GEMMs produce fp32; bf16 activations: row-wise FP8 produces bf16)."""
    fields, device = KERNEL_CASES[case]
    if case == "fp8_rowwise" and not rowwise_scaled_mm_on_cpu():
        pytest.skip("this torch's CPU _scaled_mm takes per-tensor scales only")
    torch.manual_seed(0)
    layer = QLinear(32, 16, bias=False, precision=LayerPrecision.from_fields(fields), dtype=dtype)
    plan = layer.plan_for(device)
    assert plan.fprop.kernel == case.split("-")[0]
    x = torch.randn(8, 32, dtype=dtype, requires_grad=True)
    with Producers() as made:
        y = QLinearFunction.apply(x, layer.weight, None, None, None, None, None, None, plan, LayerIO(OperandCache()))
    assert y.dtype == dtype and y.requires_grad
    assert made.of(y) == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fake_quantize_returns_one_tensor(dtype):
    """The STE's forward (a latent QEmbedding's table) in the input's dtype, made once."""
    x = torch.randn(16, 8, dtype=dtype, requires_grad=True)
    with Producers() as made:
        y = fake_quantize(x, "bf16")
    assert y.dtype == dtype and made.of(y) == 1


def test_the_sharded_carrier_is_one_tensor():
    """The stride-0 carrier a row-sharded native layer's GEMMs deliver the weight gradient to."""
    local = torch.zeros((2, 8), requires_grad=True)
    with Producers() as made:
        carrier = _ReduceScatterRows.apply(local, SimpleNamespace(full_shape=(4, 8)))
    assert carrier.shape == (4, 8) and carrier.stride() == (0, 0) and not carrier.any()
    assert made.of(carrier) == 1
