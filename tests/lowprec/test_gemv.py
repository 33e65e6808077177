"""The packed-ternary GEMV (``lowprec.gemv``), every configuration the autotuner may pick, against an
exact reference: on a GPU (the real kernels, bf16 dot operands), and on a CPU through Triton's
interpreter (fp32 dot operands: its bf16 dot is wrong). Both skip where Triton is missing."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

N, K = 200, 512  # 200 rows: the last row block is partly masked; K // 4 = 128 packed bytes a row


def packed_case(seed: int = 0, n: int = N, k: int = K):
    """(T (n, k) in {-1, 0, 1}, its 2-bit codes (n, k // 4) uint8, little end first)."""
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-1, 2, (n, k), generator=g)
    c = (t + 1).to(torch.uint8).view(n, k // 4, 4)
    return t, (c[..., 0] | (c[..., 1] << 2) | (c[..., 2] << 4) | (c[..., 3] << 6)).contiguous()


def check_all_configs(device: str, dot_f32: bool) -> list[str]:
    """Every configuration on M = 1, 3, 17 rows (MODES 2 to 5: one row; more are refused; K split into up to 8
    parts, some of them empty: K // 16 = 32 words a row; MODE 6, which needs a GPU, only there); the failures.
    Tolerance: the products are exact (codes in {-1, 0, 1} times bf16 x; MODES 3 to 5 make each
    code's value from its bits and multiply x by a power of 2, both exact), so the only error is the fp32
    summation of K terms in some order: at most gamma_K * sum |x_k T_nk|, gamma_K = K u / (1 - K u),
    u = 2^-24 (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed., eq. 3.5)."""
    from lowprec import gemv

    t, packed = packed_case()
    t, packed = t.to(device), packed.to(device)
    u = 2.0 ** -24
    gamma = K * u / (1 - K * u)
    bad = []
    for m in (1, 3, 17):
        x = torch.randn(m, K, generator=torch.Generator().manual_seed(m)).to(device)
        xb = x.bfloat16().double()
        ref = xb @ t.double().t()
        bound = gamma * (xb.abs() @ t.double().abs().t())
        for cfg in gemv._CONFIGS + ([] if dot_f32 else gemv._TC_CONFIGS):
            if cfg.kwargs["MODE"] == 6:  # N = 200 rows: no MODE 6 tile covers them exactly (masked loads)
                assert not gemv._tc_even(N, K // 8, cfg.kwargs)
            if cfg.kwargs["MODE"] == 6 and gemv._tc_fits(cfg, max(16, gemv.triton.next_power_of_2(m)), x.device):
                with pytest.raises(ValueError, match="shared memory"):
                    gemv.ternary_gemv(x, packed, torch.tensor(1.0, device=device), N, config=cfg)
                continue
            if cfg.kwargs["MODE"] in gemv.ONE_ROW_MODES and m != 1:
                with pytest.raises(ValueError, match="one row"):
                    gemv.ternary_gemv(x, packed, torch.tensor(1.0, device=device), N, config=cfg, dot_f32=dot_f32)
                continue
            y = gemv.ternary_gemv(x, packed, torch.tensor(2.0, device=device), N, config=cfg, dot_f32=dot_f32)
            if not bool(((y.double() / 2 - ref).abs() <= bound).all()):  # the scale 2 multiplies exactly
                bad.append(f"M={m} {cfg}")
    # K = 24: 6 packed bytes a row, no whole number of 4-byte words: the word modes refuse it
    x = torch.randn(1, 24, generator=torch.Generator().manual_seed(1)).to(device)
    words = [c for c in gemv._CONFIGS if c.kwargs["MODE"] in gemv.WORD_MODES]
    assert words
    for cfg in words:
        with pytest.raises(ValueError, match="4-byte words"):
            gemv.ternary_gemv(x, packed[:, :6].contiguous(), torch.tensor(1.0, device=device), N, config=cfg,
                              dot_f32=dot_f32)
    # only the word modes split the K range (and the split ones are among the configurations checked above)
    assert any(c.kwargs["SPLIT"] > 1 for c in words)
    split_bytes = gemv.triton.Config({"BLOCK_N": 16, "BLOCK_K4": 16, "MODE": 3, "SPLIT": 2}, num_warps=1)
    with pytest.raises(ValueError, match="does not split"):
        gemv.ternary_gemv(x, packed[:, :6].contiguous(), torch.tensor(1.0, device=device), N, config=split_bytes,
                          dot_f32=dot_f32)
    return bad


@pytest.mark.gpu
def test_every_gemv_config_on_the_gpu(monkeypatch):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lowprec import gemv

    if gemv.triton is None:
        pytest.skip("needs triton")
    assert {c.kwargs["MODE"] for c in gemv._CONFIGS} == {0, 1, 2, 3, 4, 5}
    assert {c.kwargs["MODE"] for c in gemv._TC_CONFIGS} == {6} and any(c.kwargs["SPLIT"] > 1 for c in gemv._TC_CONFIGS)
    assert check_all_configs("cuda", dot_f32=False) == []
    # MODE 6 on a shape its tiles cover exactly (no masks: ``_tc_even``) for most configurations, on the rest
    # masked; and on one whose K range ends inside a tile of halves for every configuration (K // 8 = 40
    # halves a row: the codes past the end are left as loaded and meet x's zeros); the same bound (module
    # doc of check_all_configs)
    for n, k, evens, partial in ((256, 1024, {True, False}, False), (96, 320, {False}, True)):
        t, packed = (a.cuda() for a in packed_case(seed=7, n=n, k=k))
        gamma = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
        assert {gemv._tc_even(n, k // 8, c.kwargs) for c in gemv._TC_CONFIGS} == evens
        if partial:
            assert all((k // 8) % c.kwargs["BLOCK_H"] for c in gemv._TC_CONFIGS)
        for m in (1, 3):
            x = torch.randn(m, k, device="cuda")
            xb = x.bfloat16().double()
            bound = gamma * (xb.abs() @ t.double().abs().t())
            for cfg in gemv._TC_CONFIGS:
                if gemv._tc_fits(cfg, 16, x.device) is None:
                    y = gemv.ternary_gemv(x, packed, torch.tensor(2.0, device="cuda"), n, config=cfg)
                    assert bool(((y.double() / 2 - xb @ t.double().t()).abs() <= bound).all()), (n, k, m, cfg)
    # the autotuned kernels (MODE 6, and MODES 0 to 5 with it off): the call that times every configuration
    # (whose split ones leave partial sums in rows that a later one does not write) and the calls after it,
    # from the cached choice (MODE 6: its pick launched directly, scaled in the kernel where it does not
    # split); 1 row and 5; the scale 0.5 multiplies exactly, once
    assert gemv.TENSOR_CORE_DECODE  # the default
    t, packed = (a.cuda() for a in packed_case(seed=3))
    u = 2.0 ** -24
    for decode in (True, False):
        monkeypatch.setattr(gemv, "TENSOR_CORE_DECODE", decode)
        for m in (1, 5):
            x = torch.randn(m, K, device="cuda")
            assert gemv.tensor_core_decode_applies(x) == decode
            xb = x.bfloat16().double()
            bound = K * u / (1 - K * u) * (xb.abs() @ t.double().abs().t())
            for _ in range(3):
                y = gemv.ternary_gemv(x, packed, torch.tensor(0.5, device="cuda"), N)
                assert bool(((2 * y.double() - xb @ t.double().t()).abs() <= bound).all())
                assert gemv.decodes_on_tensor_cores(x, N) in ((True, False) if decode else (False,))
            if decode:  # MODE 6 ran (in the first call's timing at least) and kept its pick
                assert gemv.tensor_core_config(x, N) in gemv._TC_CONFIGS
    # a configuration too large for the device's shared memory at 64 rows is refused
    big = gemv.triton.Config({"BLOCK_N": 256, "BLOCK_H": 256, "MODE": 6, "SPLIT": 1}, num_warps=4, num_stages=4)
    with pytest.raises(ValueError, match="shared memory"):
        gemv.ternary_gemv(torch.randn(64, K, device="cuda"), packed, torch.tensor(1.0, device="cuda"), N, config=big)
    # MODE 6 reads halves of 8 codes: K = 12 (3 packed bytes a row) is refused, and the autotuned call
    # takes the other modes
    monkeypatch.setattr(gemv, "TENSOR_CORE_DECODE", True)
    x = torch.randn(1, 12, device="cuda")
    assert not gemv.tensor_core_decode_applies(x)
    with pytest.raises(ValueError, match="no multiple of 8"):
        gemv.ternary_gemv(x, packed[:, :3].contiguous(), torch.tensor(1.0, device="cuda"), N,
                          config=gemv._TC_CONFIGS[0])
    y = gemv.ternary_gemv(x, packed[:, :3].contiguous(), torch.tensor(1.0, device="cuda"), N)
    xb, t12 = x.bfloat16().double(), t[:, :12].double()
    assert bool(((y.double() - xb @ t12.t()).abs() <= 12 * u / (1 - 12 * u) * (xb.abs() @ t12.abs().t())).all())


def test_every_gemv_config_in_the_triton_interpreter():
    pytest.importorskip("triton")
    import numpy as np

    try:
        int(np.array([1]))
    except TypeError:
        pytest.skip(f"numpy {np.__version__} refuses int() of a 1-element array, which Triton's interpreter uses")
    code = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        from test_gemv import check_all_configs
        print("FAILED", check_all_configs("cpu", dot_f32=True))
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # read when the kernels are defined: a fresh process
    p = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                       env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "FAILED []"


def _bf16(bits: torch.Tensor) -> torch.Tensor:
    """float64 values of bf16 bit patterns (int64 in [0, 2^16))."""
    return bits.to(torch.int32).to(torch.int16).view(torch.bfloat16).double()


def test_mode6_ptx_decodes_every_half_exactly():
    """MODE 6's PTX (``lane_ptx``), read back and carried out op by op on the CPU for every 16-bit half in both
    halves of a register (PTX ISA: ``shr.b32`` logical, ``lop3`` with immLut 0xEA = (a & b) | c, ``fma.rn.bf16x2``
    per half, rounded once to bf16): code ``lane`` of each half, ``c``, comes out as ``c - 1``, exactly, for
    every lane. The GPU test checks the kernel's results; this one pins the constants with no GPU."""
    import re

    from lowprec import gemv

    lo = torch.arange(2 ** 16, dtype=torch.int64)
    hi = torch.randperm(2 ** 16, generator=torch.Generator().manual_seed(0))
    word = lo | (hi << 16)
    for lane in range(8):
        ptx = gemv.lane_ptx(lane)
        m = re.fullmatch(r"\{ \.reg \.b32 t, s, n; (?:shr\.b32 t, \$1, (\d+)|mov\.b32 t, \$1); "
                         r"lop3\.b32 t, t, (0x[0-9a-f]+), (0x[0-9a-f]+), 0xEA; mov\.b32 s, (0x[0-9a-f]+); "
                         r"mov\.b32 n, (0x[0-9a-f]+); fma\.rn\.bf16x2 \$0, t, s, n; \}", ptx)
        assert m, ptx
        shift = int(m.group(1) or 0)
        mask, magic, scale, offset = (int(g, 16) for g in m.groups()[1:])
        t = ((word >> shift) & mask) | magic
        for half, src in ((0, lo), (16, hi)):
            def part(v):
                return _bf16((v >> half) & 0xFFFF)
            # the products and sums here are small dyadic numbers: float64 holds them exactly, and the one
            # rounding to bf16 is fma's
            got = (part(t) * part(torch.tensor(scale)) + part(torch.tensor(offset))).to(torch.bfloat16).double()
            want = ((src >> (2 * lane)) & 3).double() - 1
            assert torch.equal(got, want), (lane, half)


def test_gemv_operator_shapes_its_output_without_running():
    """``lowprec::ternary_gemv``'s fake (what ``torch.compile`` traces instead of the Triton launch):
    fp32 ``(M, out_features)``, also for one row (the kernel's split rows summed to one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from lowprec import gemv

    with FakeTensorMode():
        for m in (1, 9):
            y = gemv.packed_gemv(torch.empty(m, K, dtype=torch.bfloat16), torch.empty(N, K // 4, dtype=torch.uint8),
                                 torch.empty(1), N)
            assert (tuple(y.shape), y.dtype) == ((m, N), torch.float32)


@pytest.mark.gpu
def test_gemv_operator_passes_opcheck_and_equals_the_kernel():
    """The operator's schema, fake and eager results (``torch.library.opcheck``), and its output is
    the kernel's, bit for bit (the same autotuned launch)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from lowprec import gemv

    if gemv.triton is None:
        pytest.skip("needs triton")
    packed = packed_case(seed=5)[1].cuda()
    for m in (1, 9):
        x = torch.randn(m, K, device="cuda")
        s = torch.tensor([0.5], device="cuda")
        torch.library.opcheck(gemv.packed_gemv, (x, packed, s, N), test_utils=("test_schema", "test_faketensor"))
        assert torch.equal(gemv.packed_gemv(x, packed, s, N), gemv.ternary_gemv(x, packed, s, N))
