"""Kernels chosen by ``auto`` against the emulated reference, on a GPU with FP8 tensor cores."""
import pytest
import torch

from lowprec import DeviceSpec, LayerPrecision
from lowprec.nn import QLinear

pytestmark = pytest.mark.gpu

ACT = {"input": {"format": "fp8_e4m3", "granularity": "tensor"}, "grad": {"format": "fp8_e5m2", "granularity": "tensor"}}
ACT_ROW = {"input": "fp8_e4m3", "grad": "fp8_e5m2"}  # per-token scales
ACT_NV = {"input": "nvfp4", "grad": "nvfp4"}
# the paper policy's feed-forward precision: FP4 E2M1 weights scaled per output row, per-tensor activations
PAPER_FFN = LayerPrecision.from_fields({"weight": {"format": "fp4_e2m1", "granularity": "row"}, **ACT})
WEIGHTS = ["fp8_e4m3", "ternary", "binary", "fp4_e2m1", {"format": "fp4_e2m1", "granularity": "row"}, "nvfp4",
           "mxfp8", "mxfp4", "int8"]
NATIVE = ["ternary", "binary", "fp8_e4m3", "nvfp4"]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_gpu():
    if not torch.cuda.is_available() or not DeviceSpec.of("cuda").fp8_tensor_cores[0]:
        pytest.skip("needs FP8 tensor cores")


