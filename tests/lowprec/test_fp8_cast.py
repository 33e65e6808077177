"""An FP8 operand in one pass (lowprec.fp8_cast): its codes and scales are the general quantizer's,
bit for bit, per tensor and per row, E4M3 and E5M2, row-major and transposed-and-padded, on the
CPU (tensor operations) and on CUDA (the Triton kernel), eager and compiled."""
import itertools
import pytest
import torch

import lowprec
from lowprec import fp8_cast
from lowprec.common import eager_division
from lowprec.kernels import KERNELS, _CodesKernel


def _general(t, fmt, amax=None, transposed=False):
    """The operand as the codes kernels make it without this module: the general quantizer's
    values cast to the FP8 dtype."""
    return _CodesKernel.operand(KERNELS["fp8_tensorwise"], t, fmt, amax=amax, transposed=transposed)


def _assert_same(a, b):
    """Codes equal byte for byte, except that a NaN code may carry either sign (the sign of a NaN
    holds nothing: the general path's depends on the device's division); scales equal exactly."""
    (ca, sa), (cb, sb) = a, b
    assert ca.dtype == cb.dtype and ca.shape == cb.shape and ca.stride() == cb.stride()
    na, nb = ca.float().isnan(), cb.float().isnan()
    assert torch.equal(na, nb)
    assert torch.equal(ca.view(torch.uint8)[~na], cb.view(torch.uint8)[~nb])
    assert sa.shape == sb.shape and torch.equal(sa.isnan(), sb.isnan())
    assert torch.equal(sa.nan_to_num(), sb.nan_to_num())


def _values(rows, cols, dtype, device, seed=0):
    """Magnitudes over 30 decades (11 in fp16; each column its own), so that, scaled, values fall on
    normal and subnormal codes, round to zero and saturate; exact zeros, signed zeros and, with more
    than one row, an all-zero row."""
    gen = torch.Generator().manual_seed(seed)
    low, high = (-7, 4) if dtype == torch.float16 else (-20, 10)
    t = torch.randn(rows, cols, generator=gen) * torch.logspace(low, high, cols)
    t[0, :3] = torch.tensor([0.0, -0.0, 448.0])
    if rows > 1:
        t[1] = 0.0
    return t.to(dtype).to(device)


