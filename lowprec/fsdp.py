"""Latent weights all-gathered in their weight format under FSDP2 (a tensor subclass, as torchao's
float8 does).

A latent weight is a float master that each forward quantizes to its format ``fmt``
(``Q(W; fmt)``, :mod:`lowprec.gemm`). Under ``torch.distributed.fsdp.fully_shard`` each rank holds
a dim-0 shard ``W_r`` of the master; before a unit's forward FSDP2 all-gathers the shards. Wrapped
in :class:`LowBitGatherWeight`, the master tells FSDP2 to gather codes instead of floats, through
FSDP2's extension points::

    fsdp_pre_all_gather    W_r -> (codes_r, scales_r)                    e.g. FP8: 1 byte per weight
                           per-tensor absmax formats: amax = all_reduce_max(amax(W_r)) first,
                           so every rank quantizes on the grid of the whole tensor
    all-gather             [codes_0; ...; codes_N-1], [scales_0; ...]    FSDP2's own collective
    fsdp_post_all_gather   W_hat = dequantize(codes, scales) in the param dtype: what the layer sees

(bf16 and fp16, unscaled casts, take the short way: the codes are the saturating cast of ``W_r``,
one kernel, and ``W_hat`` is the cast back, the same bits as the quantizer's.)

The layer then quantizes ``W_hat`` to ``fmt`` again. That is the identity on the codes (every
``W_hat`` element is already on the grid, and the scale is recomputed from the same amax), so the
forward and backward are those of the unsharded layer up to one rounding of the fp32 scale
(``amax / max_value`` recomputed from ``max_value · s``; measured: none, the gradients of the
tiny hybrid under the fp8 and paper policies are bit-identical to one process on gloo CPU and
NCCL H100), and the gradient of ``W_hat`` is the master's (identity STE; a clipped STE passes
everywhere, since no element of ``W_hat`` lies beyond the range). FSDP2 reduce-scatters it into
the master's shard as usual. Scales travel in the all-gather rather than beside it: a tensor
made in ``fsdp_pre_all_gather`` runs on FSDP2's copy-in stream, and only the all-gather's own
buffers are ordered and freed by FSDP2 across its streams.

Which formats travel in their own bits (:func:`check_lowbit_gather_support`): unscaled casts
(bf16, fp16, FP8 casts), every per-row and per-block format (the paper's FP4 rows, MX) since rows
are never split, and per-tensor absmax formats (FP8, int8). Not: per-tensor absmean (BitNet's
ternary, binary: the mean of the whole tensor would need its own reduction and a quantizer given
its scale), NVFP4 (its tensor scale), delayed scaling (the scale comes from a history), and layers
whose backward reads the weight in another format than the forward. Those gather in the param dtype.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from .formats import Format
from .kernels import _saturating_cast
from .qtensor import QTensor, quantize

__all__ = ["LowBitGatherWeight", "as_gathered", "check_lowbit_gather_support", "gathered_formats",
           "lowbit_gather_weights", "precompute_gather_amax", "unwrap_lowbit"]

_CASTS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # unscaled formats that are torch dtypes

# ops whose results stay wrapped: the ones FSDP2 applies to a parameter while sharding it
_PRESERVE = {
    torch.ops.aten.empty_like.default, torch.ops.aten.new_zeros.default, torch.ops.aten.slice.Tensor,
    torch.ops.aten.copy_.default, torch.ops.aten.view.default, torch.ops.aten.as_strided.default,
    torch.ops.aten._to_copy.default, torch.ops.aten._pin_memory.default, torch.ops.aten.split.Tensor,
    torch.ops.aten.clone.default,
}


def check_lowbit_gather_support(precision, rows: int, world: int) -> tuple[bool, str]:
    """(True, "") when a latent weight of ``precision`` with ``rows`` rows can be all-gathered over
    ``world`` ranks in its weight format; else (False, why)."""
    fmt = precision.operand("fprop", "weight")
    if precision.storage != "latent":
        return False, "native weights are sharded by lowprec.distributed"
    if fmt is None:
        return False, "the weight is not quantized"
    if precision.operand("dgrad", "weight") != fmt:
        return False, "backward reads the weight in another format than forward"
    if precision.scaling == "delayed":
        return False, "delayed scaling takes the weight's scale from its amax history"
    if fmt.is_scaled and fmt.granularity == "tensor" and fmt.scale != "absmax":
        return False, f"one {fmt.scale} scale for the whole tensor needs a reduction this gather does not make"
    if fmt.scale == "nvfp4":
        return False, "NVFP4's tensor scale spans the whole tensor"
    if rows % world:
        return False, f"{rows} rows do not split evenly over {world} ranks"
    return True, ""


def _quantize(x: torch.Tensor, fmt: Format, amax: torch.Tensor | None) -> QTensor:
    """``lowprec.quantize(x, fmt)`` with the per-tensor amax given (rows of a larger tensor)."""
    return quantize(x, fmt, amax=amax)


class LowBitGatherWeight(torch.Tensor):
    """A latent master weight (``_tensor``) that FSDP2 all-gathers as codes of ``_fmt``; in every
    other operation it is its ``_tensor``."""

    @staticmethod
    def __new__(cls, tensor: torch.Tensor, fmt: Format):
        return torch.Tensor._make_wrapper_subclass(
            cls, tensor.size(), strides=tensor.stride(), storage_offset=tensor.storage_offset(),
            dtype=tensor.dtype, layout=tensor.layout, device=tensor.device, requires_grad=tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor, fmt: Format):
        self._tensor = tensor
        self._fmt = fmt

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        if func == torch.ops.aten.detach.default:
            return cls(args[0]._tensor, args[0]._fmt)
        fmt = None

        def unwrap(t):
            nonlocal fmt
            fmt = t._fmt
            return t._tensor

        args, kwargs = pytree.tree_map_only(cls, unwrap, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _PRESERVE:
            return out
        return pytree.tree_map_only(torch.Tensor, lambda x: cls(x, fmt), out)

    def __tensor_flatten__(self):
        return ["_tensor"], self._fmt

    @staticmethod
    def __tensor_unflatten__(inner, fmt, outer_size, outer_stride):
        return LowBitGatherWeight(inner["_tensor"], fmt)

    def __repr__(self):
        return f"LowBitGatherWeight({self._fmt}, {self._tensor!r})"

    def _precomputed_amax(self) -> torch.Tensor | None:
        """The whole tensor's amax from :func:`precompute_gather_amax`, while the master is the one
        it was taken from (its version counter unchanged); else None."""
        amax = getattr(self, "_amax", None)
        return amax if amax is not None and self._amax_key == _versions(self._amax_param(), self) else None

    # ---- FSDP2's all-gather extension ------------------------------------------------------------
    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module, mp_policy):
        fmt, w = self._fmt, self._tensor
        if fmt.name in _CASTS and not fmt.is_scaled:  # bf16, fp16: the codes are the saturating cast
            return (_saturating_cast(w.detach(), fmt),), None
        amax = None
        if fmt.is_scaled and fmt.granularity == "tensor":  # absmax (check_lowbit_gather_support)
            amax = self._precomputed_amax()
            if amax is None:
                amax = w.detach().abs().amax().float() if w.numel() else w.new_zeros((), dtype=torch.float32)
                dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=mesh.get_group())
        q = _quantize(w.detach(), fmt, amax)
        # the scales travel in the all-gather too (a per-tensor one as N equal copies): FSDP2 then
        # orders and frees them with its own buffers, across its copy-in and compute streams
        inputs = (q.data,) if q.scale is None else (q.data, q.scale.reshape(-1) if q.scale.dim() == 0 else q.scale)
        tensor_scale = q.scale is not None and q.scale.dim() == 0
        return inputs, (tensor_scale, tuple(outer_size), q.padded_last)

    def fsdp_post_all_gather(self, outputs, metadata, param_dtype, *, out=None):
        # FSDP2 hands each output back shaped as its input, all ranks' rows stacked on dim 0
        data = outputs[0]
        if metadata is None:  # a cast: QTensor.dequantize of its codes is the cast back
            w = data.to(param_dtype)
        else:
            tensor_scale, shape, padded_last = metadata
            scale = outputs[1] if len(outputs) > 1 else None
            if tensor_scale:
                scale = scale[0]
            w = QTensor(data, scale, None, self._fmt, shape, padded_last).dequantize(param_dtype)
        if out is not None:  # the gather before backward refills the forward's tensor, which autograd saved
            with torch.no_grad(), torch.autograd._unsafe_preserve_version_counter(out):
                out.copy_(w)
            return
        return w, (w,)


def precompute_gather_amax(model: nn.Module) -> int:
    """Take the per-tensor amax of every latent weight that all-gathers with one (FP8, int8 per
    tensor) in ONE all-reduce, instead of one all-reduce per weight inside each unit's all-gather
    (a collective that the gather of every unit waits for, in forward and again in backward).
    Call after the optimizer step, as torchao does for float8; each value is used by the weight's
    next all-gathers while its master is unchanged (an in-place update, a load, makes it stale and
    the gather takes its own again), so the result is the same as without it, bit for bit. Returns
    the number of weights."""
    from torch.distributed.tensor import DTensor

    found = []
    for p in model.parameters():
        local = p._local_tensor if isinstance(p, DTensor) else p
        if isinstance(local, LowBitGatherWeight) and local._fmt.is_scaled and local._fmt.granularity == "tensor":
            found.append((p, local))
    if not found:
        return 0
    masters = [local._tensor.detach() for _, local in found]
    amax = torch.stack([torch.linalg.vector_norm(m, float("inf")).float() if m.numel() else
                        m.new_zeros((), dtype=torch.float32) for m in masters])
    dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=found[0][0].device_mesh.get_group())
    for (p, local), a in zip(found, amax.unbind()):
        local._amax, local._amax_param, local._amax_key = a, weakref.ref(p), _versions(p, local)
    return len(found)


def _versions(param, local) -> tuple:
    """What changes when a master is written in place: an update through the sharded Parameter (a
    DTensor) counts on it, one on its local tensor (this wrapper) on the wrapper, one on the inner
    tensor on that; none of them sees the others'."""
    return (None if param is None else param._version, local._version, local._tensor._version)