def layer_from(precision, w, b):
    lin = torch.nn.Linear(w.shape[1], w.shape[0], device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(w)
        lin.bias.copy_(b)
    return QLinear.from_float(lin, precision)


def run(precision, w, b, x, dy):
    layer = layer_from(precision, w, b)
    xx = x.clone().requires_grad_(True)
    y = layer(xx)
    y.backward(dy)
    return y, xx.grad, (layer.native_grad if layer.is_native else layer.weight.grad), layer


def data(M, K, N, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(M, K, device="cuda", generator=g).bfloat16()
    w = (torch.randn(N, K, device="cuda", generator=g) * 0.05).bfloat16()
    b = torch.randn(N, device="cuda", generator=g).bfloat16()
    dy = torch.randn(M, N, device="cuda", generator=g).bfloat16()
    return x, w, b, dy


@pytest.mark.parametrize("d", [256, 4096])
@pytest.mark.parametrize("act", [ACT, ACT_ROW, ACT_NV], ids=["tensorwise", "per-token", "nvfp4"])
@pytest.mark.parametrize("weight", WEIGHTS + [("native", w) for w in NATIVE], ids=str)
def test_auto_equals_emulated(weight, act, d):
    """``auto`` computes the policy's formats: every output and gradient equals the fp32 emulated
    reference to 2e-2 relative (Frobenius). Exact kernels (FP8 tensor cores, bf16 on values that fit
    bf16) differ from it only by the bf16 output rounding (2^-9), FP8 fast accumulation in fprop and
    summation order; kernels marked inexact in the plan round each operand once more to bf16 (<= 2^-9
    relative per element). A dropped format would show the quantization error itself: about 3e-2
    for E4M3, 0.1-0.2 for FP4 and ternary. M = 200 tokens: not a multiple of 16 (wgrad pads)."""
    fp8_gpu()
    storage = "latent"
    if isinstance(weight, tuple):
        storage, weight = weight
    x, w, b, dy = data(200, d, d if d == 256 else 1024)
    fields = {"weight": weight, **act, "storage": storage}
    y0, dx0, dw0, _ = run(LayerPrecision.from_fields({**fields, "backend": "emulated"}), w, b, x, dy)
    y1, dx1, dw1, layer = run(LayerPrecision.from_fields({**fields, "backend": "auto"}), w, b, x, dy)
    assert all(g.kernel != "emulated" for g in layer.plan.gemms), layer.plan.describe()
    assert rel(y1, y0) < 2e-2, (rel(y1, y0), layer.plan.describe())
    assert rel(dx1, dx0) < 2e-2, (rel(dx1, dx0), layer.plan.describe())
    assert rel(dw1, dw0) < 2e-2, (rel(dw1, dw0), layer.plan.describe())


def test_plan_on_the_device_is_the_described_one():
    fp8_gpu()
    cap = torch.cuda.get_device_capability()
    p = LayerPrecision.from_fields({"weight": "ternary", **ACT})
    layer = QLinear(512, 512, precision=p, device="cuda")
    assert layer.plan == layer.plan_for(f"sm{cap[0]}{cap[1]}")
    assert layer.plan.fprop.kernel == "fp8_tensorwise" and layer.plan.reuse_input and layer.plan.reuse_weight


def test_compiles_without_graph_breaks():
    fp8_gpu()
    x, _, _, _ = data(64, 512, 512)
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
    from lowprec import gemv

    if gemv.triton is None:
        pytest.skip("needs triton")
    torch.manual_seed(0)
    lin = torch.nn.Linear(512, 1000, bias=False, device="cuda")
    x = torch.randn(m, 512, device="cuda")
    out = {}
    for backend in ("emulated", "auto"):
        layer = QLinear.from_float(lin, LayerPrecision.from_fields({"weight": "ternary", "storage": "native", "backend": backend}))
        assert (layer.plan.gemv == "packed_ternary_gemv") == (backend == "auto")
        out[backend] = layer(x)
    assert rel(out["auto"], out["emulated"]) < 5e-3


def test_report_names_unquantized_layers():
    """Only the explicit ``unquantized`` backend runs a quantized layer without its formats; the
    report and ``unquantized_gemms`` name it, and ``auto`` at 256 wide keeps the formats."""
    fp8_gpu()
    from lowprec.policy import apply_policy

    for backend, named in (("auto", []), ("unquantized", ["0"])):
        model = torch.nn.Sequential(torch.nn.Linear(256, 256)).cuda()
        report = apply_policy(model, {"default": {"weight": "fp8_e4m3", **ACT, "backend": backend}})
        assert report.unquantized_gemms(model) == named
        assert report.layers[0].backend.startswith("UNQUANTIZED" if named else "fp8_tensorwise"), report.layers[0].backend


def test_cuda_graph_replay_reads_the_current_weight():
    """A layer caches its quantized weight operand while the weight is unchanged. Kernels captured
    into a CUDA graph must not read a cached operand: a replay does not look the cache up again, so
    after the weight changes in place it would read the old one. Captured after an eager call
    filled the cache, the graph is replayed after an in-place update of the weight and gives
    exactly what an eager call with the new weight gives (the same kernels on the same operands)."""
    fp8_gpu()
    x, w, b, _ = data(64, 256, 128)
    layer = layer_from(LayerPrecision.from_fields({"weight": "fp8_e4m3", **ACT, "backend": "tensorcore"}), w, b)
    with torch.no_grad():
        layer(x)  # fills the cache
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            layer(x)  # warm-up on the side stream, as capture wants
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y_graph = layer(x)
        layer.weight.mul_(-0.5)
        graph.replay()
        expected = layer(x)
    assert torch.equal(y_graph, expected)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("storage", ["latent", "native"])
def test_int8_fprop_equals_the_bf16_kernel(monkeypatch, storage, compiled):
    """BitNet's GEMMs (int8 per-token input x ternary weight) on int8 tensor cores
    (``AUTO_ORDER_INT8``): both kernels multiply the same integers exactly (sums < 2^24) and apply
    the same scales in the same order, so the layer's output and gradients equal those of the
    default plan (bf16 tensor cores) bit for bit, eager and compiled. 9 tokens: the latent layer's
    int8 GEMM pads them to 17 rows (the native one runs its packed GEMV there under both orders)."""
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("needs int8 tensor cores")
    from lowprec import kernels

    precision = LayerPrecision.from_fields({"weight": "ternary", "input": "int8", "storage": storage})
    results = {}
    for order in ("AUTO_ORDER", "AUTO_ORDER_INT8"):
        monkeypatch.setattr(kernels, "AUTO_ORDER", getattr(kernels, order))
        for M in (9, 512):
            x, w, b, dy = data(M, 256, 512)
            layer = layer_from(precision, w, b)
            fn = torch.compile(layer, fullgraph=True) if compiled else layer
            xx = x.clone().requires_grad_(True)
            y = fn(xx)
            y.backward(dy)
            grad_w = layer.native_grad if layer.is_native else layer.weight.grad
            results[order, M] = (layer.plan.fprop.kernel, y, xx.grad, grad_w)
            torch._dynamo.reset()
    for M in (9, 512):
        (k0, *a), (k1, *b) = results["AUTO_ORDER", M], results["AUTO_ORDER_INT8", M]
        assert (k0, k1) == ("bf16_tensorcore", "int8_tensorcore")
        for u, v in zip(a, b):
            assert torch.equal(u, v)


@pytest.mark.parametrize("weight", ["fp8_e4m3", {"format": "fp4_e2m1", "granularity": "row"}], ids=str)
def test_bf16_gemms_take_the_fp8_gemms_codes(weight):
    """Per-token FP8 activations: wgrad runs on bf16 tensor cores (the per-token scales lie along its
    contraction) and takes fprop's input codes and dgrad's gradient codes in bf16, their scales folded
    in; with a per-row FP4 E2M1 weight dgrad runs there too and takes fprop's E4M3 weight codes. Codes
    in bf16 are exact, and folding is what quantizing again does, so the output and gradients equal
    those of the same plan with each GEMM quantizing its operands itself, bit for bit (eager). 200
    tokens: not a multiple of 16."""
    import dataclasses

    fp8_gpu()
    precision = LayerPrecision.from_fields({"weight": weight, **ACT_ROW})
    x, w, b, dy = data(200, 512, 1024)
    results = []
    for reuse in (True, False):
        layer = layer_from(precision, w, b)
        plan = layer.plan
        assert plan.fprop.kernel == "fp8_rowwise" and plan.wgrad.kernel == "bf16_tensorcore"
        assert plan.reuse_input and plan.reuse_grad and plan.reuse_weight
        if not reuse:  # each GEMM on another kernel than its source quantizes its operand itself
            layer._plan = dataclasses.replace(plan, reuse_input=False,
                                              reuse_grad=plan.dgrad.kernel == plan.wgrad.kernel,
                                              reuse_weight=plan.fprop.kernel == plan.dgrad.kernel)
        xx = x.clone().requires_grad_(True)
        y = layer(xx)
        y.backward(dy)
        results.append((y, xx.grad, layer.weight.grad))
    for u, v in zip(*results):
        assert torch.equal(u, v)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_per_tensor_operands_are_shared_across_kernels(compiled, monkeypatch):
    """The paper policy's feed-forward on the GPU: per-tensor E4M3 input and E5M2 gradient, FP4 E2M1 weight
    scaled per output channel. fprop runs row-wise FP8, dgrad bf16, wgrad tensor-wise FP8; wgrad takes the
    input codes fprop's pass made in both layouts, and dgrad the gradient codes wgrad's pass made, in bf16.
    Output and gradients equal, bit for bit, those of the same plan run eagerly with each GEMM quantizing its
    operands itself (the reference: compiled, a GEMM quantizing its own operand runs the compiler's code of
    the quantizer, not the FP8 passes), eager and compiled. 200 tokens: not a multiple of 16."""
    import dataclasses

    import lowprec.gemm

    fp8_gpu()
    precision = PAPER_FFN
    x, w, b, dy = data(200, 512, 1024)
    results = {}
    for share, run_compiled in ((False, False), (True, compiled)):
        monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_TAKES_WGRAD_CODES", share)
        layer = layer_from(precision, w, b)
        plan = layer.plan
        kernels = (plan.fprop.kernel, plan.dgrad.kernel, plan.wgrad.kernel)
        assert kernels == ("fp8_rowwise", "bf16_tensorcore", "fp8_tensorwise"), kernels
        assert plan.reuse_input and plan.reuse_weight and not plan.reuse_grad
        if not share:
            layer._plan = dataclasses.replace(plan, reuse_input=False)
        fn = torch.compile(layer, fullgraph=True) if run_compiled else layer
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        y.backward(dy)
        results[share] = {"y": y, "dx": xx.grad, "dw": layer.weight.grad}
        torch._dynamo.reset()
    differ = {k: int((v != results[False][k]).sum()) for k, v in results[True].items()}
    assert not any(differ.values()), f"elements that differ: {differ}"


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_dgrad_folding_the_gradient_scale(compiled, monkeypatch):
    """The paper policy's feed-forward on the GPU with ``BF16_DGRAD_FOLDS_GRAD_SCALE`` (the default) and
    without: folded, dgrad's weight operand takes the gradient's per-tensor scale into its values and its GEMM
    writes bf16. The output and the weight gradient are the same bit for bit; dx, folded and not, is within the
    bound of one bf16 rounding of the weight operand (relative 2^-9 of each product, 2^-8 taken) and one of the
    output (2^-9, 2^-8 taken), against the product of the same quantized operands in float64. 200 tokens: not a
    multiple of 16."""
    import lowprec.gemm
    from lowprec.scaling import quantize_dequantize

    fp8_gpu()
    precision = PAPER_FFN
    x, w, b, dy = data(200, 512, 1024)
    results = {}
    for fold in (False, True):
        monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_FOLDS_GRAD_SCALE", fold)
        layer = layer_from(precision, w, b)
        assert layer.plan.dgrad.kernel == "bf16_tensorcore" and layer.plan.reuse_weight
        fn = torch.compile(layer, fullgraph=True) if compiled else layer
        xx = x.clone().requires_grad_(True)
        y = fn(xx)
        y.backward(dy)
        results[fold] = (y, xx.grad, layer.weight.grad)
        torch._dynamo.reset()
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][2], results[False][2])
    g = quantize_dequantize(dy, precision.grad)[0].double()
    wq = quantize_dequantize(w, precision.weight)[0].double()
    ref, size = g @ wq, g.abs() @ wq.abs()
    for fold, (_, dx, _) in results.items():
        err = (dx.double() - ref).abs()
        assert (err <= 2**-8 * size + 2**-8 * ref.abs()).all(), (fold, (err / size).max())
