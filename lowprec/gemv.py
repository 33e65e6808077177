"""A Triton GEMV for packed ternary weights (optional: the CPU build of torch has no Triton).

``ternary_gemv``: ``y = s * x @ T^T`` for a native ternary weight ``T`` (N, K) stored as 2-bit
codes (4 per byte, code = value + 1, little-end first: byte ``(n, k // 4)`` holds ``T[n, k]`` in
bits ``2 (k % 4)``) and a per-tensor scale ``s``. It reads the packed bytes directly, so a
small-batch GEMV (an LSTM's recurrent step) moves 2 bits per weight instead of 8 or 16: the step
is memory-bound there. Codes are exact in bf16; ``x`` is rounded to bf16 (as the bf16 tensor-core
fallback does) and products accumulate in fp32. Used in fprop for at most ``GEMV_MAX_ROWS``
tokens on CUDA when Triton is importable (the ``packed_ternary_gemv`` kernel of
:mod:`lowprec.kernels`): a compiled graph calls it through the operator ``lowprec::ternary_gemv``
(``packed_gemv``), which ``torch.compile`` keeps as one opaque call; eager code calls the function.
Block sizes and the way of computing (``MODE``: tensor-core dots per code lane, one dot over codes
put back in k order, or, for one row of x, fp32 multiply-adds without tensor cores, with each code's
value made by an int->float conversion or from its bits; for the word modes also the number of parts
the K range is split into, each a program of its own, their sums then added in a fixed order:
deterministic) are autotuned per (M, N, K) on first use (each configuration timed over calls issued back
to back, as a recurrence issues them: ``_back_to_back``).

A code's value from its bits (MODES 3 to 5): with the code ``c`` left in place at bit ``2l`` of its
byte (or 16-bit half word), the fp32 number with bits ``0x4B000000 | (c << 2l)`` is ``2^23 + c 4^l``
exactly, so ``(c - 1) 4^l`` is one subtraction of the constant ``2^23 + 4^l``, exact; multiplied by
``x_k 4^-l`` (exact: a bf16 number scaled by a power of 2 down to ``2^-14`` stays an fp32 number,
normal or subnormal) the product is ``x_k (c - 1)`` exactly, as with a converted code. A code takes
one logic operation, one add and one fused multiply-add, no conversion: compiled for sm_90 the loop
of the word modes spends about 3.9 instructions a code (x's loads and scaling shared by the rows a
thread holds), MODE 2's about 7.9.

MODE 6 (any number of rows, GPUs with bf16 tensor cores) decodes on the way to the tensor cores: the
codes, read as 16-bit halves of 8 codes each, are taken two halves (one 32-bit register) at a time, so
that code ``l`` of both halves becomes one pair of bf16 values in one register: ``0x43004300 | (c << 2p)``
(after a shift by ``6 (l // 3)``, ``p = l % 3``) is ``128 + c 4^p`` in each half, and one fused
multiply-add of the pair by ``4^-p`` and ``-(128 4^-p + 1)`` gives ``c - 1`` exactly: one logic operation
and one bf16x2 multiply-add for two codes (and two shifts a register for its eight lanes), in inline PTX. Each code lane is
one dot of a (rows, halves) tile with the matching entries of x, which the caller permutes once to
``x[m, 8 p + l]`` at ``(l, m, p)``; the dots accumulate in fp32, and splitting the K range as above makes
more programs. Codes past the ends of a tile are left as loaded, not replaced by a fill value: any 16
bits decode to finite values, which meet x's zeros past the K range or fill rows past N that are not
stored; a fill value is selected in another register layout than the dots' and then moved (compiled for
sm_90: more instructions in the loop, more registers). Where a configuration's tiles cover
the shape exactly (``_tc_even``) the loads take no masks at all. With
``TENSOR_CORE_DECODE`` (on by default), where it applies, the autotuned call times MODE 6's pick against
the other modes' on each shape's first call and keeps the faster.
"""

