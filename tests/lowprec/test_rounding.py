"""Stochastic rounding: unbiased between every pair of neighbouring codes, reproducible."""
import dataclasses
import math

import pytest
import torch

import lowprec
from lowprec.rounding import round_to_grid

DRAWS = 4000
FRACTIONS = torch.tensor([0.1, 0.5, 0.83])
# A draw lands on the upper neighbour with probability f, so the mean of DRAWS draws has
# standard deviation gap * sqrt(f (1 - f) / DRAWS); a deviation beyond 5.5 sigma has probability
# < 4e-8 per value, so over the ~10^4 values tested here a false failure is below 1e-3.
SIGMAS = 5.5


def neighbours(name):
    """Pairs (lo, hi) of adjacent representable element values, positive and negative."""
    fmt = lowprec.format(name)
    if name in ("fp8_e4m3", "fp8_e5m2"):
        dt = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}[name]
        v = torch.arange(128, dtype=torch.uint8).view(dt).float()
        pos = v[torch.isfinite(v)]
    elif fmt.kind == "float" and fmt.bits == 4:
        pos = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    elif name in ("bf16", "fp16"):
        # every exponent's first, a middle and last gap, subnormals included: bit patterns
        dt = {"bf16": torch.bfloat16, "fp16": torch.float16}[name]
        m = fmt.man_bits
        codes = [(e << m) + k for e in range(0, (1 << fmt.exp_bits) - 1) for k in (0, 1 << (m - 1), (1 << m) - 2)]
        lo = torch.tensor(codes, dtype=torch.int16).view(dt).float()
        hi = torch.tensor([c + 1 for c in codes], dtype=torch.int16).view(dt).float()
        keep = torch.isfinite(hi)
        return torch.cat([lo[keep], -hi[keep]]), torch.cat([hi[keep], -lo[keep]])
    elif name == "int8":
        pos = torch.arange(0, 128).float()
    elif name == "ternary":
        pos = torch.tensor([0.0, 1.0])
    else:  # binary: the only neighbours are -1 and +1
        return torch.tensor([-1.0]), torch.tensor([1.0])
    lo, hi = pos[:-1], pos[1:]
    return torch.cat([lo, -hi]), torch.cat([hi, -lo])


