"""GemmPlan decisions, made on this CPU for described devices: which kernel runs each GEMM."""
import pytest
import torch
from torch import nn

import lowprec
from lowprec import KERNELS, DeviceSpec, LayerPrecision, build_plan
from lowprec.kernels import fp8_grid
from lowprec.nn import QLinear

TENSOR = {"input": {"format": "fp8_e4m3", "granularity": "tensor"}, "grad": {"format": "fp8_e5m2", "granularity": "tensor"}}
TOKEN = {"input": "fp8_e4m3", "grad": "fp8_e5m2"}  # a bare name on activations: per-token scales


def kernels_of(fields, device="sm90", shape=(4096, 4096)):
    plan = build_plan(LayerPrecision.from_fields(fields), *shape, device)
    return plan, tuple(g.kernel for g in plan.gemms)


# (weight, activations) -> (fprop, dgrad, wgrad) kernels on an H100 (sm90)
SM90 = [
    ("fp8_e4m3", TENSOR, ("fp8_tensorwise",) * 3),
    ("ternary", TENSOR, ("fp8_tensorwise",) * 3),
    ("binary", TENSOR, ("fp8_tensorwise",) * 3),
    ("fp4_e2m1", TENSOR, ("fp8_tensorwise",) * 3),
    # per-token scales factor out of fprop and dgrad but lie along wgrad's contraction (tokens)
    ("fp8_e4m3", TOKEN, ("fp8_rowwise", "fp8_rowwise", "bf16_tensorcore")),
    # a per-output-channel weight scale lies along dgrad's contraction
    ({"format": "fp8_e4m3", "granularity": "row"}, TENSOR, ("fp8_rowwise", "bf16_tensorcore", "fp8_tensorwise")),
    # block scales: no FP8 GEMM (and no FP4 tensor cores on Hopper)
    ("nvfp4", {"input": "nvfp4", "grad": "nvfp4"}, ("bf16_tensorcore",) * 3),
    ("mxfp8", {"input": "mxfp8", "grad": "mxfp8"}, ("bf16_tensorcore",) * 3),
    # a weight-only format: activations unquantized
    ("ternary", {}, ("bf16_tensorcore",) * 2 + ("matmul",)),
]


@pytest.mark.parametrize("weight,act,expected", SM90, ids=lambda v: str(v)[:30])
def test_kernels_on_sm90(weight, act, expected):
    plan, kernels = kernels_of({"weight": weight, **act})
    assert kernels == expected, plan.describe()


def test_each_kernel_says_why_it_was_passed_over():
    plan, _ = kernels_of({"weight": "nvfp4", "input": "nvfp4", "grad": "nvfp4"})
    assert "not fp8_tensorwise: nvfp4" in plan.fprop.reason and "FP8 grid" in plan.fprop.reason
    plan, _ = kernels_of({"weight": "fp8_e4m3", **TOKEN})
    assert "lie along the contraction" in plan.wgrad.reason


def test_devices_without_fp8_or_cuda():
    fields = {"weight": "fp8_e4m3", **TENSOR}
    assert kernels_of(fields, "sm89")[1] == ("fp8_tensorwise",) * 3  # Ada has FP8 tensor cores
    assert kernels_of({"weight": "fp8_e4m3", **TOKEN}, "sm89")[1][0] == "bf16_tensorcore"  # row-wise needs sm90
    assert kernels_of(fields, "sm80")[1] == ("bf16_tensorcore",) * 3  # A100: no FP8
    assert kernels_of(fields, "cpu")[1] == ("emulated",) * 3
    with pytest.raises(ValueError, match="tensorcore' unavailable.*sm80.*no FP8 tensor cores"):
        build_plan(LayerPrecision.from_fields({**fields, "backend": "tensorcore"}), 64, 64, "sm80")
    with pytest.raises(ValueError, match="unknown device 'h100'"):
        DeviceSpec.of("h100")


def test_shapes_fp8_cannot_take_fall_back_to_exact_kernels():
    plan, kernels = kernels_of({"weight": "fp8_e4m3", **TENSOR}, shape=(100, 64))
    assert kernels == ("bf16_tensorcore",) * 3 and "divisible by 16" in plan.fprop.reason


def test_auto_never_drops_a_format_and_unquantized_is_explicit():
    """No plan of ``auto`` or ``tensorcore`` ever names the unquantized kernel, at any size."""
    for shape in [(16, 16), (256, 256), (4096, 16384)]:
        for dev in ["sm90", "sm80", "cpu"]:
            for backend in ["auto", "emulated"]:
                plan, kernels = kernels_of({"weight": "ternary", **TOKEN, "backend": backend}, dev, shape)
                assert "bf16" not in kernels and not plan.unquantized
    plan, kernels = kernels_of({"weight": "ternary", **TOKEN, "backend": "unquantized"})
    assert kernels == ("bf16",) * 3 and plan.unquantized and plan.describe().startswith("UNQUANTIZED")


