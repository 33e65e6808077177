"""QLinear / QEmbedding: numerics of the three GEMMs, storage, STE, delayed scaling, telemetry."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

import lowprec
from lowprec import LayerPrecision
from lowprec.nn import QEmbedding, QLinear

# the paper policy's feed-forward precision: FP4 E2M1 weights scaled per output row, per-tensor E4M3 inputs
# and E5M2 gradients
PAPER_FFN = LayerPrecision.from_fields({"weight": {"format": "fp4_e2m1", "granularity": "row"},
                                        "input": {"format": "fp8_e4m3", "granularity": "tensor"},
                                        "grad": {"format": "fp8_e5m2", "granularity": "tensor"}})

fq = lambda t, name: lowprec.quantize_dequantize(t, name)[0]  # noqa: E731
FP8 = {"weight": "fp8_e4m3", "input": "fp8_e4m3", "grad": "fp8_e5m2"}


def lp(**fields):
    return LayerPrecision.from_fields(fields)


def pair(precision, n_in=48, n_out=24, seed=0, device="cpu"):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(n_in, n_out).to(device)
    ref_w, ref_b = lin.weight.detach().clone(), lin.bias.detach().clone()
    return QLinear.from_float(lin, precision), ref_w, ref_b


def test_full_precision_layer_matches_nn_linear(device):
    q, w, b = pair(LayerPrecision(), device=device)
    x = torch.randn(5, 7, 48, device=device)
    # same fp32 products; addmm and matmul-then-add may sum in different orders (1 ulp-ish)
    torch.testing.assert_close(q(x), F.linear(x, w, b), rtol=1e-6, atol=1e-6)


def test_fprop_dgrad_wgrad_follow_their_formats(device):
    p = lp(**FP8, backend="emulated")
    q, w, b = pair(p, device=device)
    x = torch.randn(33, 48, device=device, requires_grad=True)
    dy = torch.randn(33, 24, device=device)
    y = q(x)
    y.backward(dy)
    xr, wr = fq(x.detach(), p.input), fq(w, p.weight)
    assert torch.equal(y, xr @ wr.t() + b)  # the emulated backend is exactly this formula
    gq = fq(dy, p.grad)
    assert torch.equal(x.grad, gq @ wr)
    assert torch.equal(q.weight.grad, gq.t() @ xr)
    assert torch.equal(q.bias.grad, dy.sum(0))


def test_per_gemm_override_changes_only_that_gemm():
    p = lp(**FP8, wgrad={"grad": None, "input": None}, backend="emulated")
    q, w, _ = pair(p)
    x = torch.randn(16, 48, requires_grad=True)
    dy = torch.randn(16, 24)
    q(x).backward(dy)
    assert torch.equal(q.weight.grad, dy.t() @ x.detach())  # wgrad unquantized
    assert torch.equal(x.grad, fq(dy, p.grad) @ fq(w, p.weight))  # dgrad still fp8


def test_activation_formats_default_to_per_token():
    p = lp(weight="ternary", input="int8", grad="fp8_e5m2")
    assert p.input.granularity == "row" and p.grad.granularity == "row"
    assert p.weight.granularity == "tensor"
    assert lp(input={"format": "int8", "granularity": "tensor"}).input.granularity == "tensor"


def test_ternary_layer_weights_take_exactly_three_values():
    q, w, _ = pair(lp(weight="ternary"), n_in=64, n_out=32)
    q.bias = None
    wq = q(torch.eye(64)).t()  # an identity input reads the quantized weight back out
    s = w.abs().mean()
    values = set(wq.unique().tolist())
    assert values == {-float(s), 0.0, float(s)}


def test_ste_gradient_reaches_latent_weight():
    x = torch.randn(20, 48)
    dy = torch.randn(20, 24)
    q, w, _ = pair(lp(weight="ternary", ste="identity"))
    q(x).backward(dy)
    assert torch.equal(q.weight.grad, dy.t() @ x)  # identity STE: dL/dW = dy^T x
    q2, w2, _ = pair(lp(weight="ternary", ste="clipped"))
    q2(x).backward(dy)
    inside = (w2.abs() / w2.abs().mean() <= 1).float()
    assert torch.equal(q2.weight.grad, (dy.t() @ x) * inside)
    assert 0 < inside.mean() < 1


def test_native_binary_layer_is_packed_and_collects_its_gradient():
    p = lp(weight="binary", storage="native")
    q, w, b = pair(p, n_in=64, n_out=32)
    assert q.weight is None and q.w_data.dtype == torch.uint8
    assert q.resident_bytes() == 64 * 32 // 8 + 4 + 32 * 4  # 1 bit/weight + fp32 scale + fp32 bias
    assert q.weight_bits() == pytest.approx(1 + 32 / (64 * 32))
    x = torch.randn(10, 64)  # no input requires grad: backward must still run for the weight
    dy = torch.randn(10, 32)
    y = q(x)
    assert torch.equal(y, x @ fq(w, "binary").t() + b)
    y.backward(dy)
    assert torch.equal(q.native_grad, dy.t() @ x)
    seen = []
    q.native_grad_hook = lambda layer, g: seen.append(g.shape)
    q(x).backward(dy)
    assert seen == [(32, 64)]
    # an optimizer writes the weight back in its own format
    flipped = lowprec.quantize(-q.native_weight.dequantize(), "binary")
    q.set_native_weight(flipped)
    assert torch.equal(q.native_weight.dequantize(), flipped.dequantize())
    with pytest.raises(ValueError, match="expected"):
        q.set_native_weight(lowprec.quantize(torch.randn(32, 64), "ternary"))


def test_delayed_scaling_uses_the_amax_history():
    p = lp(weight="fp8_e4m3", input={"format": "fp8_e4m3", "granularity": "tensor"}, scaling="delayed",
           amax_history=4, backend="emulated")
    q, w, b = pair(p)
    big = torch.randn(8, 48) * 10
    small = torch.randn(8, 48)
    q(big)
    assert q.amax_history_input[0] == big.abs().max()
    y = q(small)  # quantized with the scale of the larger amax in the history
    xs = lowprec.quantize_dequantize(small, p.input, amax=big.abs().max())[0]
    assert torch.equal(y, xs @ fq(w, p.weight).t() + b)
    assert torch.equal(q.amax_history_input[:2], torch.stack([small.abs().max(), big.abs().max()]))


def test_embedding_quantizes_table_and_gradient():
    p = lp(weight="fp8_e4m3", grad="fp8_e5m2")
    torch.manual_seed(0)
    emb = torch.nn.Embedding(50, 16)
    w = emb.weight.detach().clone()
    q = QEmbedding.from_float(emb, p)
    idx = torch.tensor([[1, 4, 4, 7]])
    out = q(idx)
    assert torch.equal(out, fq(w, p.weight)[idx])
    g = torch.randn(1, 4, 16)
    out.backward(g)
    gq = fq(g, p.grad)
    expected = torch.zeros(50, 16).index_add_(0, idx.reshape(-1), gq.reshape(-1, 16))
    assert torch.equal(q.weight.grad, expected)


def test_telemetry_counts_on_crafted_inputs():
    p = lp(weight="fp8_e4m3", input={"format": "fp8_e4m3", "granularity": "tensor"}, backend="emulated")
    model = torch.nn.Sequential(QLinear(16, 16, precision=p), QLinear(16, 16, precision=p))
    tel = lowprec.Telemetry(model)
    assert tel.layers == ["0", "1"]
    x = torch.full((4, 16), 1e-6)
    x[0, 0] = 448.0  # scale 1: 1e-6 is below E4M3's smallest subnormal (2^-9 / 2): flushed
    model(x)
    assert tel.stats() == {}  # off: nothing recorded
    tel.enable()
    model(x)
    st = tel.stats()[("0", "input")]
    assert st["amax"] == 448.0
    assert st["flushed"] == 63 / 64 and st["saturated"] == 1 / 64 and st["nonfinite"] == 0
    assert tel.first_nonfinite() is None
    # a NaN entering the second layer's weight: reported there, in execution order
    with torch.no_grad():
        model[1].weight[3, 3] = float("nan")
    x2 = torch.randn(4, 16, requires_grad=True)
    model(x2).sum().backward()
    assert tel.stats()[("1", "weight")]["nonfinite"] == 1
    assert tel.first_nonfinite() == ("1", "weight")
    assert "| 0 | input |" in tel.table()


def test_bad_precision_fields():
    with pytest.raises(ValueError, match="unknown storage 'packed'"):
        lp(storage="packed")
    with pytest.raises(ValueError, match="unknown backend"):
        lp(backend="cuda")
    with pytest.raises(ValueError, match="unknown precision field"):
        lp(wieght="fp8_e4m3")
    with pytest.raises(ValueError, match="native.*needs a weight format"):
        lp(storage="native")
    with pytest.raises(ValueError, match="dgrad has operands"):
        lp(dgrad={"input": "fp8_e4m3"})
    with pytest.raises(ValueError, match="unknown format"):
        lp(weight="fp7")
    if not torch.cuda.is_available():
        q, _, _ = pair(lp(weight="fp8_e4m3", backend="tensorcore"))
        with pytest.raises(ValueError, match="tensorcore.*unavailable"):
            q(torch.randn(2, 48))


def test_compiles_into_one_graph():
    p = lp(**FP8)
    model = torch.nn.Sequential(QLinear(32, 64, precision=p), torch.nn.GELU(), QLinear(64, 32, precision=p))
    x = torch.randn(8, 32)
    explained = torch._dynamo.explain(model)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def test_weight_operand_lives_with_the_graph_and_follows_in_place_updates():
    """Calls of one step share one quantized weight while an autograd graph holds it; it is freed
    with the graph (nothing survives the step) and never reused once the weight changed."""
    p = lp(**FP8, backend="emulated")
    q, w, b = pair(p)
    x = torch.randn(4, 48)
    y1 = q(x)
    (tag, refs), = q._operands._entries.values()
    shared = refs[0]()
    assert shared is not None
    y2 = q(x)
    assert refs[0]() is shared and torch.equal(y2, y1)  # the second call reused it
    del y1, y2, shared
    assert refs[0]() is None  # freed with the graphs that saved it
    with torch.no_grad():
        q.weight.mul_(-3.0)  # an optimizer step: in place, bumps the version counter
    assert torch.equal(q(x), fq(x, p.input) @ fq(-3.0 * w, p.weight).t() + b)
    qn, wn, bn = pair(lp(weight="ternary", storage="native"))
    qn(x)
    new = lowprec.quantize(-qn.native_weight.dequantize(), "ternary")
    qn.set_native_weight(new)
    assert torch.equal(qn(x), x @ new.dequantize().t() + bn)


@pytest.mark.parametrize("storage", ["latent", "native"])
def test_int8_fprop_in_a_layer_is_the_exact_integer_product(monkeypatch, storage):
    """With ``AUTO_ORDER_INT8`` a BitNet layer (int8 per-token input, ternary weight) runs its fprop
    on ``torch._int_mm`` (here on the CPU): the output is the exact integer product of the quantized
    operands times their scales (the fp32 order of `kernels._scale_output`) plus the bias, eager and
    compiled (one graph); dgrad and wgrad, on the same kernel as under the default order, give the
    same gradients bit for bit; 3 tokens go through the padding to 17 rows."""
    from lowprec import kernels
    from lowprec.kernels import _scale_output, split, split_qtensor

    precision = lp(weight="ternary", input="int8", storage=storage)
    results = {}
    for order in ("AUTO_ORDER", "AUTO_ORDER_INT8"):
        monkeypatch.setattr(kernels, "AUTO_ORDER", getattr(kernels, order))
        for rows in (3, 40):
            q, w, b = pair(precision, n_in=64, n_out=32)
            x = torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows), requires_grad=True)
            y = q(x)
            y.backward(torch.ones_like(y))
            grad_w = q.native_grad if q.is_native else q.weight.grad
            results[order, rows] = (q.plan.fprop.kernel, y.detach(), x.grad, grad_w, q, x.detach(), b)
    for rows in (3, 40):
        k0, y0, gx0, gw0, *_ = results["AUTO_ORDER", rows]
        k1, y1, gx1, gw1, q, x, b = results["AUTO_ORDER_INT8", rows]
        assert (k0, k1) == ("emulated", "int8_tensorcore")
        va, sa = split(x, q.plan.fprop.a)
        vw, sw = split_qtensor(q.native_weight) if q.is_native else split(q.weight.detach(), q.plan.fprop.b)
        want = _scale_output((va.double() @ vw.double().t()).float(), sa, sw) + b
        assert torch.equal(y1, want)
        torch.testing.assert_close(y0, y1, rtol=1e-5, atol=1e-6)  # emulated: products of dequantized fp32 values
        assert torch.equal(gx0, gx1) and torch.equal(gw0, gw1)
        torch._dynamo.reset()
        assert torch.equal(torch.compile(q, fullgraph=True)(x), y1)


def _hopper_layer(precision):
    """A 64 -> 128 ``QLinear`` without bias, the same weights at every call (seed 0), with its Hopper plan
    (run on the CPU through ``torch._scaled_mm``)."""
    torch.manual_seed(0)
    layer = QLinear.from_float(torch.nn.Linear(64, 128, bias=False).bfloat16(), precision)
    layer._plan = layer.plan_for("sm90")
    return layer


def _forward_backward(layer, x, dy, compiled: bool):
    """``layer`` (compiled whole where ``compiled``) on a copy of ``x``, backward from ``dy``: ``(y, dx, dW)``."""
    xx = x.clone().requires_grad_(True)
    y = (torch.compile(layer, fullgraph=True) if compiled else layer)(xx)
    y.backward(dy)
    torch._dynamo.reset()
    return y, xx.grad, layer.weight.grad


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("weight", ["fp8_e4m3", {"format": "fp4_e2m1", "granularity": "row"}], ids=str)
def test_bf16_gemms_take_the_fp8_gemms_codes(weight, compiled, monkeypatch, cpu_row_scales):
    """A layer run on the CPU with its Hopper plan (FP8 GEMMs through ``torch._scaled_mm``, per-token
    activations): wgrad runs on the bf16 kernel (the per-token scales lie along its contraction) and
    takes fprop's input codes and dgrad's gradient codes in bf16, scales folded in; with a per-row FP4
    weight dgrad runs there too and takes fprop's E4M3 weight codes. Codes are exact in bf16 and folding
    is what quantizing again does, so the output and gradients equal, bit for bit, those of the same
    plan with those GEMMs quantizing their operands themselves, eager and under inductor. Eager, the
    bf16 kernel quantizes nothing itself when it takes the codes."""
    import dataclasses

    from lowprec.kernels import KERNELS

    calls = []
    if not compiled:  # counts the bf16 kernel's own operands (a side effect a compiled graph cannot hold)
        bf16 = type(KERNELS["bf16_tensorcore"])
        quantize = bf16.operand
        monkeypatch.setattr(bf16, "operand", lambda self, *a, **k: calls.append(a[1]) or quantize(self, *a, **k))
    precision = LayerPrecision.from_fields({"weight": weight, "input": "fp8_e4m3", "grad": "fp8_e5m2"})
    torch.manual_seed(1)
    x, dy = torch.randn(40, 64).bfloat16(), torch.randn(40, 128).bfloat16()
    results = []
    for reuse in (True, False):
        torch.manual_seed(0)  # the same weights, in a layer of its own (its gradient apart)
        layer = QLinear.from_float(torch.nn.Linear(64, 128).bfloat16(), precision)
        plan = layer.plan_for("sm90")
        assert plan.fprop.kernel == "fp8_rowwise" and plan.wgrad.kernel == "bf16_tensorcore"
        assert plan.reuse_input and plan.reuse_grad and plan.reuse_weight
        if not reuse:
            plan = dataclasses.replace(plan, reuse_input=False, reuse_grad=plan.dgrad.kernel == plan.wgrad.kernel,
                                       reuse_weight=plan.fprop.kernel == plan.dgrad.kernel)
        layer._plan = plan
        calls.clear()
        results.append(_forward_backward(layer, x, dy, compiled))
        assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
        if not compiled:  # the bf16 kernel's own operands: where dgrad runs on it, the gradient's (wgrad takes
            # it), and without reuse the input's and the weight's too; else none, or the gradient's and the input's
            own = plan.dgrad.kernel == "bf16_tensorcore"
            assert len(calls) == (int(own) if reuse else 2 + own), (reuse, calls)
    for u, v in zip(*results, strict=True):
        assert torch.equal(u, v)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_per_tensor_operands_are_shared_across_kernels(compiled, monkeypatch, cpu_row_scales):
    """Per-tensor E4M3 input and E5M2 gradient, FP4 weight scaled per output channel, the Hopper plan on
    the CPU: fprop runs row-wise FP8 (the per-tensor input beside the per-row weight), dgrad bf16 (the
    weight's scale lies along its contraction), wgrad tensor-wise FP8. wgrad takes the input codes fprop's
    kernel made, and dgrad the gradient codes wgrad's kernel made, in bf16: output and gradients equal, bit
    for bit, those of the same plan with each GEMM quantizing its operands itself, eager and under inductor
    (compiled, also those of the eager unshared layer). Eager, the input and the gradient are each quantized
    once, not twice."""
    import dataclasses

    import lowprec.gemm
    from lowprec.kernels import KERNELS

    calls = []
    if not compiled:  # counts the operands the kernels make (a side effect a compiled graph cannot hold)
        for name in ("fp8_tensorwise", "bf16_tensorcore"):
            cls = type(KERNELS[name])
            for method in ("operand", "operands"):
                f = getattr(cls, method)
                monkeypatch.setattr(cls, method, lambda self, t, *a, _f=f, **k: calls.append(t.shape) or _f(self, t, *a, **k))
    precision = PAPER_FFN
    torch.manual_seed(1)
    x, dy = torch.randn(40, 64).bfloat16(), torch.randn(40, 128).bfloat16()
    results = []
    for share in (True, False):
        monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_TAKES_WGRAD_CODES", share)
        torch.manual_seed(0)
        layer = QLinear.from_float(torch.nn.Linear(64, 128).bfloat16(), precision)
        plan = layer.plan_for("sm90")
        kernels = (plan.fprop.kernel, plan.dgrad.kernel, plan.wgrad.kernel)
        assert kernels == ("fp8_rowwise", "bf16_tensorcore", "fp8_tensorwise"), kernels
        assert plan.reuse_input and plan.reuse_weight and not plan.reuse_grad
        if not share:
            plan = dataclasses.replace(plan, reuse_input=False)
        layer._plan = plan
        calls.clear()
        results.append(_forward_backward(layer, x, dy, compiled))
        if not compiled:  # the input (40, 64) and the gradient (40, 128): quantized once shared, else twice
            assert (calls.count(x.shape), calls.count(dy.shape)) == ((1, 1) if share else (2, 2)), calls
    if compiled:  # and those of the eager layer quantizing each operand itself (the reference)
        monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_TAKES_WGRAD_CODES", False)
        layer._plan = plan
        layer.weight.grad = None
        results.append(_forward_backward(layer, x, dy, compiled=False))
    for other in results[1:]:
        for u, v in zip(results[0], other, strict=True):
            assert torch.equal(u, v)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_bf16_dgrad_folding_the_gradient_scale(compiled, monkeypatch, cpu_row_scales):
    """The paper policy's feed-forward with its Hopper plan on the CPU (dgrad on bf16 tensor cores, its weight
    operand fprop's E4M3 codes with the per-row scale folded in), with ``BF16_DGRAD_FOLDS_GRAD_SCALE`` (the
    default) and without: folded, the gradient's per-tensor scale goes into the weight's values as well. The
    output and the weight gradient are the same bit for bit (only dgrad changes); dx, folded and not, is within
    the bound of one bf16 rounding of the weight operand (relative 2^-9 of each product, 2^-8 taken) and of up
    to two of the output (2^-9 each: the unfolded CPU path rounds the product to bf16 before scaling it),
    against the product of the same quantized operands in float64."""
    import lowprec.gemm
    from lowprec.scaling import quantize_dequantize

    precision = PAPER_FFN
    torch.manual_seed(1)
    x, dy = torch.randn(40, 64).bfloat16(), torch.randn(40, 128).bfloat16()
    results = {}
    for fold in (False, True):
        monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_FOLDS_GRAD_SCALE", fold)
        layer = _hopper_layer(precision)
        assert layer._plan.dgrad.kernel == "bf16_tensorcore" and layer._plan.reuse_weight
        results[fold] = _forward_backward(layer, x, dy, compiled)
    assert torch.equal(results[True][0], results[False][0]) and torch.equal(results[True][2], results[False][2])
    g = quantize_dequantize(dy, precision.grad)[0].double()
    w = quantize_dequantize(layer.weight.detach(), precision.weight)[0].double()
    ref, size = g @ w, g.abs() @ w.abs()
    for fold, (_, dx, _) in results.items():
        err = (dx.double() - ref).abs()
        assert (err <= 2**-8 * size + 2**-8 * ref.abs()).all(), (fold, (err / size).max())
    assert not torch.equal(results[True][1], results[False][1])  # the folded path is taken: other last bits


def test_shared_gradient_codes_under_delayed_scaling(monkeypatch, cpu_row_scales):
    """The feed-forward precision of the paper policy under delayed scaling, its Hopper plan on the CPU: with
    the bf16 dgrad taking the gradient codes of the FP8 wgrad's pass (which pushes the gradient's amax into
    its history) the outputs, input and weight gradients of four steps, over six decades of input and
    gradient scale, and the amax histories equal, bit for bit, those with each GEMM quantizing the gradient
    under the same delayed amax itself."""
    import lowprec.gemm

    precision = dataclasses.replace(PAPER_FFN, scaling="delayed")
    runs = {}
    for share in (True, False):
        monkeypatch.setattr(lowprec.gemm, "BF16_DGRAD_TAKES_WGRAD_CODES", share)
        layer = _hopper_layer(precision)
        assert lowprec.gemm._grad_from_wgrad(layer.plan) == share
        g = torch.Generator().manual_seed(3)
        out = []
        for step in range(4):
            x = (torch.randn(40, 64, generator=g) * 10.0 ** (step - 2)).bfloat16().requires_grad_()
            dy = (torch.randn(40, 128, generator=g) * 10.0 ** (1 - step)).bfloat16()
            y = layer(x)
            y.backward(dy)
            out += [y.detach(), x.grad, layer.weight.grad]
            layer.weight.grad = None
        runs[share] = out + [b.clone() for _, b in sorted(layer.named_buffers())]
    assert len(runs[True]) == 14
    for a, b in zip(runs[True], runs[False], strict=True):
        assert torch.equal(a, b)
