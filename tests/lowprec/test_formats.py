"""Every format against its reference, bit for bit: torch float8 casts, ml_dtypes E2M1,
and straightforward per-block re-implementations of OCP MX v1.0 and NVFP4."""
import dataclasses
import math

import ml_dtypes
import numpy as np
import pytest
import torch

import lowprec
from lowprec.qtensor import e2m1_decode, e2m1_encode
from lowprec.rounding import round_float_grid, round_to_grid

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that -0.0 vs 0.0 and NaN payloads are compared too."""
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32}[t.element_size()])


def all_fp8_values(dtype):
    v = torch.arange(256, dtype=torch.uint8).view(dtype).to(torch.float32)
    return v


# ---- the registry -------------------------------------------------------------------------
def test_registry_names_and_numbers():
    assert list(lowprec.FORMATS) == "fp32 bf16 fp16 fp8_e4m3 fp8_e5m2 fp4_e2m1 mxfp8 mxfp4 nvfp4 int8 ternary binary".split()
    f = lowprec.format
    assert (f("nvfp4").effective_bits, f("mxfp4").effective_bits, f("mxfp8").effective_bits) == (4.5, 4.25, 8.25)
    assert (f("nvfp4").block, f("mxfp4").block, f("fp8_e4m3").block) == (16, 32, None)
    assert f("fp8_e4m3").max_value == float(torch.finfo(torch.float8_e4m3fn).max)
    assert f("fp8_e5m2").max_value == float(torch.finfo(torch.float8_e5m2).max)
    assert f("fp16").max_value == float(torch.finfo(torch.float16).max)
    assert f("bf16").max_value == float(torch.finfo(torch.bfloat16).max)
    assert f("fp4_e2m1").max_value == float(ml_dtypes.finfo(ml_dtypes.float4_e2m1fn).max)
    assert (f("ternary").bits, f("binary").bits, f("int8").max_value) == (2, 1, 127.0)
    # frozen
    with pytest.raises(Exception):
        f("int8").bits = 4


def test_unknown_and_malformed_formats():
    with pytest.raises(ValueError, match="unknown format 'fp9'.*fp8_e4m3.*binary"):
        lowprec.format("fp9")
    with pytest.raises(ValueError, match="OCP MX v1.0 blocks are 32"):
        lowprec.format("mxfp8", block=16)
    with pytest.raises(ValueError, match="granularity"):
        lowprec.format("fp8_e4m3", granularity="column")
    with pytest.raises(ValueError, match="needs a scale rule"):
        lowprec.format("ternary", scale="none")
    with pytest.raises(ValueError, match="unknown Format field"):
        lowprec.format("int8", bogus=1)
    with pytest.raises(ValueError, match="unknown format"):
        lowprec.quantize(torch.ones(3), "fp9")



def _variants():
    """Every registered format with each granularity it admits, and a few field changes that keep it valid."""
    f = lowprec.format
    out = []
    for name, fmt in lowprec.FORMATS.items():
        out.append(fmt)
        if fmt.granularity != "block" and fmt.scale in ("absmax", "absmean"):
            out += [f(name, granularity="row"), f(name, granularity="block", block=64)]
        out.append(f(name, max_value=fmt.max_value / 2))
    out.append(dataclasses.replace(f("fp8_e4m3"), name="other"))
    return out


def test_equality_and_hash_are_the_fields():
    """Formats compare and hash by their fields alone (as a dataclass would): equal fields, equal
    formats, whether built apart, copied or unpickled; any field changed, a different one."""
    import copy
    import pickle

    formats = _variants()
    for a in formats:
        for b in formats:
            same = dataclasses.astuple(a) == dataclasses.astuple(b)
            assert (a == b) is same and (a != b) is (not same), (a, b)
            if same:
                assert hash(a) == hash(b)
        built = lowprec.Format(**dataclasses.asdict(a))
        assert built == a and hash(built) == hash(a) and built is not a
        for twin in (copy.copy(a), copy.deepcopy(a), pickle.loads(pickle.dumps(a))):
            assert twin == a and hash(twin) == hash(a)
            assert (twin.torch_dtype, twin.fp8_codes, twin.e2m1_codes, twin.is_scaled) == \
                   (a.torch_dtype, a.fp8_codes, a.e2m1_codes, a.is_scaled)
        assert a != a.name and a != dataclasses.astuple(a)
    assert len(set(formats)) == len({dataclasses.astuple(a) for a in formats})


def test_formats_pickled_by_another_process_compare_by_their_fields():
    """Another process builds formats in another order (their numbers differ): unpickled here, they still
    equal the same formats built here."""
    import pickle
    import subprocess
    import sys

    code = ("import pickle, sys, lowprec; f = lowprec.format; "
            "sys.stdout.buffer.write(pickle.dumps([f('int8', granularity='row'), f('fp8_e4m3', granularity='row')]))")
    made = pickle.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
    here = [lowprec.format("fp8_e4m3", granularity="row", max_value=224.0), lowprec.format("fp8_e4m3", granularity="row"),
            lowprec.format("int8", granularity="row")]
    assert made == here[:0:-1] and made[0] != here[0] and hash(made[1]) == hash(here[1])


def test_a_format_saved_as_its_fields_loads():
    """A checkpoint whose formats were pickled as their fields' values (as an earlier release wrote
    QTensors) loads under ``torch.load(weights_only=True)`` into formats equal to those built here."""
    import copyreg
    import io
    import pickle
    import types

    class FieldsPickler(pickle.Pickler):
        def reducer_override(self, obj):
            if type(obj) is lowprec.Format:
                return copyreg.__newobj__, (lowprec.Format,), dataclasses.asdict(obj)
            return NotImplemented

    fmts = [lowprec.format("fp4_e2m1", granularity="row"), lowprec.format("nvfp4")]
    q = lowprec.quantize(torch.randn(4, 64), fmts[0])
    buf = io.BytesIO()
    torch.save({"q": q, "fmts": fmts}, buf, pickle_module=types.SimpleNamespace(Pickler=FieldsPickler, __name__="pickle"))
    loaded = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    assert loaded["fmts"] == fmts and loaded["q"].fmt == fmts[0] and hash(loaded["q"].fmt) == hash(fmts[0])
    assert [(f.e2m1_codes, f.is_scaled, f.torch_dtype) for f in loaded["fmts"]] == [(True, True, None), (False, True, None)]
    assert torch.equal(loaded["q"].dequantize(), q.dequantize())


def test_derived_facts():
    """The facts each format derives at construction, from their definitions."""
    f = lowprec.format
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
              "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "mxfp8": torch.float8_e4m3fn}
    for name, fmt in lowprec.FORMATS.items():
        assert fmt.torch_dtype is dtypes.get(name), name
        assert fmt.is_scaled is (fmt.scale != "none"), name
    # FP8 codes: E4M3/E5M2 with the dtype's full range, absmax-scaled per tensor or per row
    assert f("fp8_e4m3").fp8_codes is torch.float8_e4m3fn and f("fp8_e5m2").fp8_codes is torch.float8_e5m2
    assert f("fp8_e4m3", granularity="row").fp8_codes is torch.float8_e4m3fn
    for fmt in (f("mxfp8"), f("fp8_e4m3", granularity="block", block=32), f("fp8_e4m3", max_value=240.0),
                f("fp8_e4m3", scale="none"), f("bf16"), f("fp4_e2m1"), f("int8")):
        assert fmt.fp8_codes is None, fmt
    # E2M1: largest value 6, absmax-scaled per tensor or per row
    assert f("fp4_e2m1").e2m1_codes is True and f("fp4_e2m1", granularity="row").e2m1_codes is True
    for fmt in (f("nvfp4"), f("mxfp4"), f("fp4_e2m1", granularity="block", block=32), f("fp4_e2m1", max_value=4.0),
                f("fp8_e4m3"), f("ternary")):
        assert fmt.e2m1_codes is False, fmt
    with pytest.raises(Exception):
        f("fp8_e4m3").fp8_codes = None  # frozen, derived facts too

# ---- FP8: exhaustive ----------------------------------------------------------------------
@pytest.mark.parametrize("name", FP8)
def test_fp8_every_code_round_trips(name):
    dtype = FP8[name]
    fmt = lowprec.format(name, scale="none")
    v = all_fp8_values(dtype)
    finite = torch.isfinite(v)
    assert int(finite.sum()) == {"fp8_e4m3": 254, "fp8_e5m2": 248}[name]
    for rounded in (round_to_grid(v, fmt, "nearest"), round_float_grid(v, fmt, "nearest")):
        assert torch.equal(bits(rounded[finite]), bits(v[finite]))
    q = lowprec.quantize(v[finite], fmt)
    assert q.data.dtype == dtype
    assert torch.equal(q.data.view(torch.uint8), torch.arange(256, dtype=torch.uint8)[finite])


@pytest.mark.parametrize("name", FP8)
def test_fp8_every_midpoint_rounds_to_even(name):
    dtype = FP8[name]
    fmt = lowprec.format(name, scale="none")
    v = all_fp8_values(dtype)
    pos = v[:128]
    pos = pos[torch.isfinite(pos)]  # 0 .. max, increasing with the code
    assert torch.all(pos[1:] > pos[:-1])
    mid = (pos[:-1] + pos[1:]) / 2  # exact in fp32
    for sign in (1.0, -1.0):
        out = round_float_grid(sign * mid, fmt, "nearest")
        ref = (sign * mid).to(dtype)
        assert torch.equal(bits(out), bits(ref.to(torch.float32)))
        codes = out.to(dtype).view(torch.uint8)
        assert torch.all(codes % 2 == 0), "a tie must land on the even code"


@pytest.mark.parametrize("name", FP8)
def test_fp8_generic_rounding_matches_torch_cast_on_random_values(name):
    dtype = FP8[name]
    fmt = lowprec.format(name, scale="none")
    g = torch.Generator().manual_seed(1)
    mx = fmt.max_value
    # magnitudes from deep subnormal to beyond max: every binade and the saturation region
    x = torch.randn(200_000, generator=g) * torch.exp2(torch.randint(-24, 18, (200_000,), generator=g).float())
    out = round_float_grid(x, fmt, "nearest")
    ref = x.clamp(-mx, mx).to(dtype).to(torch.float32)
    assert torch.equal(bits(out), bits(ref))
    assert torch.isfinite(out).all(), "finite input must saturate, never overflow"


@pytest.mark.parametrize("name", FP8)
@pytest.mark.parametrize("granularity", ["tensor", "row", "block"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 33, 70), (1, 256)])
@pytest.mark.parametrize("magnitude", [1e-6, 1.0, 3e4])
def test_fp8_scaled_matches_torch_after_scaling(name, granularity, shape, magnitude, device):
    dtype = FP8[name]
    fmt = lowprec.format(name, granularity=granularity, block=32 if granularity == "block" else None)
    g = torch.Generator().manual_seed(hash((name, granularity, shape)) % 2**31)
    x = (torch.randn(shape, generator=g) * magnitude).to(device)
    q = lowprec.quantize(x, fmt)
    # reference: independent per-group absmax scale, then torch's cast
    last = shape[-1]
    if granularity == "tensor":
        xs = x.reshape(1, -1)
    elif granularity == "row":
        xs = x.reshape(-1, last)
    else:
        pad = (-last) % 32
        xs = torch.nn.functional.pad(x, (0, pad)).reshape(-1, 32)
    amax = xs.abs().amax(dim=1, keepdim=True)
    # a true IEEE division (CUDA divides by a Python scalar via its reciprocal)
    s = torch.where(amax > 0, amax / torch.tensor(fmt.max_value, device=device), torch.ones_like(amax))
    ref = (xs / s).clamp(-fmt.max_value, fmt.max_value).to(dtype)
    assert torch.equal(q.data.reshape(ref.shape).view(torch.uint8), ref.view(torch.uint8))
    deq = (ref.float() * s).reshape(*shape[:-1], -1)[..., :last]
    assert torch.equal(bits(q.dequantize()), bits(deq))


# ---- the generic float grid over every fp32 exponent ------------------------------------------
def _every_exponent(n_per_exponent=2048, seed=0) -> torch.Tensor:
    """fp32 numbers with every exponent field (zero and subnormals, normals, inf and NaN), both signs,
    random mantissas, and the zeros, infinities and largest finite numbers themselves."""
    g = torch.Generator().manual_seed(seed)
    e = torch.arange(256, dtype=torch.int32).repeat_interleave(n_per_exponent)
    b = (e << 23) | torch.randint(0, 1 << 23, e.shape, generator=g, dtype=torch.int32)
    b = torch.cat([b, torch.tensor([0, 0x7F800000, 0x7F7FFFFF, 1], dtype=torch.int32)])
    return torch.cat([b, b | -(2**31)]).view(torch.float32)


def _grid_reference(x: torch.Tensor, fmt, noise=None) -> torch.Tensor:
    """The module doc's rule in numpy (frexp and true division in float64): q = 2^(max(floor(log2 a),
    e_min) - m), nearest-even or floor(a / q + u) (the sum in fp32), saturating at max, inf and NaN kept."""
    v = x.double().numpy()
    a = np.minimum(np.abs(v), fmt.max_value)
    finite = np.isfinite(v)
    _, ex = np.frexp(np.where(finite, a, 1.0))
    q = np.ldexp(1.0, np.maximum(ex - 1, fmt.min_normal_exp) - fmt.man_bits)
    r = a / q  # exact, also in fp32; the stochastic sum is fp32's, as the module's
    r = np.round(r) if noise is None else np.floor(r.astype(np.float32) + noise.numpy()).astype(np.float64)
    out = np.where(finite, np.minimum(r * q, fmt.max_value), np.abs(v))
    return torch.from_numpy(np.copysign(out, v).astype(np.float32))


@pytest.mark.parametrize("name", ["fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "fp16", "bf16"])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_float_grid_every_exponent_field_matches_float64_reference(name, rounding):
    # the quantum is taken from the exponent bits (bf16's subnormal quanta through frexp): compared with
    # the rule computed in float64 over all 256 exponent fields, signs, zeros, subnormals, inf and NaN
    fmt = lowprec.format(name, scale="none") if name.startswith("fp8") else lowprec.format(name)
    x = _every_exponent()
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(1)) if rounding == "stochastic" else None
    out = round_float_grid(x, fmt, rounding, noise=noise)
    ref = _grid_reference(x, fmt, noise)
    nan = torch.isnan(x)
    assert torch.isnan(out[nan]).all()
    assert torch.equal(bits(out[~nan]), bits(ref[~nan]))
    if rounding == "nearest" and name != "bf16":  # and the formats' own casts (ml_dtypes for E2M1)
        fin = torch.isfinite(x)
        if name == "fp4_e2m1":
            cast = ml_e2m1(x[fin])
        else:
            dt = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2, "fp16": torch.float16}[name]
            cast = x[fin].clamp(-fmt.max_value, fmt.max_value).to(dt).float()
        assert torch.equal(bits(out[fin]), bits(cast))


# ---- FP4 E2M1: exhaustive against ml_dtypes ----------------------------------------------
def ml_e2m1(x: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(x.cpu().numpy().astype(np.float32).astype(ml_dtypes.float4_e2m1fn).astype(np.float32))


def test_fp4_all_16_codes_decode_and_round_trip():
    codes = torch.arange(16, dtype=torch.uint8)
    ref = torch.from_numpy(codes.numpy().view(ml_dtypes.float4_e2m1fn).astype(np.float32))
    assert torch.equal(bits(e2m1_decode(codes)), bits(ref))
    assert torch.equal(e2m1_encode(ref), codes)
    fmt = lowprec.format("fp4_e2m1")
    for rounded in (round_to_grid(ref, fmt, "nearest"), round_float_grid(ref, fmt, "nearest")):
        assert torch.equal(bits(rounded), bits(ref))


def test_fp4_every_midpoint_rounds_to_even_as_ml_dtypes():
    mags = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    mid = (mags[:-1] + mags[1:]) / 2
    x = torch.cat([mid, -mid])
    out = round_to_grid(x, lowprec.format("fp4_e2m1"), "nearest")
    assert torch.equal(bits(out), bits(ml_e2m1(x)))
    assert torch.all(e2m1_encode(out) % 2 == 0)


@pytest.mark.parametrize("shape", [(5,), (8, 9), (2, 3, 31)])
@pytest.mark.parametrize("magnitude", [1e-3, 1.0, 1e5])
def test_fp4_random_tensors_match_ml_dtypes(shape, magnitude, device):
    g = torch.Generator().manual_seed(len(shape) * 7 + int(math.log10(magnitude) + 5))
    x = (torch.randn(shape, generator=g) * magnitude).to(device)
    fmt = lowprec.format("fp4_e2m1", scale="absmax")
    q = lowprec.quantize(x, fmt)
    s = (x.abs().max() / torch.tensor(6.0, device=device)).cpu()
    assert torch.equal(bits(q.dequantize().cpu()), bits(ml_e2m1(x.cpu() / s) * s))
    # out-of-range and random unscaled values: generic rounding vs ml_dtypes, saturating at 6
    y = torch.randn(50_000, generator=g) * 4
    assert torch.equal(bits(round_float_grid(y, fmt, "nearest")), bits(ml_e2m1(y)))


# ---- block formats against per-block loops -----------------------------------------------
def ref_mx(x: torch.Tensor, elem: str) -> torch.Tensor:
    """OCP MX v1.0 written out block by block: X = 2^(floor(log2 amax) - emax_elem)."""
    emax = {"e4m3": 8, "e2m1": 2}[elem]
    out = torch.empty_like(x)
    rows = x.reshape(-1, x.shape[-1])
    res = out.view(-1, x.shape[-1])
    for r in range(rows.shape[0]):
        for b0 in range(0, rows.shape[1], 32):
            blk = rows[r, b0:b0 + 32]
            amax = float(blk.abs().max())
            e = max(math.floor(math.log2(amax)) - emax, -127) if amax > 0 else -127
            X = 2.0 ** e
            v = blk / X
            if elem == "e4m3":
                q = v.clamp(-448, 448).to(torch.float8_e4m3fn).float()
            else:
                q = ml_e2m1(v)
            res[r, b0:b0 + 32] = q * X
    return out


def ref_nvfp4(x: torch.Tensor) -> torch.Tensor:
    """NVFP4 two-level scaling block by block: fp32 tensor scale amax/(448*6), E4M3 block scale
    amax_block/6/tensor_scale, E2M1 elements."""
    gs = float(x.abs().max()) / (448 * 6) or 1.0
    gs = torch.tensor(gs, dtype=torch.float32)
    out = torch.empty_like(x)
    rows = x.reshape(-1, x.shape[-1])
    res = out.view(-1, x.shape[-1])
    for r in range(rows.shape[0]):
        for b0 in range(0, rows.shape[1], 16):
            blk = rows[r, b0:b0 + 16]
            sb = (blk.abs().max() / 6 / gs).clamp(max=448).to(torch.float8_e4m3fn).float()
            s = sb * gs
            res[r, b0:b0 + 16] = ml_e2m1(blk / s) * s if s > 0 else 0.0
    return out


@pytest.mark.parametrize("shape", [(4, 64), (3, 100), (2, 2, 33)])
@pytest.mark.parametrize("magnitude", [1e-4, 1.0, 1e4])
def test_mx_and_nvfp4_match_per_block_reference(shape, magnitude, device):
    g = torch.Generator().manual_seed(sum(shape) + int(math.log10(magnitude)))
    x = torch.randn(shape, generator=g) * magnitude
    x.view(-1)[::37] *= 50  # outliers inside some blocks
    last = shape[-1]
    for name, ref in (("mxfp8", lambda t: ref_mx(t, "e4m3")), ("mxfp4", lambda t: ref_mx(t, "e2m1")), ("nvfp4", ref_nvfp4)):
        blk = lowprec.format(name).block
        xp = torch.nn.functional.pad(x, (0, (-last) % blk))
        expected = ref(xp)[..., :last]
        got = lowprec.quantize(x.to(device), name).dequantize().cpu()
        assert torch.equal(bits(got), bits(expected)), name


def test_mx_scale_is_e8m0_and_power_of_two():
    x = torch.randn(8, 64) * 1000
    q = lowprec.quantize(x, "mxfp8")
    assert q.scale.dtype == torch.uint8 and q.scale.shape == (8, 2)
    blocks = x.reshape(8, 2, 32).abs().amax(-1)
    expected = torch.floor(torch.log2(blocks)) - 8 + 127
    assert torch.equal(q.scale.long(), expected.long())


def test_nvfp4_scales_are_e4m3_blocks_and_fp32_tensor_scale():
    x = torch.randn(4, 48)
    q = lowprec.quantize(x, "nvfp4")
    assert q.scale.dtype == torch.float8_e4m3fn and q.scale.shape == (4, 3)
    assert q.global_scale.dtype == torch.float32
    assert torch.equal(q.global_scale, x.abs().max() / 2688)  # the same fp32 division, exactly


# ---- int8, ternary, binary ----------------------------------------------------------------
def test_int8_absmax_per_tensor_and_per_row():
    x = torch.randn(6, 40) * 3
    q = lowprec.quantize(x, "int8")
    s = x.abs().max() / 127
    assert torch.equal(q.data, torch.round(x / s).to(torch.int8))
    qr = lowprec.quantize(x, lowprec.format("int8", granularity="row"))
    sr = x.abs().amax(1, keepdim=True) / 127
    assert torch.equal(qr.data, torch.round(x / sr).to(torch.int8))
    assert qr.scale.shape == (6,)
    assert torch.equal(qr.data.abs().amax(1), torch.full((6,), 127, dtype=torch.int8))


def test_ternary_is_bitnet_absmean():
    x = torch.randn(16, 64)
    q = lowprec.quantize(x, "ternary")
    s = x.abs().mean().clamp(min=1e-5)
    expected = torch.round(x / s).clamp(-1, 1)
    assert torch.equal(q.values().reshape(16, 64), expected)
    assert torch.equal(q.dequantize(), expected * s)
    assert set(q.dequantize().unique().tolist()) <= {-float(s), 0.0, float(s)}
    zeros = lowprec.quantize(torch.zeros(4, 4), "ternary")
    assert zeros.scale == torch.tensor(1e-5) and torch.equal(zeros.dequantize(), torch.zeros(4, 4))


def test_binary_is_sign_with_mean_abs_and_zero_maps_to_plus_one():
    x = torch.tensor([[-2.0, -0.0, 0.0, 0.5, 3.0, -1.0]])
    q = lowprec.quantize(x, "binary")
    s = x.abs().mean()
    assert torch.equal(q.dequantize(), torch.tensor([[-1.0, 1, 1, 1, 1, -1]]) * s)
