"""QTensor storage: packing, real byte counts, serialization, devices, and bad input."""

import pytest
import torch

import lowprec
from lowprec.packing import pack_codes, unpack_codes

ALL = list(lowprec.FORMATS)


@pytest.mark.parametrize("nbits", [1, 2, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 1000, 1023])
def test_pack_unpack_round_trip(nbits, n, device):
    codes = torch.randint(0, 2**nbits, (n,), generator=torch.Generator().manual_seed(n)).to(torch.uint8).to(device)
    packed = pack_codes(codes, nbits)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n * nbits // 8)
    assert torch.equal(unpack_codes(packed, nbits, n), codes)


def test_pack_layout_is_little_end_first():
    assert pack_codes(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 | 2 << 2 | 3 << 4]
    assert pack_codes(torch.tensor([0xA, 0x5], dtype=torch.uint8), 4).tolist() == [0x5A]
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(4, dtype=torch.uint8), 3)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(1,), (3, 5), (2, 3, 70), (64, 64)])
def test_quantize_dequantize_storage_round_trip(name, shape, device):
    """Packing is lossless: unpacked values times scales equal the unpacked fast path."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(5)).to(device)
    q = lowprec.quantize(x, name)
    xq, _ = lowprec.quantize_dequantize(x, name)
    assert q.dequantize().shape == x.shape
    assert torch.equal(q.dequantize(), xq)
    # re-quantizing a dequantized tensor changes nothing where the scale only depends on amax
    # (absmean scales move: mean|Q(x)| != mean|x|, so ternary/binary are not closed that way)
    if lowprec.format(name).scale != "absmean":
        q2 = lowprec.quantize(q.dequantize(), name)
        assert torch.equal(q2.dequantize(), q.dequantize())


def test_nbytes_is_real():
    x = torch.randn(1024, 1024)
    n = 1024 * 1024
    expected = {
        "fp32": 4 * n, "bf16": 2 * n, "fp16": 2 * n,
        "fp8_e4m3": n + 4, "fp8_e5m2": n + 4, "int8": n + 4,
        "fp4_e2m1": n // 2 + 4,
        "mxfp8": n + n // 32, "mxfp4": n // 2 + n // 32,
        "nvfp4": n // 2 + n // 16 + 4,
        "ternary": n // 4 + 4, "binary": n // 8 + 4,
    }
    for name in ALL:
        q = lowprec.quantize(x, name)
        assert q.nbytes == expected[name], name
        assert q.nbytes == sum(t.untyped_storage().nbytes() for t in (q.data, q.scale, q.global_scale) if t is not None)
    big = torch.randn(4096, 4096)
    assert lowprec.quantize(big, "ternary").nbytes == 4096 * 4096 // 4 + 4 <= 4.2 * 2**20
    assert lowprec.quantize(big, "binary").nbytes == 4096 * 4096 // 8 + 4 <= 2.1 * 2**20


def test_row_and_block_scales_are_counted():
    x = torch.randn(10, 100)
    q = lowprec.quantize(x, lowprec.format("fp8_e4m3", granularity="row"))
    assert q.nbytes == 10 * 100 + 10 * 4
    qb = lowprec.quantize(x, lowprec.format("int8", granularity="block", block=64))
    assert qb.data.shape == (10, 128) and qb.scale.shape == (10, 2)  # padded to whole blocks
    assert qb.nbytes == 10 * 128 + 20 * 4


@pytest.mark.parametrize("name", ALL)
def test_save_load_to_and_repr(name, device, tmp_path):
    x = torch.randn(6, 40)
    q = lowprec.quantize(x, name).to(device)
    assert q.device.type == device.type
    path = tmp_path / "q.pt"
    torch.save(q, path)
    r = torch.load(path)  # weights_only (torch's default) works: QTensor is an allowed global
    assert isinstance(r, lowprec.QTensor) and r.fmt == q.fmt and r.shape == q.shape
    assert torch.equal(r.dequantize(), q.dequantize())
    back = r.to("cpu")
    assert torch.equal(back.dequantize(), lowprec.quantize(x, name).dequantize())
    text = repr(q)
    assert name in text and "(6, 40)" in text and f"nbytes={q.nbytes}" in text


@pytest.mark.parametrize("name", ALL)
def test_empty_and_zero_dim(name):
    for shape in [(0,), (0, 5), (3, 0)]:
        q = lowprec.quantize(torch.empty(shape), name)
        # no elements: only a per-tensor fp32 scale where the format has one (4 bytes), no block scales
        assert q.dequantize().shape == shape and q.nbytes == lowprec.predicted_nbytes(shape, name)
    q = lowprec.quantize(torch.tensor(0.75), name)
    assert q.dequantize().shape == ()
    xq, _ = lowprec.quantize_dequantize(torch.tensor(0.75), name)
    assert torch.equal(q.dequantize(), xq)


def test_integer_and_non_tensor_inputs_are_refused():
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        lowprec.quantize(torch.arange(4), "int8")
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        lowprec.quantize([1.0, 2.0], "int8")


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_never_becomes_a_finite_code(name, bad):
    """Documented rule: a NaN/inf poisons its scale group (NaN); unscaled formats keep it."""
    x = torch.randn(4, 64)
    x[1, 3] = bad
    out = lowprec.quantize(x, name).dequantize()
    fmt = lowprec.format(name)
    if not fmt.is_scaled:
        assert torch.equal(out[1, 3].isnan(), torch.tensor(bad != bad))
        if bad == bad:
            assert out[1, 3] == bad
        assert torch.isfinite(out[0]).all()
        return
    assert out[1, 3].isnan()
    if fmt.granularity == "tensor":
        assert out.isnan().all()
    else:  # block formats: only that block (nvfp4: its fp32 tensor scale is poisoned too)
        if fmt.scale == "nvfp4":
            assert out.isnan().all()
        else:
            assert out[1, : fmt.block].isnan().all() and torch.isfinite(out[0]).all()


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shape", [(5,), (3, 7), (2, 4, 100), (0, 3)])
def test_predicted_nbytes_equals_real(name, shape):
    predicted_nbytes = lowprec.predicted_nbytes
    q = lowprec.quantize(torch.randn(shape), name)
    assert predicted_nbytes(shape, name) == q.nbytes
    row = lowprec.format(name)
    if row.is_scaled and row.granularity == "tensor":
        row = row.with_scaling("row")
        assert predicted_nbytes(shape, row) == lowprec.quantize(torch.randn(shape), row).nbytes


@pytest.mark.parametrize("name,granularity", [("fp8_e4m3", "tensor"), ("fp8_e4m3", "row"), ("fp4_e2m1", "row"),
                                              ("int8", "tensor"), ("mxfp4", "block"), ("ternary", "tensor"), ("bf16", "tensor")])
def test_large_tensors_quantize_in_pieces_like_one_piece(monkeypatch, name, granularity):
    from lowprec import scaling as qmod

    fmt = lowprec.format(name)
    if fmt.is_scaled and fmt.granularity != granularity:
        fmt = fmt.with_scaling(granularity)
    x = torch.randn(37, 300, generator=torch.Generator().manual_seed(2)) * 3
    x[5, 7] = 40.0
    monkeypatch.setattr(qmod, "CHUNK_ELEMENTS", 1000)  # 11 pieces of whole rows / 1000 elements
    out, s = qmod.quantize_large(x, fmt)
    ref, s_ref = lowprec.quantize_dequantize(x, fmt)
    if fmt.scale == "absmean":
        # mean|x| summed in another order: fp32 sums of 11,100 terms may differ by a few ulps
        # (observed ~1e-6 relative); the codes are the same
        torch.testing.assert_close(out, ref, rtol=2 ** -18, atol=0)
    else:
        assert torch.equal(out, ref)
    codes, _ = qmod.quantize_large(x, fmt, scaled=False)
    assert torch.equal(codes * s if fmt.granularity == "tensor" else out, out)
    nan = x.clone()
    nan[30, 1] = float("nan")
    bad, _ = qmod.quantize_large(nan, fmt)
    if fmt.is_scaled and fmt.granularity == "tensor":
        assert bad.isnan().all()  # one scale group: the whole tensor
    elif fmt.is_scaled:
        assert bad[30].isnan().any() and torch.isfinite(bad[:30]).all()


@pytest.mark.parametrize("name", ALL)
def test_subnormal_amax_gives_finite_output(name):
    """amax / max underflows for a subnormal amax: the scale must fall back, not become 0 (NaN)."""
    fmt = lowprec.format(name)
    if fmt.is_scaled and fmt.granularity == "tensor" and fmt.kind in ("float", "int"):
        fmt = fmt.with_scaling("row")
    x = torch.tensor([[6.4e-44, 0.0, 0.0, -1e-45] + [0.0] * 28, [1.0] * 32])
    out = lowprec.quantize(x, fmt).dequantize()
    assert torch.isfinite(out).all(), name
    assert torch.equal(lowprec.quantize_dequantize(x, fmt)[0], out)


@pytest.mark.parametrize("transposed", [False, True], ids=["as-is", "transposed"])
@pytest.mark.parametrize("name,granularity", [("fp8_e4m3", "tensor"), ("fp8_e5m2", "tensor"), ("fp8_e4m3", "row"),
                                              ("fp4_e2m1", "row"), ("int8", "tensor"), ("mxfp4", "block"),
                                              ("fp16", "tensor")])
def test_bf16_tensor_core_operand_of_a_large_tensor_is_the_one_piece_operand(monkeypatch, name, granularity, transposed):
    """The bf16 tensor-core kernel's operand of a tensor above CHUNK_ELEMENTS (quantized piece by
    piece, no float32 copy of it) is bit for bit the one-piece operand: values and outer scales."""
    from lowprec import kernels, scaling

    fmt = lowprec.format(name)
    if fmt.is_scaled and fmt.granularity != granularity:
        fmt = fmt.with_scaling(granularity)
    x = torch.randn(37, 320, generator=torch.Generator().manual_seed(3)) * 3
    x[5, 7] = 40.0
    k = kernels.KERNELS["bf16_tensorcore"]
    amaxes = [None, torch.tensor(50.0)] if fmt.is_scaled and fmt.granularity == "tensor" else [None]
    for amax in amaxes:
        ref_v, ref_outer = k.operand(x, fmt, amax=amax, transposed=transposed)
        monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 1000)
        monkeypatch.setattr(scaling, "CHUNK_ELEMENTS", 1000)  # 12 pieces of whole rows / 1000 elements
        v, outer = k.operand(x, fmt, amax=amax, transposed=transposed)
        monkeypatch.undo()
        assert v.dtype == ref_v.dtype == torch.bfloat16 and v.shape == ref_v.shape
        assert torch.equal(v, ref_v)
        assert (outer is None) == (ref_outer is None)
        if outer is not None:
            assert torch.equal(outer, ref_outer)


@pytest.mark.parametrize("name,granularity", [("fp8_e4m3", "tensor"), ("fp8_e4m3", "row"), ("fp4_e2m1", "row"),
                                              ("int8", "tensor"), ("mxfp4", "block"), ("nvfp4", "block"),
                                              ("ternary", "tensor"), ("binary", "tensor"), ("bf16", "tensor")])
@pytest.mark.parametrize("shape", [(37, 320), (3, 11, 64)], ids=["2d", "3d"])
def test_large_qtensors_dequantize_in_pieces_like_one_piece(monkeypatch, name, granularity, shape):
    """dequantize of a QTensor above CHUNK_ELEMENTS, a block of rows at a time: bit-identical to the
    one-piece result, in fp32 and bf16."""
    from lowprec import scaling

    fmt = lowprec.format(name)
    if fmt.is_scaled and fmt.granularity != granularity and fmt.scale not in ("e8m0", "nvfp4"):
        fmt = fmt.with_scaling(granularity)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(4)) * 3
    q = lowprec.quantize(x, fmt)
    ref = {dt: q.dequantize(dt) for dt in (torch.float32, torch.bfloat16)}
    assert q._rows(0, 1) is not None  # every format here splits by rows
    monkeypatch.setattr(scaling, "CHUNK_ELEMENTS", 500)
    for dt, r in ref.items():
        out = q.dequantize(dt)
        assert out.dtype == dt and out.shape == r.shape
        assert torch.equal(out, r)
