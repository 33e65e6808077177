"""Training on several processes: the device mesh, FSDP2 and tensor parallelism for `HybridLM`,
and the reductions a step needs across ranks.

Each process that ``torchrun --nproc-per-node N`` starts (one per GPU; on CPU, gloo) calls::

    dist  = init_distributed(ParallelConfig.from_config(cfg.parallel))   # torchrun's RANK, WORLD_SIZE, LOCAL_RANK
    model = shard_model(model, dist.mesh, pcfg)                          # after apply_policy, before the optimizer
    batches = RankBatches.for_rank(SegmentStreamer(tokens, B_global, T), dist)  # experiments.rank_data

A single process (no ``WORLD_SIZE``, or 1) creates no process group and no mesh, and every
function here leaves the model and the data as they are, but for two keys that also apply to it:
``activation_checkpoint`` and ``param_dtype`` (the same arithmetic as the ranks of a sharded run,
:func:`compute_in_param_dtype`).

The mesh is ``(dp,)`` or ``(dp, tp)`` with ``dp = world / tp`` (``dp: auto``). Parallelism is
applied to a built model in a fixed order, each step a small function:

1. tensor parallelism on the ``tp`` dimension (:func:`apply_tensor_parallel`): attention and FFN
   as Megatron pairs (q, k, v, up column-parallel; o, down row-parallel: one all-reduce per pair
   in forward and one in backward), the LSTM's ih and hh column-parallel with the gates
   all-gathered (every rank then runs the cheap elementwise recurrence on all of them);
2. native weights row-sharded over ``dp`` (:mod:`lowprec.distributed`): packed codes in the
   all-gather;
3. FSDP2 (``fully_shard``) over ``dp`` per unit: each ``blocks.N``, each ``rnn.lstm.N``,
   ``rnn.compressor``, ``fusion``, then the root (embeddings, final norm, head). On a 1-D mesh,
   latent weights whose format is quantized are all-gathered in that format when it can be
   (:mod:`lowprec.fsdp`), the rest in ``param_dtype``.

Gradients are averaged over ``dp`` (each rank's loss is the mean over its rows, all ranks hold as
many rows), so N ranks compute the gradient of the 1-process loss over the global batch.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections import Counter
from dataclasses import dataclass, field, fields
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import nn

from lowprec.distributed import all_gather_native, gather_native_on_forward, record_all_gathers, shard_native_layer
from lowprec.fsdp import lowbit_gather_weights
from lowprec.nn.native import NativeWeightMixin

__all__ = ["ParallelConfig", "Distributed", "init_distributed", "log_on_main_only", "shard_model", "units",
           "apply_tensor_parallel", "forward_order", "prefetch_units", "gather_bytes", "clip_grads_over_ranks_", "local_grads",
           "all_reduce_found_inf", "compute_in_param_dtype", "fsdp_groups", "DTYPES"]

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ------------------------------------------------------------------------------------ config

@dataclass(frozen=True)
class ParallelConfig:
    """The ``parallel`` config group (``configs/parallel/default.yaml`` documents each key)."""

    dp: int | str = "auto"
    tp: int = 1
    backend: str = "auto"
    param_dtype: str | None = None
    reduce_dtype: str | None = "fp32"
    reshard_after_forward: bool = True
    lowbit_gather: bool = True
    activation_checkpoint: bool = False
    prefetch: int = 1
    nccl_protocol: str | None = None
    blocks_per_unit: int | list[int] = 1

    def __post_init__(self):
        if not (self.dp == "auto" or (isinstance(self.dp, int) and not isinstance(self.dp, bool) and self.dp >= 1)):
            raise ValueError(f"parallel.dp={self.dp!r}: give auto (world size / tp) or an int >= 1")
        if isinstance(self.tp, bool) or not isinstance(self.tp, int) or self.tp < 1:
            raise ValueError(f"parallel.tp={self.tp!r}: give an int >= 1")
        if isinstance(self.prefetch, bool) or not isinstance(self.prefetch, int) or self.prefetch < 0:
            raise ValueError(f"parallel.prefetch={self.prefetch!r}: give an int >= 0 (units gathered ahead)")
        sizes = self.blocks_per_unit if isinstance(self.blocks_per_unit, (list, tuple)) else [self.blocks_per_unit]
        if not sizes or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in sizes):
            raise ValueError(f"parallel.blocks_per_unit={self.blocks_per_unit!r}: give an int >= 1 (blocks gathered "
                             "together) or a list of them (the sizes of consecutive groups, in block order)")
        if isinstance(self.blocks_per_unit, tuple):
            self.blocks_per_unit = list(self.blocks_per_unit)
        if self.nccl_protocol not in (None, "Simple", "LL", "LL128"):
            raise ValueError(f"parallel.nccl_protocol={self.nccl_protocol!r}; choose null (NCCL's choice), Simple, LL or LL128")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"parallel.backend={self.backend!r}; choose one of auto, nccl, gloo")
        for key in ("param_dtype", "reduce_dtype"):
            v = getattr(self, key)
            if v is not None and v not in DTYPES:
                raise ValueError(f"parallel.{key}={v!r}; choose null or one of {', '.join(DTYPES)}")

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "ParallelConfig":
        """From a dict or DictConfig; unknown keys are errors (typos)."""
        from lowprec.common import plain

        cfg = dict(plain(cfg) or {})
        known = {f.name for f in fields(cls)}
        if set(cfg) - known:
            raise ValueError(f"unknown parallel config keys {sorted(set(cfg) - known)}; valid keys: {sorted(known)}")
        return cls(**cfg)

    def layout(self, world_size: int) -> tuple[int, int]:
        """(dp, tp) for ``world_size`` processes; ``ValueError`` when they do not multiply to it."""
        dp = world_size // self.tp if self.dp == "auto" else self.dp
        if dp * self.tp != world_size:
            raise ValueError(f"parallel.dp={self.dp} x parallel.tp={self.tp} does not fill the {world_size} "
                             f"processes; choose tp dividing {world_size} and dp=auto (or dp x tp = {world_size})")
        return dp, self.tp


# --------------------------------------------------------------------------------- processes

@dataclass
class Distributed:
    """Where this process stands: ``mesh`` is None for a single process."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    dp: int = 1
    tp: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    mesh: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def dp_mesh(self):
        """The data-parallel mesh (1-D), or None for a single process."""
        if self.mesh is None:
            return None
        return self.mesh["dp"] if self.mesh.ndim > 1 else self.mesh

    @property
    def tp_mesh(self):
        return self.mesh["tp"] if self.mesh is not None and self.mesh.ndim > 1 else None

    @property
    def dp_group(self):
        """The process group of this rank's data-parallel peers (same tp rank), or None."""
        return None if self.mesh is None else self.dp_mesh.get_group()

    @property
    def dp_rank(self) -> int:
        return 0 if self.mesh is None else self.dp_mesh.get_local_rank()

    def describe(self) -> str:
        """One line for the log."""
        if self.mesh is None:
            return f"single process on {self.device} (no process group)"
        dims = " x ".join(f"{n}={s}" for n, s in zip(self.mesh.mesh_dim_names, self.mesh.shape))
        return (f"{self.world_size} processes ({self.backend}, {self.device.type}): mesh {dims}; "
                f"this is rank {self.rank} (dp rank {self.dp_rank}, local rank {self.local_rank})")