from __future__ import annotations

import torch

GEMV_MAX_ROWS = 64


def lane_ptx(lane: int) -> str:
    """MODE 6's PTX that makes code ``lane`` (0 to 7) of both 16-bit halves of a 32-bit register one pair of
    bf16 values ``c - 1`` (module doc): a shift, one ``lop3`` (``(t & mask) | 0x43004300``), one bf16x2 fused
    multiply-add by ``4^-p`` and ``-(128 4^-p + 1)``."""
    shift, p = 6 * (lane // 3), lane % 3
    move = f"shr.b32 t, $1, {shift}" if shift else "mov.b32 t, $1"
    scale = {0: 0x3F80, 1: 0x3E80, 2: 0x3D80}[p] * 0x10001  # 4^-p in both halves
    offset = {0: 0xC301, 1: 0xC204, 2: 0xC110}[p] * 0x10001  # -(128 4^-p + 1) in both halves
    return (f"{{ .reg .b32 t, s, n; {move}; lop3.b32 t, t, {0x30003 << 2 * p:#x}, 0x43004300, 0xEA; "
            f"mov.b32 s, {scale:#x}; mov.b32 n, {offset:#x}; fma.rn.bf16x2 $0, t, s, n; }}")


try:  # Triton ships with CUDA builds of torch; the CPU build runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


if triton is not None:

    # MODE 0: each of a byte's four codes in its own dot (x read at stride 4); MODE 1: the four codes
    # interleaved back into k order, then one dot over the whole chunk (x read contiguously); MODE 2
    # (one row of x only): no tensor cores, each code times its x element summed in fp32 registers; MODES
    # 3 to 5 (one row): as MODE 2 with each code's value made from its bits (module doc), reading bytes
    # (3) or 4-byte words (4; 5 also loads the next words before working on these). The autotuner times
    # the modes on the device and keeps the fastest per (M, N, K).
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K4": bk, "MODE": mode, "SPLIT": split}, num_warps=w, num_stages=st)
        for mode, bn, bk, w, st, *more in [
            (0, 64, 64, 4, 3), (0, 128, 32, 4, 3), (0, 32, 128, 4, 3), (0, 64, 128, 8, 3),
            (0, 128, 64, 8, 4), (0, 256, 32, 8, 3), (0, 32, 64, 2, 4),
            (1, 64, 32, 4, 3), (1, 128, 32, 4, 3), (1, 64, 64, 4, 3), (1, 128, 64, 8, 3),
            (1, 256, 32, 8, 3), (1, 32, 64, 4, 4), (1, 256, 64, 8, 3),
            (2, 16, 128, 4, 3), (2, 32, 128, 4, 3), (2, 16, 256, 4, 3), (2, 32, 64, 4, 4),
            (2, 64, 64, 8, 3), (2, 8, 256, 2, 3),
            # MODES 3 to 5: many rows a thread, so that each x element loaded serves several rows
            (3, 128, 16, 1, 3), (3, 64, 32, 1, 3), (3, 256, 16, 2, 3), (3, 512, 16, 4, 3),
            # MODES 4 and 5: BLOCK_K4 counts 4-byte words
            (4, 64, 16, 1, 3), (4, 128, 8, 1, 3), (4, 64, 8, 1, 3), (4, 128, 16, 2, 3), (4, 256, 8, 2, 3),
            (4, 256, 16, 4, 3), (4, 512, 8, 4, 3), (4, 1024, 4, 8, 3),
            (5, 64, 16, 1, 1), (5, 128, 8, 1, 1), (5, 64, 8, 1, 1), (5, 128, 16, 2, 1), (5, 256, 8, 2, 1),
            (5, 256, 16, 4, 1), (5, 512, 8, 4, 1), (5, 32, 8, 1, 1),
            # SPLIT: the K range in that many parts, each its own program (more programs to hide the loads'
            # latency), their sums added afterwards in a fixed order
            (5, 256, 8, 2, 1, 2), (5, 256, 8, 2, 1, 4), (5, 256, 16, 4, 1, 4), (5, 128, 8, 1, 1, 4),
            (5, 512, 8, 4, 1, 4), (5, 256, 8, 2, 1, 8), (4, 256, 8, 2, 3, 4)]
        for split in [more[0] if more else 1]
    ]
    MAX_SPLIT = max(c.kwargs["SPLIT"] for c in _CONFIGS)
    ONE_ROW_MODES = (2, 3, 4, 5)  # the modes that take one row of x only
    WORD_MODES = (4, 5)  # the modes that read the codes as 4-byte words: K // 4 bytes a row, a multiple of 4
    # (only they split the K range: SPLIT > 1)

    def _fits(kwargs, m, k4) -> str | None:
        """Why a configuration cannot run ``m`` rows of x over ``k4`` packed bytes a row, or None."""
        if kwargs["MODE"] in ONE_ROW_MODES and m != 1:
            return f"MODE {kwargs['MODE']} takes one row of x; got {m}"
        if kwargs["SPLIT"] > 1 and kwargs["MODE"] not in WORD_MODES:
            return f"MODE {kwargs['MODE']} does not split the K range (SPLIT {kwargs['SPLIT']})"
        if kwargs["MODE"] in WORD_MODES and k4 % 4:
            return f"MODE {kwargs['MODE']} reads 4-byte words: K // 4 = {k4} packed bytes a row is no multiple of 4"
        return None

    def _for_rows(configs, named_args, **kwargs):
        """The configurations that can run ``M`` rows of x over ``K4`` bytes a row."""
        return [c for c in configs if _fits(c.kwargs, named_args["M"], named_args["K4"]) is None]

    @triton.jit
    def _lane_from_bits(part, bits, magic, x_ptr, xk_index, x_mask, LANE: tl.constexpr):
        """``part + x_k (c - 1)`` for the code ``c`` at bits ``2 LANE`` of ``bits`` (int32: codes in
        the low 16 bits, ``magic`` = 0x4B000000 OR-ed in), its value made from its bits (module doc)."""
        xk = tl.load(x_ptr + xk_index, mask=x_mask, other=0.0).to(tl.float32) * (1.0 / (1 << (2 * LANE)))
        f = (bits & (magic | (3 << (2 * LANE)))).to(tl.float32, bitcast=True)
        return part + (f - (8388608.0 + (1 << (2 * LANE)))) * xk[None, :]

    @triton.jit
    def _ternary_gemv_body(x_ptr, w_ptr, y_ptr, M, N, K4, stride_xm, stride_ym, magic,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr,
                           MODE: tl.constexpr, SPLIT: tl.constexpr = 1, DOT_F32: tl.constexpr = False):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        if MODE == 2:  # x has one row: y[n] = sum over k of x[k] T[n, k], in fp32
            part = tl.zeros((BLOCK_N, BLOCK_K4), dtype=tl.float32)
            for k0 in range(0, K4, BLOCK_K4):
                rk = k0 + tl.arange(0, BLOCK_K4)
                w_mask = (rn[:, None] < N) & (rk[None, :] < K4)
                wb = tl.load(w_ptr + rn[:, None] * K4 + rk[None, :], mask=w_mask, other=0x55).to(tl.int32)
                for lane in tl.static_range(4):
                    xk = tl.load(x_ptr + rk * 4 + lane, mask=rk < K4, other=0.0).to(tl.float32)
                    code = ((wb >> (2 * lane)) & 3).to(tl.float32) - 1.0
                    part += code * xk[None, :]
            tl.store(y_ptr + rn, tl.sum(part, axis=1), mask=rn < N)
            return
        if MODE == 3:  # as MODE 2, each code's value made from its bits
            part = tl.zeros((BLOCK_N, BLOCK_K4), dtype=tl.float32)
            for k0 in range(0, K4, BLOCK_K4):
                rk = k0 + tl.arange(0, BLOCK_K4)
                w_mask = (rn[:, None] < N) & (rk[None, :] < K4)
                wb = tl.load(w_ptr + rn[:, None] * K4 + rk[None, :], mask=w_mask, other=0x55).to(tl.int32) | magic
                for lane in tl.static_range(4):
                    part = _lane_from_bits(part, wb, magic, x_ptr, rk * 4 + lane, rk < K4, lane)
            tl.store(y_ptr + rn, tl.sum(part, axis=1), mask=rn < N)
            return
        if MODE >= 4:  # as MODE 3 on 4-byte words (16 codes), one 16-bit half at a time; MODE 5 loads the
            # next words before working on these (their memory latency hidden behind this chunk's arithmetic).
            # Program (pid, s) sums the words [k_lo, k_hi) of its rows into row s of y (SPLIT rows).
            K16 = K4 // 4
            span = tl.cdiv(tl.cdiv(K16, SPLIT), BLOCK_K4) * BLOCK_K4
            k_lo = tl.program_id(1) * span
            k_hi = tl.minimum(k_lo + span, K16)
            wp = w_ptr.to(tl.pointer_type(tl.int32)) + rn[:, None] * K16
            part = tl.zeros((BLOCK_N, BLOCK_K4), dtype=tl.float32)
            rk = k_lo + tl.arange(0, BLOCK_K4)
            wv = tl.load(wp + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < k_hi), other=0x55555555)
            for k0 in range(k_lo, k_hi, BLOCK_K4):
                rk = k0 + tl.arange(0, BLOCK_K4)
                if MODE == 5:
                    rk_next = rk + BLOCK_K4
                    w_next = tl.load(wp + rk_next[None, :], mask=(rn[:, None] < N) & (rk_next[None, :] < k_hi),
                                     other=0x55555555)
                elif k0 > k_lo:
                    wv = tl.load(wp + rk[None, :], mask=(rn[:, None] < N) & (rk[None, :] < k_hi), other=0x55555555)
                for half in tl.static_range(2):
                    bits = ((wv >> (16 * half)) & 0xFFFF) | magic
                    for lane in tl.static_range(8):
                        part = _lane_from_bits(part, bits, magic, x_ptr, rk * 16 + 8 * half + lane, rk < k_hi, lane)
                if MODE == 5:
                    wv = w_next
            tl.store(y_ptr + tl.program_id(1) * stride_ym + rn, tl.sum(part, axis=1), mask=rn < N)
            return
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        dt = tl.float32 if DOT_F32 else tl.bfloat16  # the dot's operand type (codes and bf16 x are exact in both)
        for k0 in range(0, K4, BLOCK_K4):
            rk = k0 + tl.arange(0, BLOCK_K4)
            w_mask = (rn[:, None] < N) & (rk[None, :] < K4)
            wb = tl.load(w_ptr + rn[:, None] * K4 + rk[None, :], mask=w_mask, other=0x55)  # 0x55: four zeros
            if MODE == 0:
                for lane in tl.static_range(4):
                    code = (((wb >> (2 * lane)) & 3).to(tl.float32) - 1.0).to(dt)
                    x_mask = (rm[:, None] < M) & (rk[None, :] < K4)
                    xk = tl.load(x_ptr + rm[:, None] * stride_xm + (rk * 4 + lane)[None, :], mask=x_mask, other=0.0)
                    acc += tl.dot(xk.to(dt), tl.trans(code))
            else:
                c0 = (((wb >> 0) & 3).to(tl.float32) - 1.0).to(dt)
                c1 = (((wb >> 2) & 3).to(tl.float32) - 1.0).to(dt)
                c2 = (((wb >> 4) & 3).to(tl.float32) - 1.0).to(dt)
                c3 = (((wb >> 6) & 3).to(tl.float32) - 1.0).to(dt)
                # [..., i, o] = (c0, c2)[i] if o == 0 else (c1, c3)[i]: flattened, c0 c1 c2 c3 per byte
                codes = tl.reshape(tl.join(tl.join(c0, c2), tl.join(c1, c3)), (BLOCK_N, 4 * BLOCK_K4))
                rk1 = k0 * 4 + tl.arange(0, 4 * BLOCK_K4)
                x_mask = (rm[:, None] < M) & (rk1[None, :] < K4 * 4)
                xk = tl.load(x_ptr + rm[:, None] * stride_xm + rk1[None, :], mask=x_mask, other=0.0)
                acc += tl.dot(xk.to(dt), tl.trans(codes))
        y_mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=y_mask)

    def _back_to_back(kernel_call, quantiles=None, calls: int = 10, repeats: int = 7):
        """ms a call of ``kernel_call`` (the autotuners' timing): ``calls`` calls issued back to back between
        two events, ``repeats`` times, after one call; the median (or the ``quantiles`` of the repeats). No
        cache flush between calls, unlike Triton's default timing: a recurrent step reads its weight afresh
        at every call (far larger than L2 at the widths where the choice matters), with no other large
        reads in between, and flushing the cache writes back as much again while the kernel runs."""
        kernel_call()
        times = []
        for _ in range(repeats):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            for _ in range(calls):
                kernel_call()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / calls)
        times.sort()
        if quantiles is None:
            return times[len(times) // 2]
        return [times[min(len(times) - 1, int(q * len(times)))] for q in quantiles]

    # y zeroed before each configuration's trial and before the run after them: a split configuration
    # writes more of its rows than the next one may
    _ternary_gemv_kernel = triton.autotune(configs=_CONFIGS, key=["M", "N", "K4"], reset_to_zero=["y_ptr"],
                                           prune_configs_by={"early_config_prune": _for_rows},
                                           do_bench=_back_to_back)(_ternary_gemv_body)

    # MODE 6: (BLOCK_N rows, BLOCK_H halves a row a step, SPLIT parts of the K range), the first nine the
    # fastest timed on an H200 at 65,536 x 16,384 for one row of x (within 5% of each other); the split
    # ones make programs enough for shapes with few rows, the last ones hold the least shared memory (many
    # rows of x, smaller GPUs)
    _TC_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_H": bh, "MODE": 6, "SPLIT": split}, num_warps=w, num_stages=st)
        for bn, bh, w, st, split in [
            (256, 32, 4, 3, 1), (64, 32, 1, 3, 1), (128, 32, 2, 3, 1), (64, 64, 4, 3, 1), (64, 64, 2, 3, 1),
            (128, 64, 2, 2, 1), (128, 32, 2, 4, 1), (64, 32, 2, 3, 1), (256, 32, 4, 4, 1),
            (128, 32, 2, 3, 4), (64, 64, 4, 3, 4), (64, 64, 4, 4, 2),
            (128, 32, 2, 2, 1), (64, 32, 2, 2, 1), (32, 64, 1, 2, 1)]
    ]
    MAX_TC_SPLIT = max(c.kwargs["SPLIT"] for c in _TC_CONFIGS)

    _LANE_ASM = tl.constexpr(tuple(lane_ptx(lane) for lane in range(8)))

    @triton.jit
    def _lane_values(wh, LANE: tl.constexpr):
        """bf16 ``c - 1`` for code ``LANE`` of each 16-bit half of ``wh`` (int16), two halves a register
        (module doc)."""
        asm: tl.constexpr = _LANE_ASM[LANE]
        return tl.inline_asm_elementwise(asm, "=r,r", [wh], dtype=tl.bfloat16, is_pure=True, pack=2)

    @triton.jit
    def _ternary_gemv_tc_body(xp_ptr, w_ptr, y_ptr, scale_ptr, M, N, KH, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_H: tl.constexpr, MODE: tl.constexpr, SPLIT: tl.constexpr,
                              SCALE: tl.constexpr, EVEN: tl.constexpr):
        # y[s, m, n] = the part s of sum over k of x[m, k] T[n, k], times the scale where SCALE (y has one part;
        # the caller scales the sum of the parts otherwise): w as int16 halves (KH a row), xp[l, m, p] =
        # x[m, 8 p + l]; the dot is the transposed one (codes as the first operand: the decoded registers
        # feed the tensor cores directly), x's rows padded to BLOCK_M with zeros
        rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        span = tl.cdiv(tl.cdiv(KH, SPLIT), BLOCK_H) * BLOCK_H
        h_lo = tl.program_id(1) * span
        h_hi = tl.minimum(h_lo + span, KH)
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for h0 in range(h_lo, h_hi, BLOCK_H):
            rh = h0 + tl.arange(0, BLOCK_H)
            # codes past the ends are left as they come (any 16 bits decode to finite values): a half past
            # the range meets x's zeros, a row past N is not stored; EVEN: no ends inside a tile, no masks
            if EVEN:
                wh = tl.load(w_ptr + rn[:, None] * KH + rh[None, :])
                x_mask = rm[None, :] < M
            else:
                wh = tl.load(w_ptr + rn[:, None] * KH + rh[None, :], mask=(rn[:, None] < N) & (rh[None, :] < h_hi))
                x_mask = (rm[None, :] < M) & (rh[:, None] < h_hi)
            for lane in tl.static_range(8):
                xl = tl.load(xp_ptr + (lane * M + rm[None, :]) * KH + rh[:, None], mask=x_mask, other=0.0)
                acc = tl.dot(_lane_values(wh, lane), xl, acc)
        if SCALE:
            acc = acc * tl.load(scale_ptr)
        tl.store(y_ptr + (tl.program_id(1) * M + rm[None, :]) * N + rn[:, None], acc,
                 mask=(rm[None, :] < M) & (rn[:, None] < N))

    def _tc_fits(config, block_m: int, device) -> str | None:
        """Why MODE 6's ``config`` cannot run with ``block_m`` rows of x on ``device``, or None: each stage
        of its loop holds a tile of codes and the eight lanes' tiles of x in shared memory."""
        kw = config.kwargs
        need = config.num_stages * 2 * (kw["BLOCK_N"] * kw["BLOCK_H"] + 8 * kw["BLOCK_H"] * block_m)
        have = torch.cuda.get_device_properties(device).shared_memory_per_block_optin
        return f"MODE 6 {kw} needs {need} bytes of shared memory, the device has {have}" if need > have else None

    def _tc_for_rows(configs, named_args, **kwargs):
        """MODE 6's configurations for ``M`` rows that fit the device's shared memory; the split ones for
        one row only (their partial sums, SPLIT x M x N, cost more to clear and add than they save for
        more rows)."""
        m, device = named_args["M"], named_args["xp_ptr"].device
        return [c for c in configs if (c.kwargs["SPLIT"] == 1 or m == 1)
                and _tc_fits(c, max(16, triton.next_power_of_2(m)), device) is None]

    def _tc_even(N: int, KH: int, kw) -> bool:
        """Whether MODE 6's tiles of ``kw`` cover N rows and each part of KH halves exactly (no masks)."""
        return N % kw["BLOCK_N"] == 0 and KH % (kw["SPLIT"] * kw["BLOCK_H"]) == 0

    _ternary_gemv_tc_kernel = triton.autotune(configs=_TC_CONFIGS, key=["M", "N", "KH"], reset_to_zero=["y_ptr"],
                                              prune_configs_by={"early_config_prune": _tc_for_rows},
                                              do_bench=_back_to_back)(
        triton.heuristics({"EVEN": lambda a: _tc_even(a["N"], a["KH"], a)})(_ternary_gemv_tc_body))


