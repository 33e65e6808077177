"""A Triton GEMV for packed ternary weights (optional: the CPU build of torch has no Triton).

``ternary_gemv``: ``y = s * x @ T^T`` for a native ternary weight ``T`` (N, K) stored as 2-bit
codes (4 per byte, code = value + 1, little-end first: byte ``(n, k // 4)`` holds ``T[n, k]`` in
bits ``2 (k % 4)``) and a per-tensor scale ``s``. It reads the packed bytes directly, so a
small-batch GEMV (an LSTM's recurrent step) moves 2 bits per weight instead of 8 or 16: the step
is memory-bound there. Codes are exact in bf16; ``x`` is rounded to bf16 (as the bf16 tensor-core
fallback does) and products accumulate in fp32. Used in fprop for at most ``GEMV_MAX_ROWS``
tokens on CUDA when Triton is importable (the ``packed_ternary_gemv`` kernel of
:mod:`lowprec.kernels`). Block sizes are autotuned per (M, N, K) on first use.
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

    _CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K4": bk}, num_warps=w, num_stages=st)
        for bn, bk, w, st in [(64, 64, 4, 3), (128, 32, 4, 3), (32, 128, 4, 3), (64, 128, 8, 3),
                              (128, 64, 8, 4), (256, 32, 8, 3), (32, 64, 2, 4)]
    ]

    @triton.autotune(configs=_CONFIGS, key=["M", "N", "K4"])
    @triton.jit
    def _ternary_gemv_kernel(x_ptr, w_ptr, y_ptr, M, N, K4, stride_xm, stride_ym,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K4: tl.constexpr):
        pid = tl.program_id(0)
        rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        rm = tl.arange(0, BLOCK_M)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K4, BLOCK_K4):
            rk = k0 + tl.arange(0, BLOCK_K4)
            w_mask = (rn[:, None] < N) & (rk[None, :] < K4)
            wb = tl.load(w_ptr + rn[:, None] * K4 + rk[None, :], mask=w_mask, other=0x55)  # 0x55: four zeros
            for lane in tl.static_range(4):
                code = (((wb >> (2 * lane)) & 3).to(tl.float32) - 1.0).to(tl.bfloat16)
                x_mask = (rm[:, None] < M) & (rk[None, :] < K4)
                xk = tl.load(x_ptr + rm[:, None] * stride_xm + (rk * 4 + lane)[None, :], mask=x_mask, other=0.0)
                acc += tl.dot(xk.to(tl.bfloat16), tl.trans(code))
        y_mask = (rm[:, None] < M) & (rn[None, :] < N)
        tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc, mask=y_mask)


def ternary_gemv(x: torch.Tensor, w_data: torch.Tensor, w_scale: torch.Tensor, out_features: int) -> torch.Tensor:
    """fp32 ``(M, N)`` = ``x (M, K) @ (w_scale * T)^T`` for 2-bit codes ``w_data`` of ``T (N, K)``."""
    M, K = x.shape
    N = out_features
    w = w_data.view(N, K // 4)
    x = x.to(torch.bfloat16).contiguous()
    y = torch.empty(M, N, device=x.device, dtype=torch.float32)
    block_m = max(16, triton.next_power_of_2(M))
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _ternary_gemv_kernel[grid](x, w, y, M, N, K // 4, x.stride(0), y.stride(0), BLOCK_M=block_m)
    return y * w_scale.to(torch.float32)