def init_distributed(cfg: ParallelConfig | None = None, *, device: str | torch.device | None = None) -> Distributed:
    """Join the process group that ``torchrun`` describes (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR``, ``MASTER_PORT``) and build the device mesh ``(dp,)`` or ``(dp, tp)``.

    Backend: nccl on CUDA (device ``cuda:LOCAL_RANK``), gloo on CPU (``parallel.backend`` overrides).
    Without ``WORLD_SIZE`` (or with 1) nothing is created: a single process, unchanged."""
    from torch.distributed.device_mesh import init_device_mesh

    cfg = cfg or ParallelConfig()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 and not dist.is_initialized():
        cfg.layout(1)  # tp > 1 in one process is a configuration error
        dev = torch.device(device) if device is not None else torch.device("cpu")
        return Distributed(device=dev)
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dp, tp = cfg.layout(world)
    use_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if backend == "nccl" and cfg.nccl_protocol and "NCCL_PROTO" not in os.environ:  # the environment wins
        # (FSDP2's ~100 MB gathers of the 600M model ran NCCL's LL protocol when NCCL chose)
        os.environ["NCCL_PROTO"] = cfg.nccl_protocol
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                device_id=dev if dev.type == "cuda" else None)
    shape, names = ((dp, tp), ("dp", "tp")) if tp > 1 else ((dp,), ("dp",))
    mesh = init_device_mesh(dev.type, shape, mesh_dim_names=names)
    return Distributed(rank, world, local_rank, dp, tp, dev, backend, mesh)