# the exponent bits of 2^23 (MODES 3 to 5), passed at run time: a register the compiler cannot fold
# into the per-code masks, so that each code takes one logic operation (AND with mask | magic)
_MAGIC = 0x4B000000


# True (the default): where MODE 6 applies (K a multiple of 8, a GPU with bf16 tensor cores: compute
# capability 8.0 or later), the autotuned call times it against the autotuner's pick among MODES 0 to 5 on
# the first call of each shape and keeps the faster; False: MODES 0 to 5 only
TENSOR_CORE_DECODE = True
# (M, N, K, device index) -> True where MODE 6 was the faster on the shape's first call
_DECODE_CHOICE: dict = {}
# (M, N, K, device index) -> the MODE 6 configuration the autotuner picked on the shape's first call
_TC_PICK: dict = {}


def tensor_core_decode_applies(x: torch.Tensor) -> bool:
    """Whether MODE 6 is among the autotuned ``ternary_gemv``'s choices for ``x``."""
    return (TENSOR_CORE_DECODE and triton is not None and x.is_cuda and x.shape[1] % 8 == 0
            and torch.cuda.get_device_capability(x.device) >= (8, 0))


def _choice_key(x: torch.Tensor, N: int) -> tuple:
    """``_DECODE_CHOICE``'s key of ``x`` (M, K) with ``N`` outputs."""
    return x.shape[0], N, x.shape[1], x.device.index


