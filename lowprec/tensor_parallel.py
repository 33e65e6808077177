"""Tensor parallelism for :class:`lowprec.nn.QLinear`: torch's ColwiseParallel / RowwiseParallel
styles, for a layer that quantizes its own operands.

torch's styles accept ``nn.Linear`` and ``nn.Embedding`` only, and compute ``F.linear`` on
DTensors. A QLinear runs its three GEMMs through its plan on plain tensors, so here the weight
(and bias) are DTensors on the ``tp`` mesh between steps, and each forward computes on the local
shard with plain tensors, the collectives placed around it (Megatron's f / g operators)::

    column-parallel (Shard(0) weight rows, W_r: out/tp x in)      y_r = x W_r^T (+ b_r)
        input   x replicated;  backward: dx = all_reduce(sum_r dy_r W_r)
        output  y_r (features of this rank), or all-gathered (``gather_output=True``;
                backward: each rank keeps its slice)
    row-parallel    (Shard(1) weight columns, W_r: out x in/tp)    y = all_reduce(x_r W_r^T)
        input   x_r (the column-parallel layer's output slice);  backward: local
        output  replicated;  backward: local

Gradients reach the DTensor parameters through ``to_local`` (their own placements), so FSDP2
composes on the ``dp`` mesh (2-D parallelism) as with torch's styles.

What is exact: weights and activations in unscaled formats (fp32, bf16, fp16 casts) compute the
1-process numbers up to the order of the row-parallel sum; scaled formats whose scale groups
lie inside one shard (per-row weight scales of a column-parallel layer, per-token input scales of
a column-parallel layer) likewise. A per-tensor weight scale becomes one per shard, a per-token
scale of a row-parallel layer's input one per token and shard (as Transformer Engine without its
amax reduction over the tensor-parallel group).

Native weights (packed codes and scales in buffers, no Parameter) are split by slicing the codes:
a column-parallel layer keeps its rows, a row-parallel one its columns
(:func:`lowprec.distributed.split_native_tp`): the same codes and scales reach the same kernels,
so values and gradients are those of the unsplit model up to the order of the row-parallel sums
(and, for quantized activations, the per-shard input scales above); each rank updates its piece; a scale kept whole on every rank (per tensor; per row in a
row-parallel layer) is averaged (absmax: maximized) over the ranks after each step by
:func:`lowprec.distributed.sync_native_scales`.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel

from .distributed import split_native_tp

__all__ = ["QColwiseParallel", "QRowwiseParallel"]


def _check_layer(module, style: str):
    from .nn import QLinear

    if isinstance(module, QLinear):
        return True
    if isinstance(module, nn.Linear):
        return False
    raise NotImplementedError(f"{style} applies to QLinear and nn.Linear, not {type(module).__name__}")


def _swap_to_local(module, names):
    """Replace the DTensor parameters by their local shards for one forward; returns the restore list."""
    saved = []
    for n in names:
        p = module._parameters.get(n)
        if isinstance(p, DTensor):
            saved.append((n, p))
            module._parameters[n] = p.to_local()
    return saved


class QColwiseParallel(ParallelStyle):
    """Column parallel: weight (and bias) rows split over the mesh; input replicated; output the
    local features (``gather_output=False``) or all of them (``True``, e.g. an LSTM's gates,
    which its recurrence splits in four)."""

    def __init__(self, *, gather_output: bool = False, root=None):
        super().__init__()
        self.gather_output = gather_output
        self.root = root  # the (dp, tp) mesh, for the checkpoint layout of a native layer also split over dp

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        if not _check_layer(module, type(self).__name__):
            out = Replicate() if self.gather_output else Shard(-1)
            return ColwiseParallel(output_layouts=out)._apply(module, mesh)
        n = mesh.size()
        if module.out_features % n:
            raise ValueError(f"column-parallel: {module.out_features} output features do not split over {n} ranks")
        if module.is_native:
            split_native_tp(module, mesh, 0, self.root, type(self).__name__)
        for name, p in list(module.named_parameters(recurse=False)):
            module.register_parameter(name, nn.Parameter(distribute_tensor(p.data, mesh, [Shard(0)]),
                                                         requires_grad=p.requires_grad))
        if not module.is_native:
            module.out_features //= n
            module._replan()
        gather, saved = self.gather_output, []

        def pre(mod, args):
            x = DTensor.from_local(args[0], mesh, [Replicate()], run_check=False)
            saved.extend(_swap_to_local(mod, ("weight", "bias")))
            return (x.to_local(grad_placements=[Partial()]), *args[1:])

        def post(mod, args, y):
            for name, p in saved:
                mod._parameters[name] = p
            saved.clear()
            if gather:
                last = Shard(y.dim() - 1)
                y = DTensor.from_local(y, mesh, [last], run_check=False).redistribute(mesh, [Replicate()])
                y = y.to_local()  # its gradient is whole on every rank: backward keeps this rank's slice
            return y

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post, always_call=True)
        return module


class QRowwiseParallel(ParallelStyle):
    """Row parallel: weight columns split over the mesh; input the local features; output summed
    over the ranks (replicated). No bias (it would be added once per rank)."""

    def __init__(self, *, root=None):
        super().__init__()
        self.root = root

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        if not _check_layer(module, type(self).__name__):
            return RowwiseParallel()._apply(module, mesh)
        n = mesh.size()
        if module.in_features % n:
            raise ValueError(f"row-parallel: {module.in_features} input features do not split over {n} ranks")
        if module.bias is not None:
            raise NotImplementedError("row-parallel QLinear with a bias: each rank's partial sum would add it")
        if module.is_native:
            split_native_tp(module, mesh, 1, self.root, type(self).__name__)
        else:
            module.register_parameter("weight", nn.Parameter(distribute_tensor(module.weight.data, mesh, [Shard(1)]),
                                                             requires_grad=module.weight.requires_grad))
            module.in_features //= n
            module._replan()
        saved = []

        def pre(mod, args):
            saved.extend(_swap_to_local(mod, ("weight",)))

        def post(mod, args, y):
            for name, p in saved:
                mod._parameters[name] = p
            saved.clear()
            y = DTensor.from_local(y, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()])
            return y.to_local()

        module.register_forward_pre_hook(pre)
        module.register_forward_hook(post, always_call=True)
        return module