def log_on_main_only(d: Distributed, logger: logging.Logger | None = None) -> None:
    """Ranks other than 0 log warnings and errors only (every rank runs the same loop)."""
    if not d.is_main:
        (logger or logging.getLogger()).setLevel(logging.WARNING)


# ------------------------------------------------------------------------------------ sharding

def units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules FSDP2 gathers one at a time, innermost first, the root last: each ``blocks.N``,
    each ``rnn.lstm.N``, ``rnn.compressor``, ``fusion``, and the model itself. (``rnn`` itself is
    not one: the model calls its ``stream``/``chunked`` methods, not its forward.)"""
    out = [(f"blocks.{i}", b) for i, b in enumerate(model.blocks)]
    if getattr(model, "rnn", None) is not None:
        out += [(f"rnn.lstm.{i}", layer) for i, layer in enumerate(model.rnn.lstm)]
        out.append(("rnn.compressor", model.rnn.compressor))
    if getattr(model, "fusion", None) is not None:
        out.append(("fusion", model.fusion))
    out.append(("", model))
    return out


def fsdp_groups(model: nn.Module, blocks_per_unit: int | list[int] = 1) -> list[tuple[str, list[nn.Module]]]:
    """The modules each FSDP2 group gathers together, as (name, modules), the root last: the units
    of :func:`units`, with every ``blocks_per_unit`` consecutive blocks in one group
    (``blocks.0-3``): one all-gather, one reduce-scatter and one set of FSDP2 hooks for all of them.
    A list gives each group's size in block order (``[1, 11]``: the first block alone, then the
    other eleven together: the forward waits only for the first block's gather, the second group's
    gather running beside its compute, and the backward ends with one block's reduce-scatter); its
    sizes must add up to the number of blocks (``ValueError``)."""
    named = units(model)
    blocks = [m for n, m in named if n.startswith("blocks.")]
    if isinstance(blocks_per_unit, (list, tuple)):
        if sum(blocks_per_unit) != len(blocks):
            raise ValueError(f"parallel.blocks_per_unit={list(blocks_per_unit)} adds up to {sum(blocks_per_unit)} "
                             f"blocks; the model has {len(blocks)}")
        sizes = list(blocks_per_unit)
    else:
        sizes = [min(blocks_per_unit, len(blocks) - i) for i in range(0, len(blocks), blocks_per_unit)]
    groups: list[tuple[str, list[nn.Module]]] = []
    i = 0
    for k in sizes:
        part = blocks[i:i + k]
        j = i + k - 1
        groups.append((f"blocks.{i}" if j == i else f"blocks.{i}-{j}", part))
        i += k
    return groups + [(n, [m]) for n, m in named if not n.startswith("blocks.")]


def shard_model(model: nn.Module, mesh, cfg: ParallelConfig | None = None) -> nn.Module:
    """Apply tensor parallelism (when the mesh has a ``tp`` dimension), row-shard native weights and
    FSDP2-shard every unit over ``dp``, in that order (see the module doc); returns ``model``
    (changed in place: FSDP2 swaps the classes of the units). ``mesh`` None (one process): only
    ``cfg.activation_checkpoint`` and ``cfg.param_dtype`` (:func:`compute_in_param_dtype`) apply.

    Call after ``lowprec.apply_policy`` and moving the model to its device, before building the
    optimizer (it must see the sharded parameters and the native layers' shards)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    cfg = cfg or ParallelConfig()
    if cfg.activation_checkpoint:
        checkpoint_units(model)
    if mesh is None:
        if cfg.param_dtype is not None:
            compute_in_param_dtype(model, DTYPES[cfg.param_dtype])
        return model
    dp_mesh = mesh["dp"] if mesh.ndim > 1 else mesh
    if mesh.ndim > 1 and mesh["tp"].size() > 1:
        apply_tensor_parallel(model, mesh["tp"], root=mesh)
    named = units(model)
    owner = _owners(model, named)
    natives: dict[str, list[nn.Module]] = {}
    for name, mod in model.named_modules():
        if isinstance(mod, NativeWeightMixin) and mod.is_native:
            shard_native_layer(mod, dp_mesh, name)
            natives.setdefault(owner(name), []).append(mod)
    for unit_name, unit in named:
        if natives.get(unit_name):
            gather_native_on_forward(unit, natives[unit_name])
    # over one rank there is nothing to gather (FSDP2 then hands the shard over as it is)
    in_format = cfg.lowbit_gather and mesh.ndim == 1 and dp_mesh.size() > 1
    param_dtype = DTYPES.get(cfg.param_dtype) if cfg.param_dtype else None
    gathered = lowbit_gather_weights(model, dp_mesh.size(), param_dtype) if in_format else {}
    reduce_dtype = DTYPES.get(cfg.reduce_dtype) if cfg.reduce_dtype else None
    order = forward_order(model)
    last = order[-1] if order else None
    groups = [(n, mods) for n, mods in fsdp_groups(model, cfg.blocks_per_unit)
              if any(True for m in mods for _ in m.parameters())]
    for group_name, mods in groups:
        # the LSTM's carried (h, c) enter its forward: they stay in their own (>= fp32) dtype
        lstm = group_name.startswith("rnn.lstm.")
        mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=not lstm)
        # the root and the last unit the forward runs stay gathered: the backward starts with them
        keep = any(m is model or m is last for m in mods)
        fully_shard(_shard_target(model, mods), mesh=dp_mesh, mp_policy=mp,
                    reshard_after_forward=cfg.reshard_after_forward and not keep)
    if cfg.prefetch:
        prefetch_units(model, cfg.prefetch)
    # FSDP2 warns that the root returns views (logits, the memory bank): nothing here changes them in place
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    counts: dict[tuple[bool, str], int] = {}
    for how in gathered.values():
        counts[how] = counts.get(how, 0) + 1
    lowbit = ", ".join(f"{n} as {text}" for (ok, text), n in sorted(counts.items()) if ok) or "none"
    other = "; ".join(f"{n}: {text}" for (ok, text), n in sorted(counts.items()) if not ok)
    log.info("sharded over %s: %d FSDP2 units%s; %d native layers row-sharded (packed codes in the all-gather); "
             "latent weights all-gathered in their format: %s%s",
             " x ".join(f"{n}={s}" for n, s in zip(mesh.mesh_dim_names, mesh.shape)), len(groups),
             _blocks_per_unit_text(cfg.blocks_per_unit), sum(len(v) for v in natives.values()),
             lowbit, f"; in {cfg.param_dtype or 'their own dtype'}: {other}" if other else "")
    return model


