"""The bf16 tensor-core operand of an unscaled float format (bf16, fp16) is one saturating cast:
the same bits as the general quantizer, eager and compiled."""
import pytest
import torch

import lowprec
from lowprec.kernels import _bf16_rounded, _bf16_values, _fp16_rounded


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("fmt_name", ["bf16", "fp16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bf16_operand_of_an_unscaled_format_is_the_saturating_cast(dtype, fmt_name, transposed):
    """The bf16 tensor-core operand of an unscaled format torch has a dtype for (rounded to nearest)
    takes a short path (a saturating cast; a bf16 tensor for the bf16 format is returned itself):
    bit for bit the general path's values, for values across and beyond the format's range
    (largest, subnormal, signed zeros, overflow), inf and NaN, in the input's layout."""
    from lowprec.kernels import KERNELS, split

    fmt = lowprec.format(fmt_name)
    finfo = torch.finfo(dtype)
    special = torch.tensor([0.0, -0.0, 1.0, -3.0, finfo.max, -finfo.max, finfo.tiny, finfo.tiny / 4, 70000.0,
                            -1e5, 2.0**-20, float("inf"), float("-inf"), float("nan")]).clamp(-finfo.max, finfo.max)
    t = torch.cat([torch.randn(242, generator=torch.Generator().manual_seed(0)) * 300, special]).to(dtype)
    t = t.reshape(16, 16)
    v, outer = KERNELS["bf16_tensorcore"].operand(t, fmt, transposed=transposed)
    ref, ref_outer = split(t, fmt, transposed=transposed)
    assert outer is None and ref_outer is None and v.dtype == torch.bfloat16
    assert torch.equal(v.view(torch.int16), ref.to(torch.bfloat16).view(torch.int16))
    assert v.stride() == ref.stride()
    if dtype == torch.bfloat16 and fmt_name == "bf16":
        assert v.data_ptr() == t.data_ptr()  # the tensor itself, not a copy


def _fp32_values_in_fp16_range(n: int, seed: int) -> torch.Tensor:
    """Random fp32 bit patterns (every exponent, ties to even among them: 1 in 2^13 of them sit
    exactly halfway between two fp16 values) within fp16's finite range, with explicit halfway
    points, subnormal halfway points and the range's ends added."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(torch.int32).view(torch.float32)
    x = x[torch.isfinite(x) & (x.abs() <= 65504)]
    f16 = torch.randn(4096, generator=gen).to(torch.float16)
    up = torch.nextafter(f16, torch.full_like(f16, float("inf"))).float()
    halfway = (f16.float() + up) / 2  # exact in fp32: fp16 has 13 fewer mantissa bits
    sub = (torch.arange(0, 2048, dtype=torch.float32) + 0.5) * 2.0**-24  # fp16 subnormals' halfway points
    ends = torch.tensor([0.0, -0.0, 65504.0, -65504.0, 2.0**-14, 2.0**-24, 2.0**-25, 2.0**-26, 6.1e-5])
    return torch.cat([x, halfway, -halfway, sub, -sub, ends])


def test_fp16_rounding_on_the_bits_is_the_cast():
    """`_fp16_rounded` (no fp16 intermediate) is ``x.to(float16).float()`` bit for bit: normals,
    ties to even, subnormals, signed zeros; inf and NaN kept."""
    x = torch.cat([_fp32_values_in_fp16_range(1_000_000, 0), torch.tensor([float("inf"), -float("inf")])])
    assert torch.equal(_fp16_rounded(x).view(torch.int32), x.to(torch.float16).float().view(torch.int32))
    assert torch.isnan(_fp16_rounded(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_fp16_operand_is_the_eager_one(device):
    """Compiled, the fp16 format's bf16 operand keeps its fp16 rounding: inductor rewrites a
    chain fp32 -> fp16 -> bf16 as one cast, and its Triton kernels keep fp16 intermediates in fp32,
    so a cast chain would round once, not twice (on CUDA ~6% of random values differed)."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fmt = lowprec.format("fp16")
    x = (_fp32_values_in_fp16_range(200_000, 1) * 1.5).to(device)  # some beyond the range: saturated
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: _bf16_values(t, fmt), fullgraph=True)
    expect = x.clamp(-65504, 65504).to(torch.float16).float().to(torch.bfloat16)
    assert torch.equal(compiled(x).view(torch.int16), expect.view(torch.int16))
    assert torch.equal(_bf16_values(x, fmt).view(torch.int16), expect.view(torch.int16))


def test_bf16_rounding_on_the_bits_is_the_cast():
    """`_bf16_rounded` is ``x.to(bfloat16).float()`` bit for bit (random fp32 bit patterns of every
    exponent, explicit halfway points: ties to even; overflow to inf; inf kept), the identity on bf16
    values; NaN stays NaN."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randint(-2**31, 2**31 - 1, (1_000_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    x = x.view(torch.float32)
    b = torch.randn(4096, generator=gen).to(torch.bfloat16)
    halfway = (b.float() + torch.nextafter(b, torch.full_like(b, float("inf"))).float()) / 2  # exact in fp32
    top = torch.finfo(torch.float32).max
    x = torch.cat([x[~torch.isnan(x)], halfway, -halfway, torch.tensor([top, -top, float("inf"), float("-inf")])])
    assert torch.equal(_bf16_rounded(x).view(torch.int32), x.to(torch.bfloat16).float().view(torch.int32))
    assert torch.equal(_bf16_rounded(b.float()), b.float())
    assert torch.isnan(_bf16_rounded(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_compiled_fp16_operand_of_a_bf16_value_made_in_the_same_graph(device):
    """A graph that rounds fp32 values to bf16 and takes the fp16 format's operand of them (an LSTM
    cell computing its next GEMM's input in bf16 activations) gets the eager operand of the bf16
    values: inductor folds the widening of a value it has just narrowed into the unrounded value, so
    without rounding it again the operand would be fp16(y), not fp16(bf16(y))."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fmt = lowprec.format("fp16")
    y = (_fp32_values_in_fp16_range(200_000, 3) * 1.5).to(device)  # some beyond the range: saturated
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: _bf16_values(t.to(torch.bfloat16), fmt), fullgraph=True)
    expect = _bf16_values(y.to(torch.bfloat16), fmt)
    assert torch.equal(compiled(y).view(torch.int16), expect.view(torch.int16))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_bf16_output_comes_from_the_gemm(device):
    """With no outer scale and a bf16 output (activations in bf16), the bf16 tensor-core GEMM returns
    its own bf16 result: within one bf16 rounding (2^-8 relative, Frobenius) of the fp32 product
    rounded once, the two differing only in summation order; with an outer scale the fp32 path
    still applies it before rounding (bit for bit the scaled fp32 product rounded once)."""
    from lowprec.kernels import KERNELS

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(200, 4096, device=device, generator=g).bfloat16()
    b = torch.randn(1024, 4096, device=device, generator=g).bfloat16()
    k = KERNELS["bf16_tensorcore"]
    y = k.mm((a, None), (b, None), torch.bfloat16)
    ref = a.double() @ b.double().t()
    assert y.dtype == torch.bfloat16
    assert float((y.double() - ref).norm() / ref.norm()) < 2.0**-8
    s = torch.tensor([0.5], device=device)
    scaled = k.mm((a, s), (b, None), torch.bfloat16)
    assert torch.equal(scaled, (k.mm((a, None), (b, None), torch.float32) * s).bfloat16())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fmt_name", ["fp16", "bf16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_plain_values_in_one_kernel_are_the_cast(dtype, fmt_name):
    """Eager on CUDA, an unscaled format's bf16 operand values come from one Triton kernel: bit for bit the
    tensor operations' values (random fp32 patterns of every exponent within fp16's range, halfway points,
    subnormals, the range's ends, values beyond it: saturated, infinities kept), NaN where the input holds
    NaN (its bits carry nothing); a bf16 tensor is its own bf16 operand, no kernel."""
    from lowprec.kernels import _plain_values, _plain_values_applies

    fmt = lowprec.format(fmt_name)
    special = torch.tensor([float("inf"), -float("inf"), float("nan"), 3e38, -3e38, 1e5, -7e4])
    x = torch.cat([_fp32_values_in_fp16_range(1_000_000, 4), _fp32_values_in_fp16_range(100_000, 5) * 3, special])
    t = x.to(dtype).cuda()
    assert _plain_values_applies(t, fmt) == (not dtype == torch.bfloat16 == lowprec.kernels._plain_cast(fmt))
    got, ref = _plain_values(t, fmt), _bf16_values(t, fmt)
    assert got.dtype == torch.bfloat16 and got.shape == t.shape
    nan = torch.isnan(ref)
    assert torch.equal(torch.isnan(got), nan) and int(nan.sum()) == 1
    assert torch.equal(got[~nan].view(torch.int16), ref[~nan].view(torch.int16))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_large_weight_takes_one_kernel_for_its_plain_operand():
    """The bf16 tensor-core kernel's fp16 operand of an fp32 tensor larger than the piecewise quantizer's
    chunk is one launch of the one-kernel cast (the tensor operations would go chunk by chunk), with
    the same values as the saturating cast's tensor operations."""
    from lowprec.kernels import KERNELS
    from lowprec.scaling import CHUNK_ELEMENTS

    fmt = lowprec.format("fp16")
    w = torch.randn(CHUNK_ELEMENTS // 4096 + 1, 4096, device="cuda") * 3e4  # some beyond fp16's range
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        v, outer = KERNELS["bf16_tensorcore"].operand(w, fmt, transposed=True)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert len(kernels) == 1 and "_plain_values_kernel" in kernels[0], kernels
    assert outer is None and v.shape == (4096, w.shape[0])
    assert torch.equal(v.t().view(torch.int16), _bf16_values(w, fmt).view(torch.int16))
