"""A Triton GEMV for packed ternary weights (optional: the CPU build of torch has no Triton).

``ternary_gemv``: ``y = s * x @ T^T`` for a native ternary weight ``T`` (N, K) stored as 2-bit
codes (4 per byte, code = value + 1, little-end first: byte ``(n, k // 4)`` holds ``T[n, k]`` in
bits ``2 (k % 4)``) and a per-tensor scale ``s``. It reads the packed bytes directly, so a
small-batch GEMV (an LSTM's recurrent step) moves 2 bits per weight instead of 8 or 16: the step
is memory-bound there. Codes are exact in bf16; ``x`` is rounded to bf16 (as the bf16 tensor-core
fallback does) and products accumulate in fp32. Used in fprop for at most ``GEMV_MAX_ROWS``
tokens on CUDA when Triton is importable (the ``packed_ternary_gemv`` kernel of
:mod:`lowprec.kernels`). Block sizes and the way of computing (``MODE``: tensor-core dots per code
lane, one dot over codes put back in k order, or, for one row of x, fp32 multiply-adds without tensor
cores) are autotuned per (M, N, K) on first use.
"""

from __future__ import annotations

import torch

GEMV_MAX_ROWS = 64

try:  # Triton ships with CUDA builds of torch; the CPU build runs without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised on machines without triton
    triton = None


if triton is not None:

    # MODE 0: each of a byte's four codes in its own dot (x read at stride 4); MODE 1: the four codes
    # interleaved back into k order, then one dot over the whole chunk (x read contiguously); MODE 2
    # (one row of x only): no tensor cores, each code times its x element summed in fp32 registers. The
    # autotuner times the modes on the device and keeps the fastest per (M, N, K).
    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K4": bk, "MODE": mode}, num_warps=w, num_stages=st)
        for mode, bn, bk, w, st in [
            (0, 64, 64, 4, 3), (0, 128, 32, 4, 3), (0, 32, 128, 4, 3), (0, 64, 128, 8, 3),
            (0, 128, 64, 8, 4), (0, 256, 32, 8, 3), (0, 32, 64, 2, 4),
            (1, 64, 32, 4, 3), (1, 128, 32, 4, 3), (1, 64, 64, 4, 3), (1, 128, 64, 8, 3),
            (1, 256, 32, 8, 3), (1, 32, 64, 4, 4), (1, 256, 64, 8, 3),
            (2, 16, 128, 4, 3), (2, 32, 128, 4, 3), (2, 16, 256, 4, 3), (2, 32, 64, 4, 4),
            (2, 64, 64, 8, 3), (2, 8, 256, 2, 3)]
    ]

    def _for_rows(configs, named_args, **kwargs):
        """The configurations that can run ``M`` rows of x: MODE 2 only one."""
        return [c for c in configs if c.kwargs["MODE"] != 2 or named_args["M"] == 1]

    @triton.jit
    def _ternary_gemv_body(x_ptr, w_ptr, y_ptr, M, N, K4, stride_xm, stride_ym,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr,
                           MODE: tl.constexpr, DOT_F32: tl.constexpr = False):
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

    _ternary_gemv_kernel = triton.autotune(configs=_CONFIGS, key=["M", "N", "K4"],
                                           prune_configs_by={"early_config_prune": _for_rows})(_ternary_gemv_body)


def ternary_gemv(x: torch.Tensor, w_data: torch.Tensor, w_scale: torch.Tensor, out_features: int,
                 config=None, dot_f32: bool = False) -> torch.Tensor:
    """fp32 ``(M, N)`` = ``x (M, K) @ (w_scale * T)^T`` for 2-bit codes ``w_data`` of ``T (N, K)``.
    ``config``: one of ``_CONFIGS`` instead of the autotuned choice; ``dot_f32`` (with ``config``): the
    dot on fp32 operands instead of bf16, the same values (the codes and the bf16-rounded x are exact
    in both), for Triton's interpreter (``TRITON_INTERPRET=1``), whose bf16 dot is wrong."""
    M, K = x.shape
    N = out_features
    w = w_data.view(N, K // 4)
    x = x.to(torch.bfloat16).contiguous()
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    if config is None:
        _ternary_gemv_kernel[grid](x, w, y, M, N, K // 4, x.stride(0), y.stride(0), BLOCK_M=block_m)
    else:  # one configuration, as given (tests run each)
        if config.kwargs["MODE"] == 2 and M != 1:
            raise ValueError(f"MODE 2 takes one row of x; got {M}")
        _ternary_gemv_body[grid](x, w, y, M, N, K // 4, x.stride(0), y.stride(0), BLOCK_M=block_m, **config.kwargs,
                                 DOT_F32=dot_f32, num_warps=config.num_warps, num_stages=config.num_stages)
    return y * w_scale.to(torch.float32)
