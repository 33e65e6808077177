"""Tensor-core backend vs the emulated reference, on a GPU with FP8 tensor cores."""
import pytest
import torch

from lowprec import LayerPrecision
from lowprec.gemm import tensorcore_available
from lowprec.nn import QLinear

pytestmark = pytest.mark.gpu

ACT = {"input": {"format": "fp8_e4m3", "granularity": "tensor"}, "grad": {"format": "fp8_e5m2", "granularity": "tensor"}}
ACT_ROW = {"input": "fp8_e4m3", "grad": "fp8_e5m2"}  # per-token scales
WEIGHTS = ["fp8_e4m3", "ternary", "binary", "fp4_e2m1", {"format": "fp4_e2m1", "granularity": "row"}, "nvfp4", "mxfp8"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def run(precision, w, b, x, dy):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    layer = QLinear.from_float(lin, precision)
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    y.backward(dy)
    return y, xx.grad, layer.weight.grad, layer


@pytest.fixture(scope="module")
def data():
    if not torch.cuda.is_available() or not tensorcore_available(torch.device("cuda"))[0]:
        pytest.skip("needs FP8 tensor cores")
    g = torch.Generator(device="cuda").manual_seed(0)
    M, K, N = 200, 512, 384  # M not a multiple of 16: wgrad pads tokens
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.05).bfloat16()
    b = torch.randn(N, device="cuda", generator=g).bfloat16()
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    return x, w, b, dy


@pytest.mark.parametrize("weight", WEIGHTS, ids=str)
@pytest.mark.parametrize("act", [ACT, ACT_ROW], ids=["tensorwise", "per-token"])
def test_tensorcore_agrees_with_emulated(data, weight, act):
    """Tolerances (relative Frobenius error vs the fp32 emulated reference):
    2e-2 where both backends multiply the same quantized operands: the differences are the bf16
    output rounding (2^-9 relative), FP8 fast accumulation in fprop and accumulation order.
    0.12 where the tensor-core path rounds a gradient to E5M2 with another scale than the
    reference (a per-channel weight scale folded into dy for dgrad; per-tensor instead of
    per-token scales in wgrad, whose contraction runs over tokens): two independent E5M2
    roundings differ by up to 2^-3 relative per element (RMS about 6%), and the relative error
    of a sum of such terms stays of that order."""
    x, w, b, dy = data
    emu = LayerPrecision.from_fields({"weight": weight, **act, "backend": "emulated"})
    tc = LayerPrecision.from_fields({"weight": weight, **act, "backend": "tensorcore"})
    y0, dx0, dw0, _ = run(emu, w, b, x, dy)
    y1, dx1, dw1, layer = run(tc, w, b, x, dy)
    assert layer.gemm_mode == "tensorcore"
    w_per_row = tc.weight.granularity == "row"
    assert rel(y1, y0) < 2e-2
    assert rel(dx1, dx0) < (0.12 if w_per_row else 2e-2), rel(dx1, dx0)
    assert rel(dw1, dw0) < (0.12 if act is ACT_ROW else 2e-2), rel(dw1, dw0)


def test_tensorcore_native_ternary_matches_emulated(data):
    x, w, b, dy = data
    for backend in ("emulated", "tensorcore"):
        p = LayerPrecision.from_fields({"weight": "ternary", **ACT, "storage": "native", "backend": backend})
        lin = torch.nn.Linear(w.shape[1], w.shape[0], device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(b)
        layer = QLinear.from_float(lin, p)
        y = layer(x)
        y.backward(dy)
        if backend == "emulated":
            y0, g0 = y, layer.native_grad
        else:
            assert rel(y, y0) < 2e-2 and rel(layer.native_grad, g0) < 2e-2  # as above


def test_auto_keeps_small_gemms_in_bf16_and_reports_it():
    small = QLinear(1024, 4096, precision=LayerPrecision.from_fields({"weight": "fp8_e4m3", **ACT}), device="cuda")
    big = QLinear(4096, 4096, precision=LayerPrecision.from_fields({"weight": "fp8_e4m3", **ACT}), device="cuda")
    assert "bf16" in small.backend_note() and "tensorcore" in big.backend_note()
    nv = QLinear(4096, 4096, precision=LayerPrecision.from_fields({"weight": "nvfp4", "input": "nvfp4"}), device="cuda")
    assert "FP4" in nv.backend_note() and "emulated" in nv.backend_note()


def test_tensorcore_compiles(data):
    x, w, b, dy = data
    p = LayerPrecision.from_fields({"weight": "fp8_e4m3", **ACT, "backend": "tensorcore"})
    model = torch.nn.Sequential(QLinear(512, 512, precision=p, device="cuda", dtype=torch.bfloat16), torch.nn.GELU(),
                                QLinear(512, 512, precision=p, device="cuda", dtype=torch.bfloat16))
    eager = model(x)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0, [str(r.reason) for r in explained.break_reasons]
    compiled = torch.compile(model)(x)
    # inductor may turn "amax / 448" into a multiplication by 1/448 (1 ulp off the eager scale),
    # which moves a few elements to the neighbouring FP8 code: differences of about 1e-2
    assert rel(compiled, eager) < 3e-2


@pytest.mark.parametrize("m", [1, 8, 33])
def test_packed_ternary_gemv_matches_emulated(m):
    """The Triton kernel reads 2-bit codes; x is rounded to bf16 (2^-9 relative per element) and
    products accumulate in fp32, so outputs agree with the fp32 reference to ~1e-3."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lowprec import kernels

    if kernels.triton is None:
        pytest.skip("needs triton")
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 1000, bias=False, device="cuda")
    x = torch.randn(m, 512, device="cuda")
    out = {}
    for backend in ("emulated", "tensorcore"):
        layer = QLinear.from_float(lin, LayerPrecision.from_fields({"weight": "ternary", "storage": "native", "backend": backend}))
        if backend == "tensorcore":
            assert kernels.use_ternary_gemv(layer, x, layer.precision.weight)
        out[backend] = layer(x)
    assert rel(out["tensorcore"], out["emulated"]) < 5e-3


def test_report_names_layers_that_auto_runs_unquantized():
    """``auto`` runs a 256-wide FP8 layer as a plain bf16 GEMM: after a forward, the refreshed report
    says so and ``unquantized_gemms`` names it; forced onto the tensor cores it is not named."""
    if not torch.cuda.is_available() or not tensorcore_available(torch.device("cuda"))[0]:
        pytest.skip("needs FP8 tensor cores")
    from lowprec.policy import apply_policy

    for backend, named in (("auto", ["0"]), ("tensorcore", [])):
        model = torch.nn.Sequential(torch.nn.Linear(256, 256))
        report = apply_policy(model, {"default": {"weight": "fp8_e4m3", **ACT, "backend": backend}})
        model.cuda()(torch.randn(64, 256, device="cuda"))
        fresh = report.refreshed(model)
        assert fresh.unquantized_gemms(model) == named
        assert fresh.layers[0].backend.startswith("bf16" if named else "tensorcore"), fresh.layers[0].backend