CASES = [("fp8_e4m3", "tensor"), ("fp8_e5m2", "tensor"), ("fp8_e4m3", "row"), ("fp8_e5m2", "row")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name,granularity", CASES)
def test_operand_is_the_general_quantizers(device, name, granularity, dtype):
    fmt = lowprec.format(name, granularity=granularity)
    assert fp8_cast.applies(torch.zeros(2, 2), fmt)
    for rows, cols in [(37, 50), (1, 16), (130, 70)]:  # token counts that need padding, tiles cut short
        t = _values(rows, cols, dtype, device, seed=rows)
        for transposed in (False, True) if granularity == "tensor" else (False,):
            _assert_same(fp8_cast.operand(t, fmt, transposed=transposed), _general(t, fmt, transposed=transposed))
            if granularity == "tensor":  # delayed scaling: an amax below the tensor's saturates its largest values
                amax = torch.tensor(1e-3, device=device)
                _assert_same(fp8_cast.operand(t, fmt, amax, transposed), _general(t, fmt, amax, transposed))


def _assert_same_values(a, b):
    """bf16 operands equal bit for bit, NaN for NaN (its sign and payload hold nothing), and the same
    layout; outer scales equal exactly (NaN for NaN) or both None."""
    (va, sa), (vb, sb) = a, b
    assert va.dtype == vb.dtype == torch.bfloat16 and va.shape == vb.shape
    na, nb = va.isnan(), vb.isnan()
    assert torch.equal(na, nb)
    assert torch.equal(va.view(torch.int16)[~na], vb.view(torch.int16)[~nb])
    assert (sa is None) == (sb is None)
    if sa is not None:
        assert sa.shape == sb.shape and torch.equal(sa.isnan(), sb.isnan())
        assert torch.equal(sa.nan_to_num(), sb.nan_to_num())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,granularity", CASES)
def test_bf16_values_are_the_general_quantizers(device, name, granularity, dtype, monkeypatch):
    """The bf16 tensor-core kernel's operands of an FP8 format from this module's passes (its codes'
    values; transposed, per-row scales multiplied in) are the general quantizer's, bit for bit; on
    CUDA, with ``fp8_values_from_passes`` on, the kernel takes them from here, both layouts at once or
    one at a time."""
    fmt = lowprec.format(name, granularity=granularity)
    k = KERNELS["bf16_tensorcore"]
    monkeypatch.setattr(type(k), "fp8_values_from_passes", True)
    for rows, cols in [(37, 50), (1, 16), (130, 70)]:
        t = _values(rows, cols, dtype, device, seed=rows)
        t[-1, -1] = float("nan") if rows > 2 else t[-1, -1]  # a NaN row (per row) or a NaN tensor
        amaxes = [None, torch.tensor(1e-3, device=device)] if granularity == "tensor" else [None]
        for amax in amaxes:
            want = [k._general_operand(t, fmt, amax=amax, transposed=tr) for tr in (False, True)]
            v, v_t, s = fp8_cast.values(t, fmt, amax=amax, transposed=True)
            _assert_same_values((v, s), want[0])
            _assert_same_values((v_t, s if granularity == "tensor" else None), want[1])
            if device.type == "cuda":
                for tr in (False, True):
                    _assert_same_values(k.operand(t, fmt, amax=amax, transposed=tr), want[tr])
                op, op_t = k.operands(t, fmt, amax=amax)
                _assert_same_values(op, want[0])
                _assert_same_values(op_t, want[1])


@pytest.mark.parametrize("name", ["fp8_e5m2", "int8"])
def test_a_compiled_row_operand_can_read_the_stored_tensor(device, name, monkeypatch):
    """With ``row_operands_read_stored``, a compiled bf16 tensor-core operand with per-row scales quantizes
    its tensor through a no-op view (the tensor stored once, not computed again inside the quantization's
    loops): the traced graph reads it so, and (inductor on the CPU) the values are eager's, in both layouts.
    Off, no view is traced, and the compiler quantizes the producer's value before its rounding to bf16: the
    values are eager's for the product computed in fp32. (The producer, x * 1.5, is exact in fp32, so
    compiled and eager agree bit for bit; a GELU's erf may differ in its last bit.)"""
    k = KERNELS["bf16_tensorcore"]
    fmt = lowprec.format(name, granularity="row")
    x = _values(64, 48, torch.bfloat16, device)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    for stored in (True, False):
        monkeypatch.setattr(type(k), "row_operands_read_stored", stored)
        for transposed in (False, True):
            def f(x):
                return k.operand(x * 1.5, fmt, transposed=transposed)
            torch._dynamo.reset()
            graphs.clear()
            got = torch.compile(f, fullgraph=True, backend=backend)(x)
            _assert_same_values(got, f(x))
            views = [n for n in graphs[0].graph.nodes if n.op == "call_function" and n.target is torch.as_strided]
            assert len(views) == stored and all("mul" in str(v.args[0].target) for v in views), graphs[0].graph
            if device.type == "cuda":  # inductor's CUDA kernels gave codes one step away from eager's here (an
                # H200, torch 2.11, with the eager-division option as lowprec.common names it): the values
                # below are checked on the CPU only
                continue
            torch._dynamo.reset()
            unrounded = k.operand(x.float() * 1.5, fmt, transposed=transposed)
            got = torch.compile(f, fullgraph=True, options=eager_division())(x)
            _assert_same_values(got, f(x) if stored else unrounded)


@pytest.mark.parametrize("name,granularity", CASES)
def test_nan_and_inf_make_their_scale_group_nan(device, name, granularity):
    """A NaN or an infinity makes its group's scale NaN and every code of the group NaN (per tensor:
    all of them; per row: that row); nothing else changes."""
    fmt = lowprec.format(name, granularity=granularity)
    t = _values(12, 32, torch.bfloat16, device)
    t[3, 5], t[7, 9] = float("nan"), float("-inf")
    codes, s = fp8_cast.operand(t, fmt)
    _assert_same((codes, s), _general(t, fmt))
    nan_rows = codes.float().isnan().all(dim=1)
    if granularity == "tensor":
        assert s.isnan().all() and nan_rows.all()
    else:
        assert torch.equal(nan_rows, s.isnan().reshape(-1)) and nan_rows.nonzero().flatten().tolist() == [3, 7]


def test_non_contiguous_input_and_padding_columns(device):
    """A transposed view reads through its strides; the transposed layout's padding columns hold
    the code 0x00 (+0), whatever the scale (here NaN)."""
    fmt = lowprec.format("fp8_e4m3", granularity="tensor")
    base = _values(40, 21, torch.float32, device)
    t = base.t()  # (21, 40), column-major
    _assert_same(fp8_cast.operand(t, fmt), _general(t.contiguous(), fmt))
    base[2, 2] = float("nan")
    codes, _ = fp8_cast.operand(base, fmt, transposed=True)
    assert codes.shape == (21, 48)
    assert torch.equal(codes[:, 40:].view(torch.uint8), torch.zeros(21, 8, dtype=torch.uint8, device=device))


def test_both_layouts_at_once_are_each_layout_alone(device):
    fmt = lowprec.format("fp8_e5m2", granularity="tensor")
    t = _values(33, 40, torch.bfloat16, device)
    both = fp8_cast.operands(t, fmt, torch.tensor(2.0, device=device))
    _assert_same(both[0], _general(t, fmt, torch.tensor(2.0, device=device)))
    _assert_same(both[1], _general(t, fmt, torch.tensor(2.0, device=device), transposed=True))


def _delayed_steps(shape, dtype, device):
    """Tensors for delayed scaling's steps: from an empty history on, a NaN and an infinity, all-zero
    tensors until a history of 3 is empty again and one more, then values past the history's range."""
    def values(seed):
        return _values(*shape, dtype, device, seed=seed)
    nan = values(2)
    nan[5, 7], nan[50, 11] = float("nan"), float("-inf")
    zeros = torch.zeros(*shape, dtype=dtype, device=device)
    return [values(0), values(1) / 4, nan, zeros, zeros, zeros, zeros, values(3), values(4) * 1000]


@pytest.mark.parametrize("shape", [(300, 520), (64, 128)])
@pytest.mark.parametrize("block_p", [2048, 16])
@pytest.mark.parametrize("layouts", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("dtype,history_dtype", [(torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                 (torch.float32, torch.bfloat16), (torch.float32, torch.float32)])
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_delayed_operands_are_those_of_the_delayed_amax(device, name, dtype, history_dtype, layouts, block_p, shape,
                                                        monkeypatch):
    """Delayed scaling in one pass over the tensor (on CUDA; tensor operations on the CPU): over steps that
    start from an empty history (the scale is the tensor's own amax), go on from it (the history's), meet a
    NaN and an infinity (scale NaN, every code NaN, the history taking the finite amax), all-zero tensors
    until the history is empty again and one more (an empty history and a tensor of zeros: scale 1), and
    values past the history's range (they saturate), the codes in each layout asked for, the scale, the
    amax used and the history pushed are those of `delayed_amax` followed by `operands(amax=...)`, bit for
    bit. 300 x 520 spans 25-60 programs of the pass, whose maxima the finishing program merges in one block
    of 2048 or in blocks of 16 (the last one partly empty); 300 rows are not a multiple of the transposed
    layout's padding; 64 x 128 is one whole tile of the pass over both layouts (the shape of a small layer's
    fp32 master weight). An fp32 tensor's amax is rounded (to nearest even) into a bf16 history."""
    from lowprec.scaling import delayed_amax
    monkeypatch.setitem(fp8_cast.DELAYED_FINISH_BLOCKS, "BLOCK_P", block_p)
    fmt = lowprec.format(name, granularity="tensor")
    rowmajor, transposed = layouts
    history = torch.zeros(3, dtype=history_dtype, device=device)
    twin = history.clone()
    steps = _delayed_steps(shape, dtype, device)
    for step, t in enumerate(steps):
        op, op_t, used = fp8_cast.delayed_operands(t, fmt, history, rowmajor=rowmajor, transposed=transposed)
        amax = delayed_amax(twin, t)
        want, want_t = fp8_cast.operands(t, fmt, amax=amax)
        assert (op is None) != rowmajor and (op_t is None) != transposed
        if rowmajor:
            _assert_same(op, want)
        if transposed:
            _assert_same(op_t, want_t)
        assert used.dtype == amax.dtype and torch.equal(used, amax), step
        assert history.dtype == history_dtype and torch.equal(history, twin), step
        if step == 2:
            assert (op or op_t)[1].isnan().all() and 0 < float(history[0]) < float("inf")
    assert float(used) < float(steps[-1].abs().amax())  # the last step's scale is the history's: it saturated


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_e2m1_operand_is_the_general_quantizers_codes(device, dtype, monkeypatch):
    """An FP4 E2M1 operand (per row, and per tensor with its own or a delayed amax, both layouts) is the
    general quantizer's E2M1 values cast to E4M3, bit for bit (a NaN's sign aside), and its scales are the
    quantizer's: over 30 decades of magnitudes (values on the grid's every step, ties, saturation, zeros,
    signed zeros, an all-zero row), a NaN and an infinity, whole tiles and ragged ones; on CUDA from the Triton
    passes, with the quotient from the reciprocal and from IEEE division. The bf16 operands of the same values
    (:func:`fp8_cast.e2m1_values`) are the bf16 tensor-core kernel's general ones."""
    for fast, (rows, cols) in itertools.product((True, False) if device.type == "cuda" else (True,),
                                                [(64, 128), (45, 70)]):
        monkeypatch.setattr(fp8_cast, "FAST_QUOTIENT", fast)
        t = _values(rows, cols, dtype, device, seed=cols)
        bad = t.clone()
        bad[rows // 2, 3], bad[rows - 1, cols - 1] = float("nan"), float("inf")
        amax = torch.tensor(float(t.float().abs().amax()) / 5, device=device)
        cases = [("row", None, False), ("tensor", None, False), ("tensor", None, True), ("tensor", amax, False),
                 ("tensor", amax, True)]
        for x, (granularity, a, transposed) in itertools.product((t, bad), cases):
            fmt = lowprec.format("fp4_e2m1", granularity=granularity)
            got = fp8_cast.e2m1_operand(x, fmt, amax=a, transposed=transposed)
            want = _general(x, fmt, amax=a, transposed=transposed)
            assert got[0].dtype == torch.float8_e4m3fn
            _assert_same(got, want)
            # the bf16 tensor cores' operands: the values (times the scales, per row, in the transposed layout)
            v, v_t, s = fp8_cast.e2m1_values(x, fmt, amax=a, rowmajor=not transposed, transposed=True)
            bf16 = KERNELS["bf16_tensorcore"]
            for layout, (got_v, want_v) in enumerate(((v, bf16._general_operand(x, fmt, amax=a)),
                                                      (v_t, bf16._general_operand(x, fmt, amax=a, transposed=True)))):
                if layout == 0 and transposed:
                    continue
                assert got_v.dtype == torch.bfloat16 and torch.equal(got_v.isnan(), want_v[0].isnan())
                assert torch.equal(got_v.nan_to_num(), want_v[0].nan_to_num())
                assert (want_v[1] is None) == (layout == 1 and granularity == "row")
                assert want_v[1] is None or torch.equal(s.nan_to_num(), want_v[1].nan_to_num())


def test_e2m1_operand_refuses_what_it_cannot_make():
    row, tensor = (lowprec.format("fp4_e2m1", granularity=g) for g in ("row", "tensor"))
    with pytest.raises(ValueError, match="is not one it makes"):
        fp8_cast.e2m1_operand(torch.ones(2, 3), lowprec.format("fp8_e4m3", granularity="tensor"))
    with pytest.raises(ValueError, match="is not one it makes"):
        fp8_cast.e2m1_operand(torch.ones(2, 3), lowprec.format("nvfp4"))
    with pytest.raises(ValueError, match="is not one it makes"):
        fp8_cast.e2m1_operand(torch.ones(2, 3, 4), tensor)
    with pytest.raises(ValueError, match="contraction"):
        fp8_cast.e2m1_operand(torch.ones(2, 3), row, transposed=True)
    with pytest.raises(ValueError, match="delayed amax"):
        fp8_cast.e2m1_operand(torch.ones(2, 3), row, amax=torch.tensor(1.0))


def test_the_kernels_take_e2m1_operands_from_the_passes_where_asked(monkeypatch):
    """``lowprec.kernels.E2M1_FROM_PASSES`` routes an E2M1 weight's FP8 operand to :func:`fp8_cast.e2m1_operand`
    and its bf16 operands to :func:`fp8_cast.e2m1_values` (and leaves them to the general quantizer where
    off): the same codes, values and scales either way (on the CPU the functions' tensor-operation path)."""
    import lowprec.kernels as kernels

    w = _values(32, 48, torch.float32, "cpu", seed=5)
    calls = []
    for name in ("e2m1_operand", "e2m1_values"):
        made = getattr(fp8_cast, name)
        monkeypatch.setattr(fp8_cast, name, lambda *a, made=made, name=name, **k: calls.append(name) or made(*a, **k))

    def same(a, b):
        assert torch.equal(a[0].view(torch.uint8) if a[0].dtype == torch.float8_e4m3fn else a[0],
                           b[0].view(torch.uint8) if b[0].dtype == torch.float8_e4m3fn else b[0])
        assert (a[1] is None) == (b[1] is None) and (a[1] is None or torch.equal(a[1], b[1]))
    for granularity in ("row", "tensor"):
        fmt = lowprec.format("fp4_e2m1", granularity=granularity)
        fp8, bf16 = KERNELS["fp8_rowwise" if granularity == "row" else "fp8_tensorwise"], KERNELS["bf16_tensorcore"]
        got = {}
        for setting in (False, True):
            monkeypatch.setattr(kernels, "E2M1_FROM_PASSES", setting)
            got[setting] = [fp8.operand(w, fmt), bf16.operand(w, fmt), bf16.operand(w, fmt, transposed=True)]
        for a, b in zip(got[True], got[False], strict=True):
            same(a, b)
        both = bf16.operands(w, fmt)  # the setting still on: both layouts from one call
        same(both[0], got[False][1])
        same(both[1], got[False][2])
    assert calls == ["e2m1_operand", "e2m1_values", "e2m1_values", "e2m1_values"] * 2


def test_delayed_operands_refuse_what_they_cannot_make():
    fmt = lowprec.format("fp8_e4m3", granularity="tensor")
    h = torch.zeros(4)
    with pytest.raises(ValueError, match="is not one it makes"):
        fp8_cast.delayed_operands(torch.ones(2, 3), lowprec.format("fp8_e4m3", granularity="row"), h)
    with pytest.raises(ValueError, match="is not one it makes"):
        fp8_cast.delayed_operands(torch.ones(2, 3, 4), fmt, h)
    for bad in (torch.zeros(2, 2), torch.zeros(0), torch.zeros(4, dtype=torch.int32), torch.zeros(8)[::2]):
        with pytest.raises(ValueError, match="history"):
            fp8_cast.delayed_operands(torch.ones(2, 3), fmt, bad)


def test_what_it_takes_and_refuses():
    fmt = lowprec.format("fp8_e4m3")
    assert fp8_cast.applies(torch.zeros(3, 4), lowprec.format("fp8_e5m2", granularity="row"))
    assert not fp8_cast.applies(torch.zeros(3, 4), fmt, rounding="stochastic")
    assert not fp8_cast.applies(torch.zeros(3, 4), lowprec.format("mxfp8"))  # block scales
    assert not fp8_cast.applies(torch.zeros(3, 4), lowprec.format("fp8_e4m3", max_value=240.0))  # not the dtype's range
    assert not fp8_cast.applies(torch.zeros(0, 4), fmt) and not fp8_cast.applies(torch.zeros(2, 3, 4), fmt)
    assert not fp8_cast.applies(torch.zeros(3, 4, dtype=torch.int32), fmt)
    with pytest.raises(ValueError, match="is not one it makes"):
        fp8_cast.operand(torch.zeros(2, 3, 4), fmt)
    with pytest.raises(ValueError, match="is not one it makes"):
        fp8_cast.operand(torch.zeros(2, 3), lowprec.format("mxfp8"))
    row = lowprec.format("fp8_e4m3", granularity="row")
    with pytest.raises(ValueError, match="delayed amax"):
        fp8_cast.operand(torch.zeros(2, 3), row, amax=torch.tensor(1.0))
    with pytest.raises(ValueError, match="per-row scales"):
        fp8_cast.operand(torch.zeros(2, 3), row, transposed=True)
    with pytest.raises(ValueError, match="both layouts"):
        fp8_cast.operands(torch.zeros(2, 3), row)


def test_a_measured_amax_gives_the_same_operand(device):
    """``measured`` (the tensor's amax, computed by the caller) replaces the amax pass: the same codes
    and scale as without it, in each layout and with a NaN in the tensor; refused where it cannot
    stand for the amax pass (per-row scales, a delayed amax, a gathered weight, more than one number)."""
    fmt = lowprec.format("fp8_e4m3", granularity="tensor")
    x = _values(64, 48, torch.bfloat16, device)
    nan = x.clone()
    nan[3, 4] = float("nan")
    for t in (x, nan):
        m = t.abs().amax()
        _assert_same(fp8_cast.operand(t, fmt, measured=m), fp8_cast.operand(t, fmt))
        _assert_same(fp8_cast.operand(t, fmt, transposed=True, measured=m), fp8_cast.operand(t, fmt, transposed=True))
        for a, b in zip(fp8_cast.operands(t, fmt, measured=m), fp8_cast.operands(t, fmt), strict=True):
            _assert_same(a, b)
    m = x.abs().amax()
    with pytest.raises(ValueError, match="measured amax"):
        fp8_cast.operand(x, lowprec.format("fp8_e4m3", granularity="row"), measured=m)
    with pytest.raises(ValueError, match="measured amax"):
        fp8_cast.operand(x, fmt, amax=m, measured=m)
    with pytest.raises(ValueError, match="measured amax"):
        fp8_cast.operand(x.float(), fmt, gathered=torch.bfloat16, measured=m)
    with pytest.raises(ValueError, match="measured amax"):
        fp8_cast.operand(x, fmt, measured=x.abs().amax(dim=1))


def test_a_compiled_fp8_kernel_takes_its_amax_from_the_graph(device):
    """Compiled, the FP8 kernel's per-tensor operand is given its amax as a reduction of the graph (which
    the compiler fuses into the kernel making the tensor): the operator is called with it, the codes
    are eager's (on CUDA also through inductor's kernels, a NaN in the tensor included, the reduction
    reading the stored tensor or its expression); with ``amax_in_graph`` off, or per row, the operator
    takes its own amax; with ``amax_reads_stored`` the reduction reads the tensor through a no-op view."""
    from lowprec.kernels import KERNELS

    k = KERNELS["fp8_tensorwise"]
    x = _values(64, 48, torch.bfloat16, device)
    if device == "cuda":
        fmt = lowprec.format("fp8_e4m3", granularity="tensor")
        nan = x.clone()
        nan[5, 6] = float("nan")
        for t, (in_graph, stored) in itertools.product((x, nan), ((True, True), (True, False), (False, True))):
            torch._dynamo.reset()
            before = k.amax_in_graph, k.amax_reads_stored
            k.amax_in_graph, k.amax_reads_stored = in_graph, stored
            try:
                got = torch.compile(lambda t: k.operands(torch.nn.functional.gelu(t), fmt), fullgraph=True)(t)
            finally:
                k.amax_in_graph, k.amax_reads_stored = before
            for a, b in zip(got, k.operands(torch.nn.functional.gelu(t), fmt), strict=True):
                _assert_same(a, b)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    def calls(gm):
        return [n for n in gm.graph.nodes if n.op == "call_function" and "fp8_operand" in str(n.target)]

    for fmt, in_graph in ((lowprec.format("fp8_e4m3", granularity="tensor"), True),
                          (lowprec.format("fp8_e5m2", granularity="tensor"), False),
                          (lowprec.format("fp8_e4m3", granularity="row"), True)):
        def f(x):
            return k.operand(torch.nn.functional.gelu(x), fmt)
        torch._dynamo.reset()
        graphs.clear()
        before, k.amax_in_graph = k.amax_in_graph, in_graph
        try:
            got = torch.compile(f, fullgraph=True, backend=backend)(x)
        finally:
            k.amax_in_graph = before
        _assert_same(got, f(x))
        (call,) = calls(graphs[0])
        measured = call.kwargs.get("measured", call.args[7] if len(call.args) > 7 else None)
        assert (measured is not None) == (in_graph and fmt.granularity == "tensor"), (fmt, in_graph, call)
        if measured is not None:
            assert "amax" in str(measured.target)
            read = [a for a in measured.all_input_nodes][0]  # abs(view) with the stored tensor read
            view = read.all_input_nodes[0]
            assert view.target is torch.as_strided and k.amax_reads_stored, view


def test_compiled_operand_is_the_eager_one(device):
    """Under torch.compile (fullgraph) the operator stays one call and the amax fuses around it:
    the same codes and scale as eager."""
    fmt = lowprec.format("fp8_e4m3", granularity="tensor")
    x = _values(64, 48, torch.bfloat16, device)

    def f(x):
        h = torch.nn.functional.gelu(x * 2)
        return fp8_cast.operand(h, fmt) + fp8_cast.operand(h, fmt, transposed=True)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    got, want = compiled(x), f(x)
    _assert_same(got[:2], want[:2])
    _assert_same(got[2:], want[2:])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows_in_one_kernel", [False, True])
@pytest.mark.parametrize("e5m2", [False, True])
def test_triton_kernels_equal_the_reference_on_every_bit_pattern(e5m2, rows_in_one_kernel, monkeypatch):
    """Every bf16 bit pattern (NaN and inf among them), scaled by its own amax (all NaN then), and,
    with the non-finite ones left out, by delayed amaxes that saturate and that flush to zero:
    the Triton kernels' codes and scales are the tensor-operation reference's, byte for byte
    (NaN codes are 0x7F in both); per-row scales also from the one-kernel path
    (``ROWS_IN_ONE_KERNEL``), on rows 8,192 wide and on a strided view; and the codes' bf16 values in each
    layout (``values=True``), the transposed ones times their per-row scales."""
    monkeypatch.setattr(fp8_cast, "ROWS_IN_ONE_KERNEL", rows_in_one_kernel)
    x = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16).reshape(256, 256).cuda()
    finite = torch.where(x.isfinite(), x, 0).reshape(512, 128)
    cases = [(x, None, False), (finite, None, False), (finite, None, True), (x, None, True)]
    cases += [(finite, torch.tensor(a, device="cuda"), False) for a in (1e-30, 3.0, 1e30)]
    # per row: rows as wide as the 600M model's (many reads a row), a strided one cut short of a tile
    cases += [(x.reshape(8, 8192), None, True), (finite.reshape(16, 4096)[:, :4000], None, True)]
    for t, amax, per_row in cases:
        for rowmajor, transposed in ((True, False), (False, True), (True, True)) if not per_row else ((True, False),):
            want = fp8_cast.reference_operand(t, amax, e5m2, per_row, rowmajor, transposed)
            runs = [fp8_cast.triton_operand(t, amax, e5m2, per_row, rowmajor, transposed)]
            if amax is None and not per_row:  # the amax measured by the caller (NaN where t holds one) instead
                runs.append(fp8_cast.triton_operand(t, None, e5m2, False, rowmajor, transposed,
                                                    measured=t.abs().amax()))
            for got in runs:
                for g, w in zip(got, want, strict=True):
                    assert g.dtype == w.dtype and g.shape == w.shape
                    assert torch.equal(g.view(torch.uint8), w.view(torch.uint8)) if g.dtype != torch.float32 else \
                        torch.equal(g.view(torch.int32), w.view(torch.int32))
        for rowmajor, transposed in ((True, False), (False, True), (True, True)):  # bf16 values (NaN for NaN)
            want = fp8_cast.reference_operand(t, amax, e5m2, per_row, rowmajor, transposed, values=True)
            got = fp8_cast.triton_operand(t, amax, e5m2, per_row, rowmajor, transposed, values=True)
            for g, w in zip(got, want, strict=True):
                assert g.dtype == w.dtype and g.shape == w.shape
                bits = torch.int16 if g.dtype == torch.bfloat16 else torch.int32
                assert torch.equal(g.isnan(), w.isnan()) and torch.equal(g.view(bits)[~g.isnan()], w.view(bits)[~w.isnan()])


def _quotients(x, scales):
    """``(fast, ieee)``: x / s for every x (fp32, 1-D) and every s of ``scales``, one row per scale,
    from the cast's reciprocal-and-correction quotient and from IEEE division (``tl.div_rn``)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(x_ptr, s_ptr, fast_ptr, ieee_ptr, N, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < N, other=0.0)
        s = tl.zeros([BLOCK], dtype=tl.float32) + tl.load(s_ptr + tl.program_id(1))
        r = tl.div_rn(tl.zeros_like(s) + 1.0, s)
        out = tl.program_id(1).to(tl.int64) * N + offs
        tl.store(fast_ptr + out, fp8_cast._quotient(x, s, r, True), mask=offs < N)
        tl.store(ieee_ptr + out, tl.div_rn(x, s), mask=offs < N)

    fast = torch.empty(len(scales), len(x), device="cuda")
    ieee = torch.empty_like(fast)
    kernel[(triton.cdiv(len(x), 1024), len(scales))](x, scales, fast, ieee, len(x), BLOCK=1024)
    return fast, ieee


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_quotient_from_the_reciprocal_is_ieee_division():
    """Where the cast divides by a tile's scales through their reciprocals (every scale in [2^-64, 2^64]
    and every |x / s| below 2^120, which the kernels check per tile), the quotient is IEEE division's
    bit for bit wherever |x / s| >= 2^-20, and below that both are under 2^-17 with x's sign (both
    formats' code is then the signed zero). x: every finite bf16 and fp16 number and 2^20 random fp32
    bit patterns; s: every exponent from -64 to 63 with significands 1, 1 + 2^-23, 2 - 2^-23, 1.5 and
    random ones, and the scales amax / 448 and amax / 57344 of random amaxes."""
    gen = torch.Generator().manual_seed(0)
    every16 = torch.arange(-2**15, 2**15, dtype=torch.int32).to(torch.int16)
    xs = [every16.view(torch.bfloat16).float(), every16.view(torch.float16).float(),
          torch.randint(-2**31, 2**31 - 1, (2**20,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)]
    x = torch.cat(xs)
    x = x[x.isfinite()].cuda()
    sig = torch.cat([torch.tensor([1.0, 1 + 2**-23, 2 - 2**-23, 1.5]), 1 + torch.rand(12, generator=gen)])
    exps = torch.arange(-64, 64, dtype=torch.float32)
    amax = torch.exp2(torch.rand(512, generator=gen) * 60 - 20) * (1 + torch.rand(512, generator=gen))
    scales = torch.cat([(sig[:, None] * torch.exp2(exps)[None, :]).flatten(), amax / 448.0, amax / 57344.0])
    scales = scales[(scales >= 2.0**-64) & (scales <= 2.0**64)].cuda()
    checked = 0
    for part in scales.split(256):
        fast, ieee = _quotients(x, part)
        inside = x.abs()[None, :] * (1 / part.double())[:, None] < 2.0**120  # the tiles the check lets through
        big = inside & (ieee.abs() >= 2.0**-20)
        assert torch.equal(fast.view(torch.int32)[big], ieee.view(torch.int32)[big])
        small = inside & ~big
        assert bool((fast[small].abs() < 2.0**-17).all())
        assert torch.equal(fast[small].signbit(), x.expand_as(fast)[small].signbit())
        checked += int(big.sum())
    assert checked > 5 * 10**8  # the check ran on most of them


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_kernels_on_whole_tiles(dtype, fast, monkeypatch):
    """Shapes that the cast's tiles divide (its stores and loads then unmasked), bf16 and fp32 (a master
    weight), with the quotient from the reciprocal and from IEEE division: per-tensor scales from the
    tensor's amax, from delayed amaxes below it (values saturate), far below and far above it (scales outside
    the reciprocal's range), per-row scales, and bf16 values; every layout, E4M3 and E5M2; the Triton
    kernels' codes and scales are the tensor-operation reference's, byte for byte."""
    monkeypatch.setattr(fp8_cast, "FAST_QUOTIENT", fast)
    for rows, cols in [(64, 128), (128, 256), (256, 512)]:
        t = _values(rows, cols, dtype, "cuda", seed=rows)
        amax = float(t.abs().amax())
        for e5m2 in (False, True):
            cases = [(None, False)] + [(torch.tensor(a, device="cuda"), False) for a in (amax / 3, 1e-30, 1e30)]
            for a, per_row in cases + [(None, True)]:
                layouts = ((True, False),) if per_row else ((True, False), (False, True), (True, True))
                for (rowmajor, transposed), values in itertools.product(layouts, (False, True)):
                    want = fp8_cast.reference_operand(t, a, e5m2, per_row, rowmajor, transposed, values=values)
                    got = fp8_cast.triton_operand(t, a, e5m2, per_row, rowmajor, transposed, values=values)
                    for g, w in zip(got, want, strict=True):
                        assert g.dtype == w.dtype and g.shape == w.shape
                        bits = {torch.bfloat16: torch.int16, torch.float32: torch.int32}.get(g.dtype, torch.uint8)
                        assert torch.equal(g.view(bits), w.view(bits)), (rows, cols, e5m2, a, per_row, transposed, values)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_kernels_on_a_large_tensor():
    """More than 2^31 bytes of offsets: the kernels' indexing is 64-bit (a (2^16 + 3) x 2^15 input,
    both layouts)."""
    x = torch.randn(2**16 + 3, 2**15, device="cuda", dtype=torch.bfloat16)
    x[-1, -1] = 1000.0  # the amax, in the last tile
    codes, codes_t, s = fp8_cast.triton_operand(x, None, False, False, True, True)
    assert codes_t.shape == (2**15, 2**16 + 16) and torch.equal(s.cpu(), torch.tensor([1000.0]) / torch.tensor(448.0))
    for rows in (slice(0, 64), slice(2**16 - 61, 2**16 + 3)):
        want = fp8_cast.reference_cast(x[rows], s, False, False)
        assert torch.equal(codes[rows].view(torch.uint8), want.view(torch.uint8))
        assert torch.equal(codes_t[:, rows].view(torch.uint8), want.t().view(torch.uint8))


def test_an_lstm_cells_casts_stay_tensor_operations(monkeypatch):
    """The operands a recurrence's cell computes itself (`RecurrentGemms.input_cast` / `grad_cast`,
    a few rows a step, fused into the cell's compiled kernel) are the general quantizer's tensor
    operations, not the operator; the layer's own GEMMs take the operator; the codes are the same."""
    from lowprec.gemm import LayerIO, RecurrentGemms, _grad_operand, _input_operand
    from lowprec.nn import QLinear
    from lowprec.nn.native import OperandCache

    fields = {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
              "grad": {"format": "fp8_e5m2", "granularity": "tensor"}}
    layer = QLinear(16, 64, bias=False, precision=lowprec.LayerPrecision.from_fields(fields))
    plan = layer.plan_for("sm90")
    assert plan.fprop.kernel == plan.dgrad.kernel == "fp8_tensorwise"
    gemms = RecurrentGemms(plan, LayerIO(OperandCache()))
    x, dy = torch.randn(3, 16), torch.randn(3, 64)
    want = _input_operand(x, plan), _grad_operand(dy, plan)  # the operator's (CPU path)
    calls = []
    monkeypatch.setattr(fp8_cast, "_fp8_operand", lambda *a: calls.append(a) or pytest.fail("the operator ran"))
    got = gemms.input_cast(x), gemms.grad_cast(dy)
    assert not calls
    for g, w in zip(got, want, strict=True):
        _assert_same(g, w)