ELEMENT_FORMATS = ["bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "int8", "ternary", "binary"]


@pytest.mark.parametrize("name", ELEMENT_FORMATS)
def test_stochastic_rounding_is_unbiased_between_every_pair_of_neighbours(name, device):
    fmt = lowprec.format(name)
    lo, hi = neighbours(name)
    lo, hi = lo.to(device), hi.to(device)
    f = FRACTIONS.to(device)
    x = (lo[:, None] + f[None, :] * (hi - lo)[:, None]).reshape(-1)  # values strictly between
    g = torch.Generator(device=device).manual_seed(0)
    draws = round_to_grid(x.repeat(DRAWS, 1), fmt, "stochastic", g)
    lo_r = lo[:, None].expand(-1, len(f)).reshape(-1)
    hi_r = hi[:, None].expand(-1, len(f)).reshape(-1)
    assert torch.all((draws == lo_r) | (draws == hi_r)), "a stochastic rounding must land on a neighbour"
    mean = draws.double().mean(0)
    gap = (hi_r - lo_r).double()
    p = ((x.double() - lo_r) / gap)
    sigma = gap * torch.sqrt(p * (1 - p) / DRAWS)
    assert torch.all((mean - x.double()).abs() <= SIGMAS * sigma), name


@pytest.mark.parametrize("name", ["fp8_e4m3", "mxfp4", "nvfp4", "int8", "ternary"])
def test_stochastic_quantize_reproducible_and_unbiased_end_to_end(name):
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    a = lowprec.quantize(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    b = lowprec.quantize(x, name, rounding="stochastic", generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.data.view(torch.uint8), b.data.view(torch.uint8))
    n = 2000
    g = torch.Generator().manual_seed(11)
    mean = sum(lowprec.quantize(x, name, rounding="stochastic", generator=g).dequantize().double() for _ in range(n)) / n
    # Unbiased inside the representable range |x| <= s * max (beyond it values saturate: MX's
    # power-of-two scale, NVFP4's rounded E4M3 block scale and ternary's absmean put some there).
    _, s = lowprec.quantize_dequantize(x, name)
    fmt = lowprec.format(name)
    inside = x.abs() <= s * fmt.max_value
    assert inside.float().mean() > 0.5
    # each draw is off by at most one scaled code gap; the largest gap is s * (top-two-code gap)
    top_gap = {"fp8_e4m3": 32.0, "mxfp4": 2.0, "nvfp4": 2.0, "int8": 1.0, "ternary": 1.0}[name]
    # the mean of n draws has std <= gap / (2 sqrt n); 6 of those bound each element's deviation
    bound = s.double() * top_gap * 6 / (2 * math.sqrt(n))
    assert torch.all(((mean - x.double()).abs() <= bound)[inside]), name


def test_unknown_rounding():
    with pytest.raises(ValueError, match="unknown rounding 'up'.*nearest.*stochastic"):
        lowprec.quantize(torch.ones(3), "int8", rounding="up")


@pytest.mark.parametrize("name", ["bf16", "fp16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_fake_quant_cast_path_matches_the_grouped_path_bit_for_bit(name, rounding):
    """fake_quant skips groups and unit scales for unscaled formats; it must give exactly what
    quantize_dequantize gives, over every bf16/fp16 bit pattern plus fp32 values around the
    format's max (saturation), its subnormal range, +-0, +-inf and NaN."""
    from lowprec.scaling import fake_quant, quantize_dequantize

    x = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = x.view(torch.bfloat16 if name == "bf16" else torch.float16).float()
    fmt = lowprec.format(name)
    mx, tiny = fmt.max_value, 2.0 ** (fmt.min_normal_exp - fmt.man_bits)
    extra = torch.tensor([mx, mx * 1.001, 3.4e38, -3.4e38, tiny * 0.3, tiny * 0.5, tiny * 0.7, -tiny * 1.5,
                          0.0, -0.0, math.inf, -math.inf, math.nan])
    x = torch.cat([x, extra, torch.randn(4096) * 1e3])
    fast = fake_quant(x, fmt, rounding=rounding, generator=torch.Generator().manual_seed(3))
    ref, _ = quantize_dequantize(x, fmt, rounding=rounding, generator=torch.Generator().manual_seed(3))
    same = (fast.view(torch.int32) == ref.view(torch.int32)) | (fast.isnan() & ref.isnan())
    assert bool(same.all()), x[~same][:8]


@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_unscaled_e4m3_maps_infinities_to_nan_in_both_roundings(rounding):
    """E4M3 (fn) has no infinity: +-inf becomes NaN, finite overflow saturates to +-448."""
    fmt = dataclasses.replace(lowprec.format("fp8_e4m3"), scale="none")
    v = torch.tensor([float("inf"), -float("inf"), 1000.0, -1000.0, float("nan"), 1.0])
    out = round_to_grid(v, fmt, rounding, torch.Generator().manual_seed(0))
    assert torch.isnan(out[[0, 1, 4]]).all()
    assert out[2:4].tolist() == [448.0, -448.0] and out[5].item() == 1.0


@pytest.mark.parametrize("name,granularity", [("fp8_e4m3", "tensor"), ("fp8_e4m3", "row"), ("fp8_e5m2", "tensor"),
                                              ("fp8_e5m2", "row"), ("fp8_e4m3", None), ("fp8_e5m2", None)])
def test_fake_quant_cast_path_for_fp8_matches_the_grouped_path(name, granularity):
    """The FP8 fast path (torch's casts on x / s) equals the general path bit for bit, on rows that
    mix ordinary values with subnormal-scale rows, zeros, huge values, infinities and NaN."""
    from lowprec.scaling import fake_quant, quantize_dequantize

    fmt = lowprec.format(name)
    fmt = dataclasses.replace(fmt, scale="none") if granularity is None else fmt.with_scaling(granularity)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 67, generator=g) * torch.logspace(-40, 38, 12).reshape(-1, 1).clamp(max=3e38)
    x[1] = 0.0
    x[2, 5] = math.inf
    x[3, 7] = -math.inf
    x[4, 9] = math.nan
    x[5] = torch.randn(67, generator=g) * 1e-42  # subnormal fp32 row
    for t in (x, x[6:8].clone(), x.reshape(-1)[:64].clone()):
        fast, (ref, _) = fake_quant(t, fmt), quantize_dequantize(t, fmt)
        same = (fast.view(torch.int32) == ref.view(torch.int32)) | (fast.isnan() & ref.isnan())
        assert bool(same.all()), (t[~same][:8], fast[~same][:8], ref[~same][:8])


# ---- counter-based noise ---------------------------------------------------------------------------
_M32 = 0xFFFFFFFF


def _mix32_int(x: int) -> int:
    """The hash written with Python integers (arbitrary precision: no overflow to avoid)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def _counter_uniform_int(key: int, counter: int, i: int) -> float:
    base = _mix32_int((key & _M32) ^ _mix32_int((key >> 32) ^ _mix32_int(counter & _M32)))
    return (_mix32_int(i ^ base) >> 8) * 2.0**-24


@pytest.mark.parametrize("key,counter", [(0, 0), (12345, 7), ((1 << 63) - 1, (1 << 40) + 3)])
def test_counter_noise_is_the_hash_of_key_count_and_element(key, counter, device):
    """`counter_uniform` equals its definition evaluated with Python integers, element for element
    (the int64 arithmetic that avoids overflow computes the same 32-bit hash), on the CPU and CUDA."""
    from lowprec.rounding import counter_uniform

    u = counter_uniform((7, 300), torch.tensor(key, device=device), torch.tensor(counter, device=device))
    want = torch.tensor([_counter_uniform_int(key, counter, i) for i in range(2100)], dtype=torch.float64)
    assert u.dtype == torch.float32 and u.shape == (7, 300)
    assert torch.equal(u.cpu().flatten().double(), want)


def test_counter_noise_is_uniform_and_new_for_each_count_and_key():
    """2^20 draws are on the 2^-24 grid in [0, 1); their 256-bin histogram passes a chi-square test
    (255 degrees of freedom: the statistic exceeds 400 with probability < 1e-7 for uniform draws);
    draws of the next count, or of another key, agree with them no more than independent draws would
    (at most 2^20 x 2^-24 = 1/16 expected coincidences: fewer than 10); consecutive draws are
    uncorrelated (|r| < 0.01, 10 standard deviations of 2^-10)."""
    from lowprec.rounding import counter_uniform

    key, n = torch.tensor(987654321), 1 << 20
    u = counter_uniform((n,), key, torch.tensor(1))
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert torch.equal(u * 2**24, (u * 2**24).floor())
    hist = torch.histc(u, bins=256, min=0, max=1)
    assert float(((hist - n / 256) ** 2 / (n / 256)).sum()) < 400
    assert int((counter_uniform((n,), key, torch.tensor(2)) == u).sum()) < 10
    assert int((counter_uniform((n,), torch.tensor(987654322), torch.tensor(1)) == u).sum()) < 10
    assert abs(float(torch.corrcoef(torch.stack([u[:-1], u[1:]]))[0, 1])) < 0.01


def test_counter_noise_traces_to_the_same_bits():
    """Compiled (`aot_eager`, fullgraph) the noise is the eager function's, bit for bit (integer
    arithmetic and one exact conversion)."""
    from lowprec.rounding import counter_uniform

    compiled = torch.compile(counter_uniform, backend="aot_eager", fullgraph=True)
    key, count = torch.tensor(42), torch.tensor(3)
    assert torch.equal(compiled((33, 17), key, count), counter_uniform((33, 17), key, count))