def _shard_target(model: nn.Module, mods: list[nn.Module]):
    """What ``fully_shard`` is given for one group: the module itself; for all the blocks of a
    ``BlockStack`` (``model.blocks(x)`` runs them), the stack: FSDP2's hooks then wrap the stack
    alone, so a compiled step traces the blocks as one graph instead of breaking at each block's
    hooks; for other groups of several modules, their list (hooks on each)."""
    from hybrid.model import BlockStack

    if len(mods) == 1:
        return mods[0]
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, BlockStack) and len(mods) == len(blocks) and all(a is b for a, b in zip(mods, blocks)):
        return blocks
    return mods


def _fsdp_module(model: nn.Module, unit: nn.Module):
    """The FSDP2 module that gathers ``unit``: the unit, or the block stack sharded as one (see
    :func:`_shard_target`); None if neither is sharded."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(unit, FSDPModule):
        return unit
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, FSDPModule) and any(unit is b for b in blocks):
        return blocks
    return None


def _blocks_per_unit_text(bpu) -> str:
    if isinstance(bpu, list):
        return f" (blocks in groups of {', '.join(map(str, bpu))})"
    return f" ({bpu} blocks each)" if bpu > 1 else ""


def forward_order(model: nn.Module) -> list[nn.Module]:
    """The units the forward runs, in its order (the root, which runs around them, left out): the
    memory path (each LSTM layer, the compressor, the fusion), then the blocks."""
    named = dict(units(model))
    names = [n for n in named if n.startswith("rnn.")] + (["fusion"] if "fusion" in named else [])
    names += [n for n in named if n.startswith("blocks.")]
    return [named[n] for n in names if any(True for _ in named[n].parameters())]


def prefetch_units(model: nn.Module, k: int) -> None:
    """FSDP2 explicit prefetching: each unit's forward starts the all-gathers of the next ``k``
    units the forward runs, each unit's backward those of the ``k`` before it (the root starts
    the first ``k``). Without it the eager step gathers a unit when the host reaches it, which
    waits when the host is not ahead of the GPU; with it the gathers run one unit ahead, at the
    cost of ``k`` more units' gathered weights in memory."""
    from torch.distributed.fsdp import FSDPModule

    order, seen = [], set()
    for u in forward_order(model):  # one module per FSDP2 group (blocks gathered together share one state)
        u = _fsdp_module(model, u)
        if u is not None and id(u._get_fsdp_state()) not in seen:
            seen.add(id(u._get_fsdp_state()))
            order.append(u)
    if not order:
        return
    if isinstance(model, FSDPModule):
        model.set_modules_to_forward_prefetch(order[:k])
    for i, unit in enumerate(order):
        if order[i + 1:i + 1 + k]:
            unit.set_modules_to_forward_prefetch(order[i + 1:i + 1 + k])
        if order[max(0, i - k):i]:
            unit.set_modules_to_backward_prefetch(order[max(0, i - k):i][::-1])