def _gathered_cases(master, device):
    """Master weights over 30 decades of scale (each column its own magnitude), and ones whose
    dequantized codes overflow fp16 or bf16, underflow, hold a NaN or an infinity, or are all zero."""
    yield _values(37, 50, master, device)
    for decade in (-40, -30, 4, 6, 30, 38) if master == torch.float32 else (-30, 4, 6, 30, 38):
        yield (torch.randn(24, 40) * 3.0 * 10.0**decade).to(master).to(device)
    nan, inf = _values(20, 32, master, device), _values(20, 32, master, device)
    nan[3, 4], inf[5, 6] = float("nan"), float("-inf")
    yield nan
    yield inf
    yield torch.zeros(16, 16, dtype=master, device=device)


@pytest.mark.parametrize("master", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2"])
def test_a_gathered_weights_operand_is_that_of_its_dequantized_codes(device, name, master):
    """``gathered=dtype``: from the master in one pass, the operand of what a data-parallel run's ranks
    hold after gathering the weight in the format and dequantizing it to ``dtype``
    (lowprec.fsdp.as_gathered): its codes and its own scale, byte for byte, in both layouts."""
    from lowprec.fsdp import as_gathered

    fmt = lowprec.format(name, granularity="tensor")
    for dtype in fp8_cast.GATHERED_DTYPES:
        for w in _gathered_cases(master, device):
            g = as_gathered(w, fmt, dtype)
            for transposed in (False, True):
                _assert_same(fp8_cast.operand(w, fmt, transposed=transposed, gathered=dtype),
                             fp8_cast.operand(g, fmt, transposed=transposed))
            both = fp8_cast.operands(w, fmt, gathered=dtype)
            _assert_same(both[0], fp8_cast.operand(g, fmt))
            _assert_same(both[1], fp8_cast.operand(g, fmt, transposed=True))


@pytest.mark.parametrize("master", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_a_gathered_e2m1_weights_operand_is_that_of_its_dequantized_codes(device, granularity, master):
    """An FP4 E2M1 weight gathered in its format and dequantized to bf16 (lowprec.fsdp.as_gathered): its E4M3
    codes and scales made from the master equal, byte for byte, those made from the gathered tensor, in each
    layout (per row: the row-major one), over 30 decades of scale, rows holding a NaN or an infinity, and
    all-zero weights. One case lies below the range where that holds (row amax under 2^-121: a fp32 master
    of decade -40, subnormal) and is skipped."""
    from lowprec.fsdp import as_gathered

    fmt = lowprec.format("fp4_e2m1", granularity=granularity)
    for w in _gathered_cases(master, device):
        if w.abs().amax() < 2.0**-100:
            continue
        g = as_gathered(w, fmt, torch.bfloat16)
        for transposed in (False, True) if granularity == "tensor" else (False,):
            _assert_same(fp8_cast.e2m1_operand(w, fmt, transposed=transposed, gathered=torch.bfloat16),
                         fp8_cast.e2m1_operand(g, fmt, transposed=transposed))
        if granularity == "tensor":  # both layouts from one pass
            both = fp8_cast.e2m1_operands(w, fmt, gathered=torch.bfloat16)
            _assert_same(both[0], fp8_cast.e2m1_operand(g, fmt))
            _assert_same(both[1], fp8_cast.e2m1_operand(g, fmt, transposed=True))
    with pytest.raises(ValueError, match="dequantized to bf16"):
        fp8_cast.e2m1_operand(w, fmt, gathered=torch.float16)


def test_a_gathered_weight_is_read_per_tensor_with_its_own_amax():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="gathered weight"):
        fp8_cast.operand(w, lowprec.format("fp8_e4m3", granularity="row"), gathered=torch.bfloat16)
    with pytest.raises(ValueError, match="delayed amax"):
        fp8_cast.operand(w, lowprec.format("fp8_e4m3", granularity="tensor"), amax=torch.tensor(1.0),
                         gathered=torch.bfloat16)
    with pytest.raises(ValueError, match="gathered weight"):
        fp8_cast.operand(w, lowprec.format("fp8_e4m3", granularity="tensor"), gathered=torch.int8)


@pytest.mark.parametrize("compiled", [False, True])
def test_a_layer_reads_its_gathered_weight_from_the_master(device, compiled):
    """A QLinear told that its weight reaches it gathered (``gathered_as``, as compute_in_param_dtype
    tells it) computes what it computes when handed ``as_gathered(master)``: the output, the input's
    gradient and the master's gradient, bit for bit, eager and compiled. On a GPU with FP8 tensor
    cores its operands are made from the master (compiled, fprop's pass also makes dgrad's layout);
    the CPU's plan hands its GEMMs the dequantized weight, as the swap does."""
    from lowprec.gemm import gathered_applies
    from lowprec.nn import QLinear

    fields = {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
              "grad": {"format": "fp8_e5m2", "granularity": "tensor"}}
    torch.manual_seed(0)
    layer = QLinear(64, 96, bias=True, precision=lowprec.LayerPrecision.from_fields(fields)).to(device)
    fmt = layer.precision.operand("fprop", "weight")
    if device == "cuda":
        assert gathered_applies(layer.plan, (fmt, torch.bfloat16))
    with torch.no_grad():
        layer.bias.copy_(torch.randn(96))
    _assert_gathered_as_copy(layer, fmt, compiled, backend="aot_eager" if device == "cpu" else "inductor")


def _assert_gathered_as_copy(layer, fmt, compiled: bool, backend: str = "inductor"):
    """``layer`` told that its weight reaches it gathered in ``fmt`` and dequantized to bf16 computes, eager or
    compiled, the output, the input's gradient and the master's gradient, bit for bit, of the same layer
    handed ``as_gathered(master)`` (and its bias in bf16)."""
    from lowprec.fsdp import as_gathered

    device = layer.weight.device
    x = torch.randn(40, layer.in_features, device=device, dtype=torch.bfloat16)
    dy = torch.randn(40, layer.out_features, device=device, dtype=torch.bfloat16)

    def run(gathered):
        layer.zero_grad(set_to_none=True)
        layer.gathered_as = (fmt, torch.bfloat16) if gathered else None
        xi = x.clone().requires_grad_()

        def f(xi):
            if gathered:
                return layer(xi)
            params = {"weight": as_gathered(layer.weight, fmt, torch.bfloat16)}
            if layer.bias is not None:
                params["bias"] = layer.bias.to(torch.bfloat16)
            return torch.func.functional_call(layer, params, (xi,))
        y = (torch.compile(f, fullgraph=True, backend=backend) if compiled else f)(xi)
        y.backward(dy)
        torch._dynamo.reset()
        return y, xi.grad, layer.weight.grad

    got, want = run(True), run(False)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@pytest.mark.parametrize("compiled", [False, True])
def test_an_e2m1_layer_reads_its_gathered_weight_from_the_master(device, compiled, monkeypatch, request):
    """The paper policy's feed-forward layer (FP4 E2M1 weight scaled per row, per-tensor E4M3 input and E5M2
    gradient) with its Hopper plan (on the CPU too: FP8 GEMMs through ``torch._scaled_mm``), told that its
    weight reaches it gathered in bf16: its operands are made from the master, and the output, the input's
    gradient and the master's gradient are those of the layer handed ``as_gathered(master)``, bit for bit,
    eager and compiled (``E2M1_GATHERED_FROM_MASTER``, the default; off, the layer is handed the copy)."""
    from lowprec.gemm import gathered_applies
    from lowprec.nn import QLinear

    tensor = lambda name: {"format": name, "granularity": "tensor"}  # noqa: E731
    fields = {"weight": {"format": "fp4_e2m1", "granularity": "row"}, "input": tensor("fp8_e4m3"),
              "grad": tensor("fp8_e5m2")}
    if device.type == "cpu":
        request.getfixturevalue("cpu_row_scales")
    torch.manual_seed(0)
    layer = QLinear(64, 96, bias=False, precision=lowprec.LayerPrecision.from_fields(fields)).to(device)
    layer._plan = layer.plan_for("sm90")
    fmt = layer.precision.operand("fprop", "weight")
    assert gathered_applies(layer.plan, (fmt, torch.bfloat16))
    monkeypatch.setattr(lowprec.kernels, "E2M1_GATHERED_FROM_MASTER", False)
    assert not gathered_applies(layer.plan, (fmt, torch.bfloat16))
    monkeypatch.setattr(lowprec.kernels, "E2M1_GATHERED_FROM_MASTER", True)
    _assert_gathered_as_copy(layer, fmt, compiled)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_e2m1_layers_from_the_passes_equal_the_general_quantizers(compiled, monkeypatch):
    """Two layers with the paper policy's feed-forward precision (FP4 E2M1 weights scaled per row, E4M3
    inputs, E5M2 gradients; fprop on row-wise FP8 tensor cores, dgrad and wgrad on bf16 ones): with
    ``E2M1_FROM_PASSES`` the outputs, input gradients and weight gradients of three steps are those with the
    general quantizer's operands, bit for bit, eager and compiled."""
    import copy

    import lowprec.kernels as kernels
    from lowprec.nn import QLinear

    fields = {"weight": {"format": "fp4_e2m1", "granularity": "row"}, "input": "fp8_e4m3", "grad": "fp8_e5m2"}
    p = lowprec.LayerPrecision.from_fields(fields)
    torch.manual_seed(0)
    model = torch.nn.Sequential(QLinear(64, 128, bias=False, precision=p), torch.nn.ReLU(),
                                QLinear(128, 64, bias=False, precision=p)).cuda()  # fp32 master weights
    twin = copy.deepcopy(model)
    runs = {True: model, False: twin}
    if compiled:
        runs = {k: torch.compile(m, fullgraph=True) for k, m in runs.items()}
    for step in range(3):
        x = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16) * 10.0 ** (step - 1)
        dy = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16)
        out = {}
        for setting, m in runs.items():
            monkeypatch.setattr(kernels, "E2M1_FROM_PASSES", setting)
            xi = x.clone().requires_grad_()
            y = m(xi)
            out[setting] = (y, *torch.autograd.grad(y, [xi, *m.parameters()], dy))
        for a, b in zip(out[True], out[False], strict=True):
            assert torch.equal(a, b), step


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_delayed_fp8_layers_compiled_equal_eager(backend):
    """Two FP8 layers with delayed scaling on tensor cores: four steps compiled (fullgraph) and eager from
    the same weights give the same input and weight gradients and histories, bit for bit (a ReLU between
    them, which every backend computes exactly; the gradient handed in is a fixed tensor), and the
    histories hold one amax a step."""
    import copy

    from lowprec.nn import QLinear

    fields = {"weight": "fp8_e4m3", "input": {"format": "fp8_e4m3", "granularity": "tensor"},
              "grad": {"format": "fp8_e5m2", "granularity": "tensor"}, "scaling": "delayed", "amax_history": 8}
    torch.manual_seed(0)
    p = lowprec.LayerPrecision.from_fields(fields)
    model = torch.nn.Sequential(QLinear(64, 128, bias=False, precision=p), torch.nn.ReLU(),
                                QLinear(128, 64, bias=False, precision=p)).cuda()
    assert all(m.plan.fprop.kernel == "fp8_tensorwise" for m in (model[0], model[2]))
    twin = copy.deepcopy(model)
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    for step in range(4):
        x = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16) * 10.0 ** (step - 1)
        dy = torch.randn(48, 64, device="cuda", dtype=torch.bfloat16)
        got, want = [], []
        for m, out in ((compiled, got), (twin, want)):
            xi = x.clone().requires_grad_()
            y = m(xi)
            out.append(torch.autograd.grad(y, [xi, *m.parameters()], dy))
        for g, w in zip(got[0], want[0], strict=True):
            assert torch.equal(g, w), step
    histories = {k: v for k, v in model.named_buffers() if k.split(".")[-1].startswith("amax_history")}
    assert len(histories) == 6 and all(bool((h[:4] > 0).all()) and not h[4:].any() for h in histories.values())
    assert all(torch.equal(v, dict(twin.named_buffers())[k]) for k, v in model.named_buffers())