def test_exactness_and_reuse():
    plan, _ = kernels_of({"weight": "fp8_e4m3", **TENSOR})
    assert all(g.exact for g in plan.gemms)
    assert plan.reuse_weight and plan.reuse_input and plan.reuse_grad
    plan, _ = kernels_of({"weight": "fp8_e4m3", **TOKEN})
    assert not plan.wgrad.exact  # per-token scales folded into the values: one more bf16 rounding
    assert (plan.fprop.kernel, plan.dgrad.kernel, plan.wgrad.kernel) == ("fp8_rowwise",) * 2 + ("bf16_tensorcore",)
    # wgrad takes fprop's and dgrad's FP8 codes in bf16, their per-token scales folded in
    assert plan.reuse_weight and plan.reuse_input and plan.reuse_grad
    plan, _ = kernels_of({"weight": "nvfp4", "input": "nvfp4", "grad": "nvfp4"})
    assert all(g.exact for g in plan.gemms)  # E2M1 x E4M3 block scales fit bf16; the tensor scale is outer
    assert "*" not in plan.describe()


def test_layer_plans_once_per_device_and_reports_it():
    layer = QLinear(64, 32, precision=LayerPrecision.from_fields({"weight": "ternary", **TENSOR}))
    plan = layer.plan
    assert plan.device == DeviceSpec("cpu") and layer.plan is plan  # built once
    assert layer.plan_for("sm90").fprop.kernel == "fp8_tensorwise"
    model = nn.Sequential(nn.Linear(64, 32))
    report = lowprec.apply_policy(model, {"default": {"weight": "ternary", **TENSOR}})
    assert report.layers[0].backend == model[0].plan.describe() == "emulated [cpu]"


def test_tensorcore_on_the_cpu_fails_at_the_forward_not_at_build():
    layer = QLinear(64, 32, precision=LayerPrecision.from_fields({"weight": "fp8_e4m3", "backend": "tensorcore"}))
    assert "tensorcore (on cpu:" in layer.backend_note()
    with pytest.raises(ValueError, match="backend 'tensorcore' unavailable: device cpu is not CUDA"):
        layer(torch.randn(2, 64))


def test_every_registered_kernel_is_named_consistently():
    for name, kernel in KERNELS.items():
        assert kernel.name == name and kernel.summary


@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "nvfp4", "mxfp4", "ternary", {"format": "fp4_e2m1", "granularity": "row"}],
                         ids=str)
def test_a_kept_bf16_operand_transposes_to_what_quantizing_again_gives(fmt):
    """Backward reuses forward's quantized operand (the plan's reuse_*): on the bf16 kernel its
    transposed form, per-row scales folded in, is bit-identical to quantizing the tensor again."""
    from lowprec.precision import parse_format

    fmt = parse_format(fmt, per_token=True)
    k = KERNELS["bf16_tensorcore"]
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(0)) * 3
    kept = k.transposed(k.operand(x, fmt))
    again = k.operand(x, fmt, transposed=True)
    assert torch.equal(kept[0], again[0]) and (kept[1] is None) == (again[1] is None)
    if kept[1] is not None:
        assert torch.equal(kept[1], again[1])
    plan, _ = kernels_of({"weight": "ternary", "input": fmt, "storage": "native"}, shape=(64, 64))
    if fp8_grid(fmt) is None:  # e.g. the int8 per-token inputs of the native ternary policy
        assert plan.fprop.kernel == plan.wgrad.kernel == "bf16_tensorcore" and plan.reuse_input


INT8_IN = {"input": "int8"}  # BitNet's activations: int8, one scale per token; gradients unquantized