def unwrap_lowbit(t):
    """The master of a :class:`LowBitGatherWeight` (through a DTensor), else ``t``."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor) and isinstance(t._local_tensor, LowBitGatherWeight):
        return DTensor.from_local(t._local_tensor._tensor, t.device_mesh, t.placements, run_check=False,
                                  shape=t.shape, stride=t.stride())
    if isinstance(t, LowBitGatherWeight):
        return t._tensor
    return t


def _gather_plan(model: nn.Module, world: int, param_dtype: torch.dtype | None):
    """For each latent weight (a tied one once): (the layers that read it as [(name, module)], the
    weight, its format, whether it travels in that format, why not)."""
    from .nn.native import NativeWeightMixin

    layers: dict[int, list[tuple[str, nn.Module]]] = {}  # a tied weight: every layer that reads it
    for name, mod in model.named_modules():
        if isinstance(mod, NativeWeightMixin) and not mod.is_native and mod.weight is not None:
            layers.setdefault(id(mod.weight), []).append((name, mod))
    for users in layers.values():
        w = users[0][1].weight
        fmts = {m.precision.operand("fprop", "weight") for _, m in users}
        fmt = next(iter(fmts))
        ok, why = (False, "already wrapped") if isinstance(w, LowBitGatherWeight) else (True, "")
        for _, m in users:
            if ok:
                ok, why = check_lowbit_gather_support(m.precision, w.shape[0], world)
        if ok and len(fmts) > 1:
            ok, why = False, "a tied weight read in several formats"
        if ok and fmt.bits >= 8 * w.element_size():
            ok, why = False, f"{fmt} is not narrower than the {w.dtype} master"
        if ok and param_dtype is not None and not fmt.is_scaled and _CASTS.get(fmt.name) == param_dtype:
            ok, why = False, f"{fmt} is the param dtype, which FSDP2 gathers in"
        yield users, w, fmt, ok, why


def lowbit_gather_weights(model: nn.Module, world: int, param_dtype: torch.dtype | None = None
                          ) -> dict[str, tuple[bool, str]]:
    """Wrap every latent weight of ``model`` that can travel in its format (before ``fully_shard``
    with ``world`` data-parallel ranks). A weight whose format is the unscaled cast to
    ``param_dtype`` (FSDP2's ``MixedPrecisionPolicy.param_dtype``) is left as it is: FSDP2's own
    copy-in casts it to that dtype, the same bits, in one fused kernel per unit instead of a
    quantizer per weight. Returns {module name: (True, format gathered) or (False, why not)}."""
    report = {}
    for users, w, fmt, ok, why in _gather_plan(model, world, param_dtype):
        if ok:
            new = nn.Parameter(LowBitGatherWeight(w.data, fmt), requires_grad=w.requires_grad)
            for _, m in users:
                m.weight = new
        for name, _ in users:
            report[name] = (ok, str(fmt) if ok else why)
    return report


def gathered_formats(model: nn.Module, param_dtype: torch.dtype | None) -> dict[str, Format]:
    """{parameter name: format} of the latent weights that a sharded run (rows splitting evenly)
    would all-gather in their format (:func:`lowbit_gather_weights`): what one process computing in
    ``param_dtype`` reads through :func:`as_gathered` to get the ranks' numbers."""
    return {f"{name}.weight": fmt for users, _, fmt, ok, _ in _gather_plan(model, 1, param_dtype) if ok
            for name, _ in users}


def _gathered_value(w: torch.Tensor, fmt: Format, dtype: torch.dtype) -> torch.Tensor:
    """What a rank holds after all-gathering ``w`` in ``fmt`` and dequantizing it to ``dtype``: the
    codes of the whole tensor (a per-tensor scale from its amax, as the all-reduced amax of the
    shards gives), dequantized."""
    if fmt.name in _CASTS and not fmt.is_scaled:
        return _saturating_cast(w, fmt).to(dtype)
    return quantize(w, fmt).dequantize(dtype)


class _AsGathered(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, fmt, dtype):
        ctx.master_dtype = w.dtype
        return _gathered_value(w.detach(), fmt, dtype)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.master_dtype), None, None


def as_gathered(w: torch.Tensor, fmt: Format, dtype: torch.dtype) -> torch.Tensor:
    """``w`` as the ranks of a sharded run see it after a gather in ``fmt`` (:func:`_gathered_value`),
    in ``dtype``; its gradient reaches ``w`` as it is (cast to ``w``'s dtype), as FSDP2's
    reduce-scatter brings it to the master."""
    return _AsGathered.apply(w, fmt, dtype)
