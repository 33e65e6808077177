"""Native weights over several ranks: each data-parallel rank stores a row shard of the packed
codes, and a forward all-gathers the packed bytes; tensor parallelism slices the codes by rows or
columns first (:func:`split_native_tp`, see "Tensor parallelism" below).

FSDP2 (``torch.distributed.fsdp.fully_shard``) shards Parameters. A native layer has none for its
weight: ``w_data`` (packed codes), ``w_scale`` and ``w_global`` are buffers and the gradient goes
to a stride-0 carrier (:mod:`lowprec.nn.native`). So native layers are sharded here the way FSDP2
shards a parameter, along dim 0, but in their storage format. With N ranks and a weight of
R rows (R a multiple of N), rank r keeps rows ``[r R/N, (r+1) R/N)``::

    w_data    (R/N, row_bytes)   packed codes of its rows: 2-bit ternary, 1-bit binary, FP4, FP8 bytes
    w_scale   its rows' scales (one per row or per block); a per-tensor scale is kept whole on every rank
    w_global  whole on every rank (NVFP4's tensor scale)
    carrier   (R/N, K), stride 0: ``native_grad`` is the gradient of its own rows

Between steps the layer is an ordinary native layer of shape ``(R/N, K)``: an optimizer (Bop,
TernaryBop, SRAdamW) updates its rows from its rows' gradient and keeps state for those rows
only (ZeRO-3 for native weights, with no change to the optimizer). A *unit* (a module holding
native layers: a transformer block, an LSTM layer, the root) gathers them for its forward::

    local  = concat over the unit's layers of (w_data rows, row/block scales) as bytes   (n,) uint8
    full   = all_gather(local)                                                          (N·n,) uint8
    layer  computes with all R rows (views of ``full``) and a full-shape carrier whose gradient
           (R, K) fp32 is reduce-scattered, averaged over the ranks, into its rows' native_grad

one collective per unit forward, however often a layer is called in it (an LSTM's recurrent
projection runs once per token). The gathered codes live as long as the autograd graph holds
them (until that unit's backward), the reduce-scatter runs once per unit forward in backward
when every use of the layer in it has produced its gradient.

What is exact. Forward values and gradients are those of the unsharded layer, bit for bit
(the same codes and scales reach the same kernels). Updates are exact row by row for rules
that read only their rows: every format whose scale groups lie inside rows (per-row and
per-block scales: the paper's FP4 rows, MX, NVFP4 blocks). A per-tensor scale is one number for
rows held on different ranks: the rule that learns it (Bop/TernaryBop: Adam on log s from
``sum_i G_i c_i``; SRAdamW: the absmax/absmean of the updated weight) sees only its rows, so
:func:`sync_native_scales` makes the ranks agree again after each step (the maximum of the
ranks' scales for absmax formats, their mean otherwise) -- exact when the scale is fixed
(``lr = 0``), otherwise a replacement for the reduction over all rows the rule would need.
Stochastic-rounding noise is drawn per rank for its rows: statistically, not bitwise, the
1-process update.

Tensor parallelism. :func:`split_native_tp` keeps a tensor-parallel rank's rows (column-parallel
layers) or columns (row-parallel layers) of the codes and of the scales that lie inside them; the
data-parallel ranks then row-shard that piece as above. A scale kept whole on every
tensor-parallel rank is synchronized over both groups by :func:`sync_native_scales`. In a
``state_dict`` every piece is a DTensor of the whole weight (:func:`native_layout`): rows split by
tensor parallelism (outer) and then by the data-parallel ranks (inner) are placed as
``(_StridedShard(0, split_factor=tp), Shard(0))`` on the (dp, tp) mesh, as FSDP2 places a
parameter that tensor parallelism split first; columns as ``Shard(1)`` over tp.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from .nn.native import NativeWeightMixin

# torch >= 2.13 names them all_gather_single / reduce_scatter_single (the *_tensor names are
# deprecated aliases); FSDP2 calls the same function, so one patch counts both
_ALL_GATHER = "all_gather_single" if hasattr(dist, "all_gather_single") else "all_gather_into_tensor"
_REDUCE_SCATTER = "reduce_scatter_single" if hasattr(dist, "reduce_scatter_single") else "reduce_scatter_tensor"

__all__ = ["NativeShard", "shard_native_layer", "gather_native_on_forward", "all_gather_native",
           "sync_native_scales", "scale_sync_layers", "native_shards", "AllGatherRecord", "record_all_gathers", "NativeTPSplit",
           "split_native_tp", "native_full_shape", "native_layout", "native_dtensor", "native_state_view",
           "native_local_piece"]


@dataclass
class NativeShard:
    """How one native layer is split: its rows ``[rank·rows_local, (rank+1)·rows_local)`` of ``rows``."""

    mesh: object                 # 1-D DeviceMesh of the data-parallel ranks
    rank: int
    world: int
    rows: int                    # R
    full_shape: tuple[int, ...]  # the weight's logical shape (R, K)
    scale_sharded: bool          # w_scale has a dim-0 of R (per-row or per-block scales)

    @property
    def rows_local(self) -> int:
        return self.rows // self.world

    @property
    def group(self):
        return self.mesh.get_group()


def native_shards(model: nn.Module) -> dict[str, nn.Module]:
    """Name -> layer of every row-sharded native layer of ``model``."""
    return {n: m for n, m in model.named_modules() if getattr(m, "_native_shard", None) is not None}


# ---------------------------------------------------------------------------------- sharding

@torch.no_grad()
def shard_native_layer(layer: nn.Module, mesh, name: str = "layer") -> None:
    """Keep only this rank's rows of ``layer``'s native weight (see the module doc).

    ``mesh``: the 1-D DeviceMesh of the data-parallel ranks. ``ValueError`` naming the layer when
    its rows do not split evenly or do not fill whole bytes; ``NotImplementedError`` for a native
    embedding (its gradient is delivered by a tensor hook, not the carrier)."""
    from .nn import QLinear

    if not (isinstance(layer, NativeWeightMixin) and layer.is_native):
        raise ValueError(f"{name}: not a native layer")
    if not isinstance(layer, QLinear):
        raise NotImplementedError(f"{name}: row-sharding a native {type(layer).__name__} is not supported; "
                                  "keep embeddings latent (every shipped policy does)")
    if getattr(layer, "_native_shard", None) is not None:
        raise ValueError(f"{name}: already sharded")
    world, rank = mesh.size(), mesh.get_local_rank()
    R, K = layer._w_shape
    if R % world:
        raise ValueError(f"{name}: {R} rows of a native weight do not split over {world} data-parallel ranks; "
                         f"choose a data-parallel size that divides {R}")
    if layer.w_data.dim() != 2 or layer.w_data.shape[0] != R:
        raise ValueError(f"{name}: a row of its {layer.precision.weight} weight ({K} elements) does not fill whole "
                         "bytes, so its packed codes cannot be split by rows")
    scale = layer.w_scale
    scale_sharded = scale is not None and scale.dim() >= 1 and scale.shape[0] == R
    if scale is not None and not scale_sharded and scale.numel() != 1:
        raise ValueError(f"{name}: scale of shape {tuple(scale.shape)} is neither per tensor nor per row/block")
    rl = R // world
    rows = slice(rank * rl, (rank + 1) * rl)
    layer.w_data = layer.w_data[rows].clone()
    if scale_sharded:
        layer.w_scale = scale[rows].clone()
    layer._native_shard = NativeShard(mesh, rank, world, R, (R, K), scale_sharded)
    layer._w_shape = (rl, K)
    layer._grad_carrier = None  # a carrier of the new shape (the old one had the whole weight's)
    layer._place_grad_carrier(layer.w_data.device)
    _register_layout_hooks(layer)


# ------------------------------------------------------------------- tensor-parallel splits

@dataclass
class NativeTPSplit:
    """How tensor parallelism split one native layer: this rank keeps rows (``dim`` 0, a
    column-parallel layer) or columns (``dim`` 1, row-parallel) ``[rank·n/world, (rank+1)·n/world)``
    of the weight of shape ``full_shape``, as packed codes and their scales."""

    mesh: object                 # 1-D DeviceMesh of the tensor-parallel ranks
    root: object                 # the (dp, tp) mesh it belongs to, or None
    dim: int
    rank: int
    world: int
    full_shape: tuple[int, int]  # (R, K) before the split
    scale_split: bool            # w_scale is split along ``dim`` too (else whole on every rank)

    @property
    def group(self):
        return self.mesh.get_group()


@torch.no_grad()
def split_native_tp(layer: nn.Module, mesh, dim: int, root=None, name: str = "layer") -> None:
    """Keep this tensor-parallel rank's rows (``dim=0``) or columns (``dim=1``) of ``layer``'s
    native weight: packed codes sliced, not re-quantized, so the values are the unsplit layer's.
    Per-row or per-block scales split with the codes where they lie inside the slice; a per-tensor
    scale (and a per-row scale of a column split) stays whole on every rank, and
    :func:`sync_native_scales` keeps the ranks' copies equal. ``ValueError`` naming the layer where
    the slice does not split evenly or does not start on a byte (or scale) boundary. Before
    :func:`shard_native_layer` (which then splits this rank's piece over the data-parallel ranks)."""
    from .qtensor import _packed_bits

    if getattr(layer, "_native_tp", None) is not None or getattr(layer, "_native_shard", None) is not None:
        raise ValueError(f"{name}: split for tensor parallelism before any other sharding, and once")
    R, K = layer._w_shape
    world, rank = mesh.size(), mesh.get_local_rank()
    what = ("rows", "columns")[dim]
    n = (R, K)[dim]
    if n % world:
        raise ValueError(f"{name}: {n} {what} of a native weight do not split over {world} tensor-parallel ranks")
    if layer.w_data.dim() != 2 or layer.w_data.shape[0] != R:
        raise ValueError(f"{name}: a row of its {layer.precision.weight} weight ({K} elements) does not fill whole "
                         "bytes, so its packed codes cannot be split")
    scale = layer.w_scale
    per_tensor = scale is None or scale.numel() == 1
    per_row = not per_tensor and scale.dim() >= 1 and scale.shape[0] == R and scale[0].numel() == 1
    blocks = not per_tensor and not per_row and scale.dim() == 2 and scale.shape[0] == R
    if not (per_tensor or per_row or blocks):
        raise ValueError(f"{name}: scale of shape {tuple(scale.shape)} is neither per tensor, per row nor per block")
    if dim == 0:
        rl = R // world
        layer.w_data = layer.w_data[rank * rl:(rank + 1) * rl].clone()
        scale_split = not per_tensor
        if scale_split:
            layer.w_scale = scale[rank * rl:(rank + 1) * rl].clone()
        layer._w_shape = (rl, K)
        layer.out_features = rl
    else:
        bits = _packed_bits(layer.precision.weight) or 8 * layer.w_data.element_size()
        kl = K // world
        if layer._w_padded_last != K or (kl * bits) % (8 * layer.w_data.element_size()):
            raise ValueError(f"{name}: {kl} columns of its {layer.precision.weight} weight do not fill whole bytes "
                             f"(or the rows are padded), so its packed codes cannot be split by columns over {world} ranks")
        cb = layer.w_data.shape[1] // world
        layer.w_data = layer.w_data[:, rank * cb:(rank + 1) * cb].clone()
        scale_split = blocks
        if blocks:
            if scale.shape[1] % world:
                raise ValueError(f"{name}: {scale.shape[1]} scale blocks per row do not split over {world} ranks")
            sb = scale.shape[1] // world
            layer.w_scale = scale[:, rank * sb:(rank + 1) * sb].clone()
        layer._w_shape = (R, kl)
        layer._w_padded_last = kl
        layer.in_features = kl
    layer._native_tp = NativeTPSplit(mesh, root, dim, rank, world, (R, K), scale_split)
    layer._grad_carrier = None  # a carrier of the new shape
    layer._place_grad_carrier(layer.w_data.device)
    layer._replan()
    _register_layout_hooks(layer)


def native_full_shape(layer: nn.Module) -> tuple[int, ...]:
    """The logical shape of a native layer's whole weight, however it is split over ranks."""
    tp = getattr(layer, "_native_tp", None)
    if tp is not None:
        return tp.full_shape
    sh = getattr(layer, "_native_shard", None)
    return sh.full_shape if sh is not None else tuple(layer.native_weight.shape)


def native_layout(layer: nn.Module, t: torch.Tensor, kind: str):
    """How the local tensor ``t`` of a split native layer lies in its whole-model tensor:
    ``(mesh, placements, global shape)`` for ``DTensor.from_local``, or None where ``t`` is whole
    on every rank. ``kind``: ``"data"`` (``w_data``), ``"scale"`` (``w_scale``) or ``"state"`` (an
    optimizer's tensor for the layer: per element ``(rows, K)``, per row, or one number).

    Rows are split by tensor parallelism (outer, a column-parallel layer) and then by the
    data-parallel ranks (inner); columns by tensor parallelism (a row-parallel layer)."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.placement_types import _StridedShard

    sh, tp = getattr(layer, "_native_shard", None), getattr(layer, "_native_tp", None)
    if t.dim() == 0 or (sh is None and tp is None):
        return None
    rows_local, cols_local = layer._w_shape
    if kind == "data":
        row_dim, col_dim = 0, 1
    elif kind == "scale":
        rows_split = t.shape[0] == rows_local and ((sh is not None and sh.scale_sharded) or (tp is not None and tp.dim == 0 and tp.scale_split))
        row_dim = 0 if rows_split else None
        col_dim = 1 if (tp is not None and tp.dim == 1 and tp.scale_split) else None
    elif kind == "state":
        if t.numel() == 1:
            return None
        if t.dim() > 1 and t.shape[0] == 1:  # one row: per-row state, or per-element state flattened (rows in order)
            row_dim, col_dim = 1, None
        else:  # rows (or scale groups of rows) first; a column split viewed as (rows, columns): native_state_view
            row_dim = 0
            col_dim = 1 if (tp is not None and tp.dim == 1 and t.dim() > 1 and t.shape[1] == cols_local) else None
    else:
        raise ValueError(f"kind {kind!r}: choose data, scale or state")
    shape = list(t.shape)
    dp_split = sh is not None and row_dim is not None
    tp_rows = tp is not None and tp.dim == 0 and row_dim is not None
    tp_cols = tp is not None and tp.dim == 1 and col_dim is not None
    if row_dim is not None:
        shape[row_dim] *= (sh.world if dp_split else 1) * (tp.world if tp_rows else 1)
    if tp_cols:
        shape[col_dim] *= tp.world
    tp_place = Shard(row_dim) if tp_rows else Shard(col_dim) if tp_cols else Replicate()
    if dp_split and tp is not None:
        mesh = tp.root
        if mesh is None or mesh.ndim != 2:
            raise ValueError("a native layer split over both data- and tensor-parallel ranks needs their 2-D mesh")
        dp_place = _StridedShard(row_dim, split_factor=tp.world) if tp_rows else Shard(row_dim)
        placements = [dp_place, tp_place]
    elif dp_split:
        mesh, placements = sh.mesh, [Shard(row_dim)]
    elif tp_rows or tp_cols:
        mesh, placements = tp.mesh, [tp_place]
    else:
        return None
    return mesh, placements, torch.Size(shape)


def native_state_view(layer, t: torch.Tensor) -> torch.Tensor:
    """An optimizer's per-element tensor of a layer that tensor parallelism split, viewed with the
    weight's shape (rows, columns): optimizers keep such state in the scale groups' layout, whose
    flattened form a split by columns would cut; anything else as it is."""
    tp = getattr(layer, "_native_tp", None)
    rows, cols = layer._w_shape
    if tp is None or t.dim() == 0 or t.numel() != rows * cols or layer._w_padded_last != cols:
        return t
    return t.reshape(rows, cols)


def native_dtensor(layer, t: torch.Tensor, kind: str):
    """``t`` as the DTensor of its whole-model tensor (see :func:`native_layout`), or ``t``."""
    from torch.distributed.tensor import DTensor

    layout = native_layout(layer, t, kind)
    if layout is None or isinstance(t, DTensor):
        return t
    mesh, placements, shape = layout
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(t, mesh, placements, run_check=False, shape=shape, stride=stride)


def native_local_piece(layer, t: torch.Tensor, like: torch.Tensor, kind: str) -> torch.Tensor:
    """This rank's piece of ``t``: a DTensor laid out as ``like`` would be (its local tensor), or a
    whole tensor (a 1-process checkpoint) sliced."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    layout = native_layout(layer, like, kind)
    if layout is None:
        return t.full_tensor() if isinstance(t, DTensor) else t
    mesh, placements, shape = layout
    if isinstance(t, DTensor):
        if tuple(t.placements) == tuple(placements) and t.device_mesh == mesh:
            return t.to_local()
        t = t.full_tensor()
    if tuple(t.shape) != tuple(shape):
        return t  # not this layer's whole tensor: load_state_dict reports the mismatch
    local_shape, offset = compute_local_shape_and_global_offset(shape, mesh, placements)
    index = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
    return t[index]


def _register_layout_hooks(layer) -> None:
    if not getattr(layer, "_layout_hooks", False):
        layer.register_state_dict_post_hook(_state_dict_as_dtensor)
        layer.register_load_state_dict_pre_hook(_load_from_dtensor)
        layer._layout_hooks = True


def _state_dict_as_dtensor(module, state_dict, prefix, local_metadata):
    """In ``state_dict`` the split buffers are DTensors of the whole weight's shape, views of this
    rank's piece (see :func:`native_layout`): torch.distributed.checkpoint saves and reloads them
    at any number of ranks."""
    for n, kind in (("w_data", "data"), ("w_scale", "scale")):
        t = state_dict.get(prefix + n)
        if t is not None:
            state_dict[prefix + n] = native_dtensor(module, t, kind)


def _load_from_dtensor(module, state_dict, prefix, *args):
    """Accept this rank's piece of a DTensor, or of a whole tensor (a 1-process checkpoint)."""
    for n, kind in (("w_data", "data"), ("w_scale", "scale")):
        t, like = state_dict.get(prefix + n), getattr(module, n)
        if t is not None and like is not None:
            state_dict[prefix + n] = native_local_piece(module, t, like, kind)


# ------------------------------------------------------------------------------ the gather

class _ReduceScatterRows(torch.autograd.Function):
    """Forward: a zero stride-0 tensor of the whole weight's shape (the carrier the layer's GEMMs
    deliver dW to). Backward: the gradient (R, K), averaged over the ranks, reduce-scattered into
    this rank's rows (the local carrier's gradient)."""

    @staticmethod
    def forward(ctx, local_carrier, shard: NativeShard):
        ctx.shard = shard
        # a zero expanded, not a tensor zeroed in place: zero_() returns the tensor it fills, a second
        # operation with the same result (lowprec.common.to_dtype says why that must not leave forward)
        return torch.zeros((), device=local_carrier.device).expand(shard.full_shape)

    @staticmethod
    def backward(ctx, grad):
        sh = ctx.shard
        out = grad.new_empty((sh.rows_local, *sh.full_shape[1:]))
        getattr(dist, _REDUCE_SCATTER)(out, grad.contiguous(), op=dist.ReduceOp.AVG, group=sh.group)
        return out, None


def _local_bytes(layer) -> list[torch.Tensor]:
    parts = [layer.w_data]
    if layer._native_shard.scale_sharded:
        parts.append(layer.w_scale)
    return [p.contiguous().view(torch.uint8).reshape(-1) for p in parts]


@torch.no_grad()
def all_gather_native(layers: list[nn.Module]) -> list[list[torch.Tensor]]:
    """One all-gather of every layer's local packed rows (and row scales): per layer, the whole
    tensors (w_data, [w_scale]) in their own dtypes."""
    pieces = [_local_bytes(layer) for layer in layers]
    flat = torch.cat([p for ps in pieces for p in ps])
    sh = layers[0]._native_shard
    out = flat.new_empty(sh.world * flat.numel())
    getattr(dist, _ALL_GATHER)(out, flat, group=sh.group)
    out = out.view(sh.world, flat.numel())
    result, offset = [], 0
    for layer, ps in zip(layers, pieces):
        full = []
        for p, local in zip(ps, (layer.w_data, layer.w_scale)):
            n = p.numel()
            rows = out[:, offset:offset + n].contiguous()  # (world, n) bytes of each rank's rows
            offset += n
            shape = (layer._native_shard.rows, *local.shape[1:])
            full.append(rows.view(local.dtype).reshape(shape))
        result.append(full)
    return result


def gather_native_on_forward(unit: nn.Module, layers: list[nn.Module]):
    """Register on ``unit`` the all-gather of ``layers`` (sharded native layers inside it, all on
    the same mesh) before its forward, and the return to their shards after it (they are listed
    in ``unit._native_layers``). Returns the two hook handles."""
    if not layers:
        raise ValueError("gather_native_on_forward needs at least one sharded native layer")
    meshes = {id(layer._native_shard.mesh) for layer in layers}
    if len(meshes) != 1:
        raise ValueError("the native layers of one unit must share one data-parallel mesh")
    saved: list = []
    unit._native_layers = list(layers)

    def pre(module, args):
        full = all_gather_native(layers)
        for layer, tensors in zip(layers, full):
            sh = layer._native_shard
            saved.append((layer.w_data, layer.w_scale, layer._grad_carrier, layer._w_shape))
            layer._buffers["w_data"] = tensors[0]
            if sh.scale_sharded:
                layer._buffers["w_scale"] = tensors[1]
            local = layer._grad_carrier
            if torch.is_grad_enabled():
                layer._grad_carrier = _ReduceScatterRows.apply(local, sh)
            else:
                layer._grad_carrier = torch.empty_strided(sh.full_shape, (0, 0), device=local.device).zero_()
            layer._w_shape = sh.full_shape

    def post(module, args, output):
        if not saved:  # the pre-hook failed before it swapped anything
            return output
        for layer, (data, scale, carrier, shape) in zip(layers, saved):
            layer._buffers["w_data"], layer._buffers["w_scale"] = data, scale
            layer._grad_carrier, layer._w_shape = carrier, shape
        saved.clear()
        return output

    return unit.register_forward_pre_hook(pre), unit.register_forward_hook(post, always_call=True)


# ------------------------------------------------------------------------------ the scales

def scale_sync_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose native scales :func:`sync_native_scales` makes equal over ranks
    (row-sharded or tensor-parallel, with a scale kept whole on several ranks): a caller that syncs
    after every step finds them once (after sharding) and passes them as ``layers``."""
    return [layer for layer in model.modules() if _scale_groups(layer)]


def _scale_groups(layer: nn.Module) -> list:
    """The process groups over which ``layer``'s whole native scale is held in copies."""
    sh, tp = getattr(layer, "_native_shard", None), getattr(layer, "_native_tp", None)
    groups = []
    if sh is not None and not sh.scale_sharded and sh.world > 1:
        groups.append(sh.group)
    if tp is not None and not tp.scale_split and tp.world > 1:  # a whole scale on every tp rank
        groups.append(tp.group)
    return groups


@torch.no_grad()
def sync_native_scales(model: nn.Module, found_inf: torch.Tensor | None = None,
                       layers: list[nn.Module] | None = None) -> int:
    """Make every rank hold the same copy of each native scale that is kept whole on several ranks
    again (call after the optimizer's step): a row-sharded layer's per-tensor scale over the
    data-parallel ranks, a tensor-parallel piece's per-tensor (or, split by columns, per-row) scale
    over the tensor-parallel ranks too; the maximum of the ranks' scales for absmax formats, their
    mean otherwise. Returns the number of layers synchronized. Scales split with the codes need none.

    ``found_inf``: the step's verdict (a 0-d device tensor, nonzero when the update was skipped);
    where it is set the scales keep their bits (a skipped step changed none of them, and a mean of
    equal values need not round back to them). Decided on the device, with no host sync; every
    rank still runs the all-reduce, so the ranks' collectives stay in step. ``layers``: the layers to
    look at (:func:`scale_sync_layers` of the model; default: all of its modules)."""
    n = 0
    for layer in model.modules() if layers is None else layers:
        groups = _scale_groups(layer)
        if not groups:
            continue
        fmt = layer.precision.weight
        op = dist.ReduceOp.MAX if fmt.scale in ("absmax", "nvfp4") else dist.ReduceOp.AVG
        for buf in (layer.w_scale, layer.w_global):
            if buf is not None and buf.is_floating_point() and buf.dtype == torch.float32:
                synced = buf.clone() if found_inf is not None else buf
                for group in groups:  # over dp, then over tp: the mean (maximum) over all of them
                    dist.all_reduce(synced, op=op, group=group)
                if found_inf is not None:
                    buf.copy_(torch.where(found_inf.reshape(()) > 0, buf, synced))
        n += 1
    return n


# --------------------------------------------------------------------------- byte accounting

@dataclass
class AllGatherRecord:
    """Bytes each rank sent (its shard) and received (the whole) in every all-gather seen."""

    sent: list[int] = field(default_factory=list)
    received: list[int] = field(default_factory=list)

    @property
    def calls(self) -> int:
        return len(self.sent)

    @property
    def sent_bytes(self) -> int:
        return sum(self.sent)

    @property
    def received_bytes(self) -> int:
        return sum(self.received)


@contextlib.contextmanager
def record_all_gathers():
    """Within the block, count the bytes of every single-tensor all-gather
    (``torch.distributed.all_gather_single``, formerly ``all_gather_into_tensor``): FSDP2's
    parameter all-gathers and the packed native ones alike::

        with record_all_gathers() as rec:
            model(x)
        rec.received_bytes      # bytes this rank received: the unsharded weights of the forward
    """
    rec = AllGatherRecord()
    original = getattr(dist, _ALL_GATHER)

    def counting(output_tensor, input_tensor, *args, **kwargs):
        rec.sent.append(input_tensor.numel() * input_tensor.element_size())
        rec.received.append(output_tensor.numel() * output_tensor.element_size())
        return original(output_tensor, input_tensor, *args, **kwargs)

    setattr(dist, _ALL_GATHER, counting)
    try:
        yield rec
    finally:
        setattr(dist, _ALL_GATHER, original)