def decodes_on_tensor_cores(x: torch.Tensor, N: int) -> bool | None:
    """Whether the autotuned ``ternary_gemv`` of ``x`` with ``N`` outputs runs MODE 6; None before the
    shape's first call."""
    if not tensor_core_decode_applies(x):
        return False
    return _DECODE_CHOICE.get(_choice_key(x, N))


def ternary_gemv(x: torch.Tensor, w_data: torch.Tensor, w_scale: torch.Tensor, out_features: int,
                 config=None, dot_f32: bool = False) -> torch.Tensor:
    """fp32 ``(M, N)`` = ``x (M, K) @ (w_scale * T)^T`` for 2-bit codes ``w_data`` of ``T (N, K)``.
    ``config``: one of ``_CONFIGS`` or ``_TC_CONFIGS`` instead of the autotuned choice; ``dot_f32`` (with
    a configuration of ``_CONFIGS``): the dot on fp32 operands instead of bf16, the same values (the codes
    and the bf16-rounded x are exact in both), for Triton's interpreter (``TRITON_INTERPRET=1``), whose
    bf16 dot is wrong (MODE 6's inline PTX runs on a GPU only)."""
    M, K = x.shape
    N = out_features
    w = w_data.view(N, K // 4)
    # the word modes read 4-byte words: a view at an odd offset (rare) is copied; the offset, not
    # data_ptr(), which torch.compile cannot trace (storages start at allocator-aligned addresses)
    if (w.storage_offset() * w.element_size()) % 4:
        w = w.clone()
    if config is not None:  # one configuration, as given (tests run each)
        if config.kwargs["MODE"] == 6:
            return _tensor_core_gemv(x, w, w_scale, N, config)
        return _cuda_core_gemv(x, w, w_scale, N, config, dot_f32)
    if tensor_core_decode_applies(x):
        key = _choice_key(x, N)
        if key not in _DECODE_CHOICE:  # each path autotunes itself on its first call, then one is kept
            times = [_back_to_back(lambda: f(x, w, w_scale, N, None))
                     for f in (_tensor_core_gemv, _cuda_core_gemv)]
            _DECODE_CHOICE[key] = times[0] <= times[1]
        if _DECODE_CHOICE[key]:
            return _tensor_core_gemv(x, w, w_scale, N, None)
    return _cuda_core_gemv(x, w, w_scale, N, None)


def _cuda_core_gemv(x, w, w_scale, N, config, dot_f32=False):
    """MODES 0 to 5 (autotuned, or ``config``)."""
    M, K = x.shape
    x = x.to(torch.bfloat16).contiguous()
    # one row of x: the one-row modes write row s of y for the part s of a split K range (rows a
    # configuration does not split into stay 0), added in a fixed order below
    y = torch.zeros(MAX_SPLIT, N, device=x.device, dtype=torch.float32) if M == 1 else \
        torch.empty(M, N, device=x.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    if config is None:
        _ternary_gemv_kernel[grid](x, w, y, M, N, K // 4, x.stride(0), y.stride(0), _MAGIC, BLOCK_M=block_m)
    else:
        why = _fits(config.kwargs, M, K // 4)
        if why is not None:
            raise ValueError(why)
        _ternary_gemv_body[grid](x, w, y, M, N, K // 4, x.stride(0), y.stride(0), _MAGIC, BLOCK_M=block_m,
                                 **config.kwargs,
                                 DOT_F32=dot_f32, num_warps=config.num_warps, num_stages=config.num_stages)
    if M == 1:
        y = y.sum(0, keepdim=True)
    return y * w_scale.to(torch.float32)


def _tensor_core_gemv(x, w, w_scale, N, config):
    """MODE 6 (``config``, or the autotuner's pick for the shape): x permuted to ``(8, M, K // 8)`` (module
    doc), the partial sums of a split K range added in a fixed order. The autotuner runs on a shape's first
    call only; its pick (``tensor_core_config``) is then launched directly, with y allocated for its SPLIT
    (one part: scaled in the kernel, no zeroing, no sum)."""
    M, K = x.shape
    if K % 8:
        raise ValueError(f"MODE 6 reads 16-bit halves of 8 codes: K = {K} is no multiple of 8")
    if not x.is_cuda:
        raise ValueError("MODE 6 decodes the codes in inline PTX: it runs on a CUDA GPU only")
    xp = x.to(torch.bfloat16).reshape(M, K // 8, 8).permute(2, 0, 1).contiguous()
    block_m = max(16, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), meta["SPLIT"])  # noqa: E731
    scale = w_scale.to(torch.float32)
    key = _choice_key(x, N)
    config = config if config is not None else _TC_PICK.get(key)
    # the shape's first call autotunes, into parts for the largest split any pick may have (the autotuner
    # zeroes y before each trial)
    split = (MAX_TC_SPLIT if M == 1 else 1) if config is None else config.kwargs["SPLIT"]
    y = (torch.zeros if split > 1 else torch.empty)(split, M, N, device=x.device, dtype=torch.float32)
    if config is None:
        _ternary_gemv_tc_kernel[grid](xp, w.view(torch.int16), y, scale, M, N, K // 8, BLOCK_M=block_m,
                                      SCALE=split == 1)
        _TC_PICK[key] = _ternary_gemv_tc_kernel.best_config
    else:
        if (why := _tc_fits(config, block_m, x.device)) is not None:
            raise ValueError(why)
        _ternary_gemv_tc_body[grid](xp, w.view(torch.int16), y, scale, M, N, K // 8, BLOCK_M=block_m,
                                    SCALE=split == 1, EVEN=_tc_even(N, K // 8, config.kwargs), **config.all_kwargs())
    return y.sum(0) * scale if split > 1 else y[0]


def tensor_core_config(x: torch.Tensor, N: int):
    """The MODE 6 configuration the autotuned ``ternary_gemv`` of ``x`` with ``N`` outputs launches (its
    first call's pick), or None before it ran."""
    return _TC_PICK.get(_choice_key(x, N))


@torch.library.custom_op("lowprec::ternary_gemv", mutates_args=())
def packed_gemv(x: torch.Tensor, w_data: torch.Tensor, w_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """`ternary_gemv` (autotuned) as an operator: a compiled caller calls it as it is instead of
    tracing the Triton launch and its autotuner."""
    return ternary_gemv(x, w_data, w_scale, out_features)


@packed_gemv.register_fake
def _(x, w_data, w_scale, out_features):
    return x.new_empty((x.shape[0], out_features), dtype=torch.float32)