def compute_in_param_dtype(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """One process's ``parallel.param_dtype``: every call of ``model`` computes with its floating
    parameters in ``dtype`` as the ranks of a sharded run do (FSDP2's ``MixedPrecisionPolicy
    (param_dtype=dtype)``): ``p.to(dtype)``, or, for a latent weight that the ranks all-gather in its
    format (:func:`lowprec.fsdp.lowbit_gather_weights`), its codes dequantized to ``dtype``
    (:func:`lowprec.fsdp.as_gathered`); differentiable, the gradient reaching the master in its own
    dtype. A latent weight that one ``QLinear`` alone reads is not swapped: the layer is told how it
    is gathered (``QLinear.gathered_as``), and where its kernel can, makes its operands from the master
    without the dequantized copy written out (the same numbers). Activations follow (embeddings and
    layers return ``dtype``); the LSTM's carried state keeps its own dtype. The tiny hybrid's gradients
    are bit-identical to 2 ranks' (tested). The parameters themselves (what the optimizer, the state
    dict and a checkpoint see) stay as they are.
    Two forward hooks on ``model`` swap the casts in and back (the second also when the forward
    raises); ``torch.compile`` traces them; a copy of the model (``copy.deepcopy``) keeps them.
    Returns ``model``. ``ValueError`` when applied twice. Blocks set to compile once
    (``model.compile_blocks_once``) are set back to compile apiece, with a warning."""
    from lowprec.fsdp import gathered_formats
    from lowprec.nn import QLinear

    if getattr(model, "_param_dtype", None) is not None:
        raise ValueError(f"the model already computes in {model._param_dtype}")
    once = [m for m in model.modules() if getattr(m, "compile_once", False)]
    if once:
        warnings.warn("model.compile_blocks_once does not apply with parallel.param_dtype on one process (the casts "
                      "swapped in are computed inside the compiled graph, which a nested compile region cannot take "
                      "as its blocks' weights): the blocks are compiled apiece, the same numbers", stacklevel=2)
        for m in once:
            m.compile_once = False
    model._param_dtype = dtype
    model._gather_formats = gathered_formats(model, dtype)
    readers = Counter(id(w) for m in model.modules() if isinstance(w := getattr(m, "weight", None), torch.Tensor))
    model._read_gathered = set()
    for name, fmt in model._gather_formats.items():
        layer = model.get_submodule(name.rpartition(".")[0])
        if (isinstance(layer, QLinear) and name.endswith(".weight") and readers[id(layer.weight)] == 1
                and layer.weight.dtype != dtype):
            layer.gathered_as = (fmt, dtype)
            model._read_gathered.add(name)
    model._params_in_forward = None
    model.register_forward_pre_hook(_params_in_dtype)
    model.register_forward_hook(_params_back, always_call=True)
    return model


def _params_in_dtype(module: nn.Module, args) -> None:
    """``compute_in_param_dtype``'s pre-forward hook: the casts swapped in for the parameters."""
    from torch.nn.utils._named_member_accessor import NamedMemberAccessor

    from lowprec.fsdp import as_gathered

    dtype, formats = module._param_dtype, module._gather_formats
    casts = {n: p.to(dtype) if formats.get(n) is None else as_gathered(p, formats[n], dtype)
             for n, p in module.named_parameters()
             if p.is_floating_point() and p.dtype != dtype and n not in module._read_gathered}
    module._params_in_forward, _ = NamedMemberAccessor(module).swap_tensors_dict(casts)


def _params_back(module: nn.Module, args, output) -> None:
    """``compute_in_param_dtype``'s forward hook (also after a forward that raised): the
    parameters swapped back."""
    from torch.nn.utils._named_member_accessor import NamedMemberAccessor

    originals = module._params_in_forward  # attribute reads and writes: torch.compile traces them (2.11 broke the
    module._params_in_forward = None       # graph on module.__dict__.pop)
    if originals is not None:
        NamedMemberAccessor(module).swap_tensors_dict(originals)


def checkpoint_units(model: nn.Module) -> list[str]:
    """Activation checkpointing at unit boundaries: each ``blocks.N`` and ``rnn.lstm.N`` keeps only
    its inputs from the forward and runs its forward again in the backward (``torch.distributed``'s
    composable ``checkpoint``: hooks, module names unchanged). Whatever a unit's layers save for
    their backward (activations, the quantized or decoded weight operands) then lives for one unit
    at a time. Random draws (dropout, stochastic rounding) are replayed as drawn. Returns the
    names of the checkpointed units."""
    from torch.distributed._composable import checkpoint

    names = [n for n, _ in units(model) if n.startswith(("blocks.", "rnn.lstm."))]
    for n in names:
        checkpoint(model.get_submodule(n))
    return names


def apply_tensor_parallel(model: nn.Module, tp_mesh, root=None) -> dict[str, str]:
    """Split the attention, FFN and LSTM weights of every block and LSTM layer over ``tp_mesh``
    (see the module doc); heads are divided among the ranks (``n_heads``, ``n_kv_heads`` become
    the local counts). Returns {module name: style}. The memory path (fusion, compressor), the
    embeddings and the head stay whole on every tensor-parallel rank. Native layers are split as
    packed codes (:mod:`lowprec.tensor_parallel`); ``root``: the (dp, tp) mesh ``tp_mesh`` belongs
    to (their checkpoint layout when the data-parallel ranks split them further)."""
    from torch.distributed.tensor.parallel import parallelize_module

    from lowprec.nn import QLinear
    from lowprec.precision import FULL_PRECISION
    from lowprec.tensor_parallel import QColwiseParallel, QRowwiseParallel

    n = tp_mesh.size()
    plan: dict[str, Any] = {}
    for i, blk in enumerate(model.blocks):
        attn = blk.attn
        if attn.n_heads % n or attn.n_kv_heads % n:
            raise ValueError(f"tensor parallel over {n} ranks needs n_heads ({attn.n_heads}) and n_kv_heads "
                             f"({attn.n_kv_heads}) divisible by {n}")
        for w in ("q", "k", "v"):
            plan[f"blocks.{i}.attn.{w}"] = QColwiseParallel(root=root)
        plan[f"blocks.{i}.attn.o"] = QRowwiseParallel(root=root)
        plan[f"blocks.{i}.ffn.up"] = QColwiseParallel(root=root)
        plan[f"blocks.{i}.ffn.down"] = QRowwiseParallel(root=root)
        attn.n_heads //= n
        attn.n_kv_heads //= n
    if getattr(model, "rnn", None) is not None:
        for i, layer in enumerate(model.rnn.lstm):
            # the recurrence splits the gates i, f, g, o by position: every rank needs all of them
            plan[f"rnn.lstm.{i}.ih"] = QColwiseParallel(gather_output=True, root=root)
            plan[f"rnn.lstm.{i}.hh"] = QColwiseParallel(gather_output=True, root=root)
            if type(layer.hh) is nn.Linear:
                # a plain hh runs its whole recurrence as one function of its weight, which a split
                # weight cannot enter: as an unquantized QLinear it is called (and split) per step
                layer.hh = QLinear.from_float(layer.hh, FULL_PRECISION)
    parallelize_module(model, tp_mesh, plan)
    return {k: type(v).__name__ + ("(gather_output)" if getattr(v, "gather_output", False) else "")
            for k, v in plan.items()}


def gather_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank receives in the all-gathers of each unit's forward, by unit name: FSDP2's
    (parameters, in the dtype or format they travel in) and the packed native weights. Measured by
    running exactly those collectives once (``FSDPModule.unshard`` and the native gather). Blocks
    sharded as one stack count under the first block's name (the others' FSDP2 bytes are 0)."""
    out = {}
    named = units(model)
    done = set()
    for name, unit in [named[-1], *named[:-1]]:  # the root first: its first unshard initializes FSDP2
        fsdp = _fsdp_module(model, unit)
        with record_all_gathers() as rec:
            if fsdp is not None and id(fsdp) not in done:  # the blocks sharded as one stack: counted at the first
                done.add(id(fsdp))
                fsdp.unshard()
                fsdp.reshard()
            if getattr(unit, "_native_layers", None):
                all_gather_native(unit._native_layers)
        out[name] = rec.received_bytes
    return out


def _owners(model: nn.Module, named: list[tuple[str, nn.Module]]):
    """``owner(module_name)``: the name of the innermost unit that holds it."""
    prefixes = sorted((n for n, _ in named if n), key=len, reverse=True)

    def owner(name: str) -> str:
        for p in prefixes:
            if name == p or name.startswith(p + "."):
                return p
        return ""

    return owner


# -------------------------------------------------------------------------- step reductions

def _copies(g, d: Distributed) -> int:
    """On how many of the ``d.world_size`` ranks each element of gradient ``g`` is held: a DTensor's
    replicated mesh dimensions times the ranks outside its mesh (FSDP2 over the dp sub-mesh of a
    (dp, tp) mesh: the tp ranks hold the same shards); a plain gradient (a native layer's rows,
    split over dp) on every tp rank, or on one where tensor parallelism split the layer."""
    from torch.distributed.tensor import DTensor, Replicate

    if not isinstance(g, DTensor):  # a native layer's: whole on every tp rank, unless split over them
        return 1 if getattr(g, "split_over_tp", False) else d.world_size // d.dp
    spec = g._spec
    key = (spec.mesh, spec.placements, d.world_size)  # one answer per layout: read at every step
    n = _COPIES_OF.get(key)
    if n is None:
        mesh = spec.mesh
        n = d.world_size // mesh.size()
        for size, p in zip(mesh.shape, spec.placements):
            if isinstance(p, Replicate):
                n *= size
        _COPIES_OF[key] = n
    return n


_COPIES_OF: dict[tuple, int] = {}  # (mesh, placements, world size) -> _copies' answer


_COPIES: dict[tuple[float, ...], torch.Tensor] = {}  # the ranks holding each gradient, as a device tensor


@torch.no_grad()
def clip_grads_over_ranks_(grads: list[torch.Tensor], max_norm: float | None, d: Distributed,
                           found_inf: torch.Tensor | None = None, factor: torch.Tensor | None = None):
    """:func:`experiments.loop.clip_grads_` for a model spread over the ranks of ``d``: ``‖g‖₂`` of
    the whole model's gradient as a 0-d float32 tensor on the device, every element counted once
    (each rank's local parts, divided by the ranks that hold copies of them, summed by one
    all-reduce over all ranks); with ``max_norm`` every local part multiplied by
    ``min(1, max_norm / (‖g‖₂ + 1e-6))``, a non-finite norm leaving them as they are. No host
    sync.

    ``factor`` (a 0-d tensor): the gradients are first taken as ``factor · g`` (norm and clipping
    included; one multiply of the local parts, folded into the clipping's). ``found_inf`` (this
    rank's 0-d float32 verdict, 1.0 = inf/NaN): agreed over all ranks in the same all-reduce as the
    norm (:func:`all_reduce_found_inf`'s answer, one collective instead of two); then the result is
    ``(found_inf, norm)``."""
    local = local_grads(grads)
    device = local[0].device if local else d.device
    if local:
        norms = torch.stack(torch._foreach_norm(local, 2.0, dtype=torch.float32))
        key = tuple(float(_copies(g, d)) for g in grads)
        copies = _COPIES.get(key)
        if copies is None or copies.device != norms.device:  # once per layout: a copy to the device waits for the host
            copies = _COPIES[key] = torch.tensor(key, device=norms.device)
        sq = (norms.square() / copies).sum()
    else:
        sq = torch.zeros((), device=device)
    if found_inf is not None:  # sum of the verdicts and of the squares in one all-reduce
        both = torch.stack([found_inf.reshape(()).to(device, torch.float32), sq])
        if dist.is_initialized():
            dist.all_reduce(both)
        found_inf, sq = (both[0] > 0).float(), both[1]
    elif dist.is_initialized():
        dist.all_reduce(sq)
    norm = sq.sqrt()
    if factor is not None:
        norm = norm * factor
    scale = factor
    if max_norm:
        clip = torch.where(torch.isfinite(norm), torch.clamp(max_norm / (norm + 1e-6), max=1.0), 1.0)
        scale = clip if scale is None else scale * clip
    if local and scale is not None:
        torch._foreach_mul_(local, scale)
    return norm if found_inf is None else (found_inf, norm)


def local_grads(grads) -> list[torch.Tensor]:
    """Each gradient's part on this rank (a DTensor's local shard; a native layer's rows already
    are): what ``LossScaler.unscale_and_check_`` and other elementwise passes work on."""
    from torch.distributed.tensor import DTensor

    # the local tensor itself: ``to_local()`` with autograd on (as in a training step) goes through an
    # autograd function per tensor, ~5 us of host time each, for the same memory
    return [g._local_tensor if isinstance(g, DTensor) else g for g in grads]


def all_reduce_found_inf(found_inf, group=None):
    """Whether any rank saw an inf/NaN gradient (each checks only its shards), so that all ranks
    skip the step together and keep the same loss scale. A tensor flag (``LossScaler.
    unscale_and_check_``'s 0-d float32, 1.0 = inf/NaN) is reduced in place on its device and
    returned (no host sync); a bool gives a bool."""
    if isinstance(found_inf, torch.Tensor):
        if dist.is_initialized():
            dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        return found_inf
    device = "cpu"
    if dist.is_initialized() and dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    flag = torch.tensor(float(bool(found_inf)), device=device)
    return bool(all_reduce_found_inf(flag, group) > 0)
