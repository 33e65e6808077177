"""SRAdamW: AdamW whose weights and moments stay in low precision, written back with stochastic rounding.

For a target with weight ``w`` in its own storage (a native FP8 / FP4 / MX / NVFP4 / int8 / bf16
layer, or a bf16/fp16/fp32 ``Parameter``) and gradient ``g``, one step is torch's AdamW
(decoupled weight decay), computed in fp32 *transiently*::

    w32 = dequantize(w)                         m = decode(m_stored)   v = decode(v_stored)
    m   = beta1 m + (1 - beta1) g               v = beta2 v + (1 - beta2) g^2
    w32 = w32 (1 - lr wd) - lr / (1 - beta1^t) * m / (sqrt(v / (1 - beta2^t)) + eps)
    w   = quantize(w32, format(w), rounding="stochastic")                 the weight's own format
    m_stored, v_stored = encode(m), encode(v)                             see optim.moments

Stochastic rounding (SR) rounds ``x`` to one of its two grid neighbours with probabilities that make
``E[round(x)] = x``: an update much smaller than the grid step (``lr * 1 = 1e-3`` against an FP8
E4M3 step of ``2^-3 |w|``) is applied with the right probability instead of being lost, so over many
steps the weight follows the fp32 trajectory in expectation. For scaled formats the scale is
recomputed from ``w32`` (absmax / absmean of the new values) and the elements are rounded
stochastically on that grid. A fp32 Parameter is written exactly (no rounding).

Moments (``moment_dtype``): ``fp32`` (8 bytes/weight; with a fp32 Parameter this is torch.optim.AdamW
bit for bit), ``bf16`` (4 bytes, SR), or ``fp8`` (E4M3 with one fp32 absmax scale per
``moment_block`` consecutive elements, ``None`` = per row; the second moment is stored as
``sqrt(v)``, see :mod:`optim.moments`): ``2 + 8 / moment_block`` bytes per weight. Native FP8
weights (1 byte + a per-tensor scale) with fp8 moments and ``moment_block=128``: 3.0625 bytes.
"""

from __future__ import annotations

import torch
from torch import nn

import lowprec
from lowprec.common import check_real

from .base import (
    TargetOptimizer,
    check_betas,
    describe_target,
    is_native_layer,
    local,
    shard_coordinate,
)
from .moments import check_block, check_moment_dtype, load, store, store_zeros