def test_int8_tensor_cores_are_opt_in_and_take_fprop_and_dgrad(monkeypatch):
    """``AUTO_ORDER_INT8`` puts the int8 GEMM before bf16: int8 x ternary/binary/int8 fprop (and
    dgrad when the gradient is an integer grid too) on CUDA >= 8.0 or the CPU; wgrad (its contraction the
    tokens, unbounded at planning) and everything ``AUTO_ORDER`` decides stay as they were."""
    from lowprec import kernels

    fields = {"weight": "ternary", **INT8_IN}
    assert kernels_of(fields)[1] == ("bf16_tensorcore",) * 3  # the default order: no int8
    monkeypatch.setattr(kernels, "AUTO_ORDER", kernels.AUTO_ORDER_INT8)
    plan, names = kernels_of(fields)
    assert names == ("int8_tensorcore", "bf16_tensorcore", "bf16_tensorcore")
    assert plan.reuse_weight and plan.reuse_input  # backward takes forward's int8 operands, in bf16
    assert kernels_of({"weight": "binary", **INT8_IN}, "sm80")[1][0] == "int8_tensorcore"
    grad_int8 = {"weight": "ternary", "input": "int8", "grad": {"format": "int8", "granularity": "tensor"}}
    plan, names = kernels_of(grad_int8)
    assert names[:2] == ("int8_tensorcore",) * 2 and "wgrad contracts over the tokens" in plan.wgrad.reason
    assert plan.fprop.exact and plan.dgrad.exact
    assert kernels_of(fields, "sm75")[1][0] == "bf16_tensorcore"  # int8 tensor cores need 8.0 here
    assert kernels_of(fields, "cpu")[1] == ("int8_tensorcore", "emulated", "emulated")  # torch._int_mm runs there too
    plan, names = kernels_of(fields, shape=(100, 64))
    assert names[0] == "bf16_tensorcore" and "divisible by 8" in plan.fprop.reason
    plan, names = kernels_of({"weight": "int8", **INT8_IN}, shape=(133_200, 64))  # 133,200 x 127 x 127 >= 2^31
    assert names[0] == "bf16_tensorcore" and "overflow int32" in plan.fprop.reason
    assert kernels_of({"weight": "int8", **INT8_IN}, shape=(133_136, 64))[1][0] == "int8_tensorcore"
    plan, names = kernels_of({"weight": "fp8_e4m3", **INT8_IN})  # an FP8 weight is no integer grid
    assert names[0] == "bf16_tensorcore" and "not an integer grid" in plan.fprop.reason


@pytest.mark.parametrize("rows", [5, 40], ids=["5 rows (padded to 17)", "40 rows"])
def test_int8_kernel_is_the_integer_product_scaled(rows):
    """The int8 kernel's fprop and dgrad, run here on the CPU (``torch._int_mm``), are bit for bit the
    exact integer product of the quantized operands with the outer scales applied in fp32 as the
    bf16 kernel applies them: per-token int8 input x latent ternary weight, the same weight packed
    (native), and an int8 gradient x the transposed weight (quantized again, or forward's operand
    kept); fewer than 17 rows are padded for torch's int8 GEMM and cropped. The bf16 kernel takes
    the int8 operands for backward as if it had quantized the tensors itself."""
    from lowprec.kernels import _scale_output, split
    from lowprec.precision import parse_format
    from lowprec.qtensor import quantize

    gen = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=gen) * 2 for s in ((rows, 64), (48, 64), (rows, 48)))
    f_in, f_w, f_g = parse_format("int8", per_token=True), parse_format("ternary"), parse_format("int8")
    k = KERNELS["int8_tensorcore"]

    def exact(a, fa, b, fb, transposed_b=False):
        (va, sa), (vb, sb) = split(a, fa), split(b, fb, transposed=transposed_b)
        return _scale_output((va.double() @ vb.double().t()).float(), sa, sb)
    A, B = k.operand(x, f_in), k.operand(w, f_w)
    assert A[0].dtype == B[0].dtype == torch.int8 and A[1].shape == (rows, 1) and B[1].shape == (1,)
    want = exact(x, f_in, w, f_w)
    assert torch.equal(k.mm(A, B, torch.float32), want)
    assert torch.equal(k.mm(A, k.operand_from_qtensor(quantize(w, f_w)), torch.float32), want)
    G = k.operand(dy, f_g)
    want = exact(dy, f_g, w, f_w, transposed_b=True)
    for Bt in (k.operand(w, f_w, transposed=True), k.transposed(B)):
        assert Bt[0].is_contiguous() and Bt[0].shape == (64, 48)
        assert torch.equal(k.mm(G, Bt, torch.float32), want)
    assert k.transposed(A) is None  # per-token scales would lie along a contraction: quantize again
    bf16 = KERNELS["bf16_tensorcore"]  # backward's bf16 GEMMs take the int8 operands (plan.reuse_*)
    for kept, fmt, t in ((A, f_in, x), (B, f_w, w)):
        got, again = bf16.transposed(kept), bf16.operand(t, fmt, transposed=True)
        assert got[0].dtype == torch.bfloat16 and torch.equal(got[0], again[0])
        assert (got[1] is None and again[1] is None) or torch.equal(got[1], again[1])