_SR_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # Parameters written back with SR
PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SRAdamW(TargetOptimizer):
    """AdamW for weights in their own low-precision storage; math in the module doc.

    Args:
        params: native layers (any weight format), float Parameters (fp32 / bf16 / fp16), or
            param-group dicts of them.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (decoupled weight decay).
        moment_dtype: ``"fp32"``, ``"bf16"`` or ``"fp8"``.
        moment_block: consecutive elements per fp8 moment scale (None: one scale per row).
        seed: seeds the stochastic rounding (per target and step, see :mod:`optim.moments`).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, moment_dtype: str = "fp32", moment_block: int | None = 128,
                 seed: int = 0):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "moment_dtype": moment_dtype,
                    "moment_block": moment_block}
        super().__init__(params, defaults, seed)

    def _check_group(self, group: dict) -> None:
        check_real("lr", group["lr"], ">= 0", lambda v: v >= 0)
        group["betas"] = check_betas("betas", group["betas"])
        check_real("eps", group["eps"], "> 0", lambda v: v > 0)
        check_real("weight_decay", group["weight_decay"], ">= 0", lambda v: v >= 0)
        check_moment_dtype("moment_dtype", group["moment_dtype"])
        check_block(group["moment_block"])

    def _check_target(self, t) -> None:
        if isinstance(t, nn.Module):
            if not is_native_layer(t):
                raise TypeError(f"SRAdamW updates native layers (storage='native') and float Parameters; got "
                                f"{describe_target(t)}: pass a latent layer's weight Parameter instead")
            return
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"SRAdamW updates native layers and Parameters, not {type(t).__name__}")
        if t.dtype not in PARAM_DTYPES or not t.requires_grad:
            dtypes = ", ".join(map(str, PARAM_DTYPES))
            raise TypeError(f"SRAdamW updates float Parameters that require grad ({dtypes}); "
                            f"got {describe_target(t)} (requires_grad={t.requires_grad}). A native layer's packed "
                            "buffer is not a parameter: pass the layer itself")

    def _init_state(self, group: dict, target, st: dict) -> None:
        shape = self._shape_of(target)
        for key in ("exp_avg", "exp_avg_sq"):
            store_zeros(st, key, shape, group["moment_dtype"], self._device_of(target), block=group["moment_block"])

    def _update(self, group: dict, target, grad: torch.Tensor, index: int):
        native = isinstance(target, nn.Module)
        if native:
            fmt = target.precision.weight
            w = target.native_weight.dequantize(torch.float32)
        else:
            w = local(target).detach().float()  # a fp32 Parameter itself: read, not written, here
        grad = grad.to(torch.float32)
        st = self.state[target]
        dtype, block = group["moment_dtype"], group["moment_block"]
        b1, b2 = group["betas"]
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        m = load(st, "exp_avg", dtype, w.shape, block=block)
        v = load(st, "exp_avg_sq", dtype, w.shape, block=block, sqrt=True)
        # torch.optim.adam._single_tensor_adam's operations in its order, out of place; the bias
        # corrections from the device step counter in float64, as Python computes them
        t = st["step"].double()
        if wd != 0:
            w = w.mul(1 - lr * wd)
        m = m.lerp(grad, 1 - b1)
        v = v.mul(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (v.sqrt() / (1 - b2**t) ** 0.5).add_(eps)
        w = w + m.mul(-lr / (1 - b1**t)).div_(denom)  # addcdiv_(m, denom, value=-step_size) as the CPU computes it
        # the shards of one Parameter draw different noise (the index is per Parameter, not per shard)
        gen = self._noise(w.device, index + (shard_coordinate(target) << 32), st["calls"])
        if native:
            w = lowprec.quantize(w, fmt, rounding="stochastic", generator=gen)
        elif target.dtype != torch.float32:
            w = lowprec.quantize(w, _SR_DTYPES[target.dtype], rounding="stochastic", generator=gen).data.reshape(w.shape)
        store(st, "exp_avg", m, dtype, gen, block=block)
        store(st, "exp_avg_sq", v, dtype, gen, block=block, sqrt=True)
        return w

    # ---- checkpoints of sharded Parameters -------------------------------------------------------
    _MOMENTS = ("exp_avg", "exp_avg_sq")

    def dense_state(self, target, entry: dict, shape=None) -> dict:
        """``entry`` (a target's state, as ``state_dict`` holds it) with each fp8 moment (codes and
        block scales) replaced by its stored values as one fp32 tensor of the weight's ``shape``
        (default: this process's part of it), the square root kept for ``exp_avg_sq``: a form
        that splits and joins along any dimension, for checkpoints that a different number of
        ranks loads. ``load_state_dict`` takes it back exactly where the blocks fall on the same
        elements (and re-rounds to nearest where they do not)."""
        block = self._group_of[id(target)]["moment_block"]
        shape = self._shape_of(target) if shape is None else torch.Size(shape)
        out = dict(entry)
        for key in self._MOMENTS:
            if key + "_scale" in out:
                out[key] = load(out, key, "fp8", shape, block=block)
                del out[key + "_scale"]
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """As the base class; a moment saved by ``dense_state`` is stored again in the group's
        ``moment_dtype`` (fp8: nearest rounding onto this process's blocks)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            dtype, block = group["moment_dtype"], group["moment_block"]
            for t in (*group["layers"], *group["tensors"]):
                st = self.state.get(t)
                for key in self._MOMENTS if st else ():
                    v = st.get(key)
                    dense = v is not None and key + "_scale" not in st and v.dtype not in (torch.uint8, torch.float8_e4m3fn)
                    if dense and (dtype == "fp8" or v.dtype != {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]):
                        store(st, key, v.float().reshape(self._shape_of(t)), dtype, None, block=block)


__all__ = ["PARAM_DTYPES", "SRAdamW"]
