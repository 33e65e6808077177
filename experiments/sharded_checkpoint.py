"""Sharded checkpoints with ``torch.distributed.checkpoint`` (DCP): every rank writes its own
shards, and a checkpoint loads at any number of ranks (2 -> 1, 1 -> 2, ...).

    save_sharded(run_dir / "checkpoints" / "dcp-00000300", model, optimizer, extra)
    extra = load_sharded(path, model, optimizer)        # the same model, optimizer, any world size
    export_single_file(path, "ckpt-00000300.pt")        # one file, as experiments.checkpoint writes
    import_single_file(payload, path, model, optimizer) # and back: a one-file checkpoint for N ranks
    read_extra(path)                                    # step, config, ... without loading the model

Layout (a DCP directory: ``.metadata`` plus one ``__<rank>_<n>.distcp`` file per rank)::

    model.<name>                        the model's state_dict: FSDP2 parameters (DTensors),
                                        native layers' packed rows (DTensors over dp), buffers
    optim.<part>.state.<target>.<key>   each optimizer part's state, keyed by the NAME of the
                                        parameter or native layer it belongs to (not by position),
                                        a native layer's per-element state sharded like its rows,
                                        SRAdamW's moments of an FSDP2 Parameter sharded like it
                                        (fp8 moments as their fp32 values, which split at any row)
    optim.<part>.info                   the part's kind, seed, and per param group its
                                        hyperparameters, its targets' names and whole shapes
    extra                               anything else (step, config, meta, scheduler, scaler, data
                                        position): tensors and plain values, the same on every rank,
                                        ``torch.save``-d into one uint8 tensor (written once)
    rng.<rank>                          each rank's RNG states, likewise

Atomic: all ranks write into ``.<name>.tmp-<token>`` next to ``path``; only when every rank has
finished does rank 0 rename it to ``path`` (a checkpoint already there is first renamed aside and
removed after). A save that dies part-way leaves only a temporary directory, which nothing loads
and the next save removes; the previous checkpoints stay loadable. Should it die between the two
renames, :func:`load_sharded` finds the set-aside one.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn

from lowprec.distributed import native_dtensor, native_full_shape, native_layout, native_local_piece, native_state_view
from lowprec.fsdp import unwrap_lowbit

from .checkpoint import rng_state, save_checkpoint, set_rng_state

__all__ = [
    "checkpoint_state",
    "export_single_file",
    "import_single_file",
    "load_sharded",
    "read_extra",
    "save_sharded",
    "sharded_checkpoints",
]

log = logging.getLogger(__name__)

_NAME = re.compile(r"^dcp-(\d{8,})$")  # a run's sharded checkpoints: checkpoints/dcp-<step:08d>/


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _broadcast(value):
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def _single_process_quiet():
    """DCP warns at every save/load without a process group; one process is a supported case here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ the model

def _model_state(model: nn.Module) -> dict[str, Any]:
    """The model's state_dict, each tensor sharing storage with the model (DCP loads in place)."""
    return {k: unwrap_lowbit(v) for k, v in model.state_dict().items()}


# -------------------------------------------------------------------------- the optimizer

def _parts(optimizer) -> dict[str, torch.optim.Optimizer]:
    return dict(getattr(optimizer, "parts", None) or {"optimizer": optimizer})


def _targets(opt) -> list:
    """The optimizer's targets in the numbering of its state_dict."""
    if hasattr(opt, "targets"):
        return opt.targets()
    return [p for g in opt.param_groups for p in g["params"]]


def _names(model: nn.Module) -> dict[int, str]:
    names = {id(m): n for n, m in model.named_modules()}
    names.update({id(p): n for n, p in model.named_parameters()})
    return names


def _whole_shape(t) -> list[int]:
    if isinstance(t, nn.Module):  # a native layer: the weight's shape before any split
        return list(native_full_shape(t))
    return list(t.shape)


def _native_state_dtensor(layer, v: torch.Tensor):
    """A native layer's optimizer-state tensor as the DCP entry: per-element state (momenta) and
    per-row state laid out like the layer's pieces (``lowprec.distributed.native_layout``) as a
    DTensor of the whole layer's shape; per-tensor state (one number) as it is."""
    return native_dtensor(layer, native_state_view(layer, v), "state")


def _param_state_dtensor(p, v: torch.Tensor):
    """A target optimizer's state tensor of a sharded Parameter ``p`` (kept per local shard) as the
    DCP entry: a tensor of the shard's shape as a DTensor placed like ``p``; anything else as it is."""
    from torch.distributed.tensor import DTensor

    if not isinstance(p, DTensor) or tuple(v.shape) != tuple(p.to_local().shape):
        return v
    return DTensor.from_local(v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def _entry(opt, t, entry: dict, shape=None) -> dict:
    """A target's optimizer state in its checkpoint form: a target optimizer's moments of a
    Parameter in a form that any number of ranks can split (``dense_state``), where it has one."""
    if hasattr(opt, "dense_state") and not isinstance(t, nn.Module):
        return opt.dense_state(t, entry, shape)
    return entry


def _optim_state(model: nn.Module, optimizer) -> dict[str, Any]:
    names = _names(model)
    out: dict[str, Any] = {}
    for part, opt in _parts(optimizer).items():
        sd = opt.state_dict()
        targets = _targets(opt)
        state = {}
        for index, entry in sd["state"].items():
            t = targets[int(index)]
            native = isinstance(t, nn.Module)
            dtensor = _native_state_dtensor if native else _param_state_dtensor if hasattr(opt, "targets") else None
            state[names[id(t)]] = {k: (dtensor(t, v) if dtensor else unwrap_lowbit(v))
                                   if isinstance(v, torch.Tensor) else v for k, v in _entry(opt, t, entry).items()}
        members = [[names[id(t)] for t in _group_members(g)] for g in opt.param_groups]
        groups = []
        for g, saved, who in zip(opt.param_groups, sd["param_groups"], members):
            hyper = {k: v for k, v in saved.items() if k not in ("params", "targets", "shapes")}
            groups.append({"hyper": hyper, "targets": who,
                           "shapes": [_whole_shape(t) for t in _group_members(g)]})
        info = {"kind": "target" if hasattr(opt, "targets") else "torch", "groups": groups, "seed": sd.get("seed")}
        out[part] = {"state": state, "info": _to_bytes(info)}
    return out


def _group_members(g: dict) -> list:
    return [*g["layers"], *g["tensors"]] if "layers" in g else list(g["params"])


def _to_bytes(value) -> torch.Tensor:
    buf = io.BytesIO()
    torch.save(value, buf)
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _from_bytes(t: torch.Tensor):
    return torch.load(io.BytesIO(t.numpy().tobytes()), map_location="cpu", weights_only=True)


def checkpoint_state(model: nn.Module, optimizer=None, extra: dict | None = None, *, rng: bool = True) -> dict:
    """The dict DCP writes (see the module doc)."""
    state: dict[str, Any] = {"model": _model_state(model), "extra": _to_bytes(dict(extra or {}))}
    if optimizer is not None:
        state["optim"] = _optim_state(model, optimizer)
    if rng:
        state[f"rng.{_rank()}"] = _to_bytes(rng_state())
    return state


# --------------------------------------------------------------------------------- saving

def save_sharded(path: str | Path, model: nn.Module, optimizer=None, extra: dict | None = None, *,
                 rng: bool = True) -> Path:
    """Write a sharded checkpoint to the directory ``path``, atomically (module doc). Every rank
    calls it with its own shards; ``extra`` holds plain values, the same on every rank."""
    path = Path(path)
    token = _broadcast(uuid.uuid4().hex[:12] if _rank() == 0 else None)
    tmp = path.with_name(f".{path.name}.tmp-{token}")
    if _rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(path)
    _barrier()
    state = checkpoint_state(model, optimizer, extra, rng=rng)
    try:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        _barrier()
    except BaseException:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if _rank() == 0:
        old = path.with_name(f".{path.name}.old-{token}")
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return path


def _remove_stale(path: Path) -> None:
    """Temporary directories of saves of ``path`` that never finished."""
    for p in path.parent.glob(f".{path.name}.tmp-*"):
        shutil.rmtree(p, ignore_errors=True)


def _resolve(path: Path) -> Path:
    if (path / ".metadata").exists():
        return path
    aside = sorted(path.parent.glob(f".{path.name}.old-*"), key=lambda p: p.stat().st_mtime)
    for p in reversed(aside):  # a save died between its two renames: the previous one stands
        if (p / ".metadata").exists():
            return p
    raise FileNotFoundError(f"no sharded checkpoint at {str(path)!r} (a DCP directory with a .metadata file)")


# -------------------------------------------------------------------------------- loading

def _metadata(path: Path):
    return dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata


def _template(key: str, meta, like: torch.Tensor | None):
    """An empty tensor to load ``key`` into: shaped like ``like`` (a DTensor keeps its placement)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not isinstance(meta, TensorStorageMetadata):
        return None  # a plain value: DCP replaces the placeholder
    if like is not None:
        if tuple(like.shape) != tuple(meta.size):
            raise ValueError(f"checkpoint entry {key} has shape {tuple(meta.size)}, this run expects {tuple(like.shape)}")
        return torch.empty_like(like, dtype=meta.properties.dtype)
    return torch.empty(meta.size, dtype=meta.properties.dtype)


def _optim_template(model: nn.Module, optimizer, meta: dict) -> dict[str, Any]:
    """What to load the optimizer state into, from the checkpoint's entries: each tensor placed
    like the target it belongs to at THIS world size."""
    modules, params = dict(model.named_modules()), dict(model.named_parameters())
    out: dict[str, Any] = {}
    for part in _parts(optimizer):
        prefix = f"optim.{part}."
        keys = [k for k in meta if k.startswith(prefix)]
        if not keys:
            raise ValueError(f"the checkpoint holds no state for optimizer part {part!r}")
        state: dict[str, dict] = {}
        for key in keys:
            rest = key[len(prefix):]
            if not rest.startswith("state."):
                continue
            target, field = rest[len("state."):].rsplit(".", 1)
            like = None
            if target in modules and getattr(modules[target], "is_native", False):
                size = tuple(meta[key].size) if hasattr(meta[key], "size") else ()
                like = _native_like(modules[target], size, meta[key])
            elif target in params:
                p = unwrap_lowbit(params[target])
                if hasattr(meta[key], "size") and tuple(meta[key].size) == tuple(p.shape):
                    like = p
            state.setdefault(target, {})[field] = _template(key, meta[key], like)
        out[part] = {"state": state, "info": _template(prefix + "info", meta[prefix + "info"], None)}
    return out


def _native_like(layer, size: tuple, meta):
    """A DTensor of ``size`` laid out like ``layer``'s pieces (the inverse of _native_state_dtensor),
    or None where the state is whole on every rank."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if len(size) == 0:
        return None
    layout = native_layout(layer, torch.empty(_local_shape(layer, size), device="meta"), "state")
    if layout is None or tuple(layout[2]) != tuple(size):
        return None
    mesh, placements, shape = layout
    mine, _ = compute_local_shape_and_global_offset(shape, mesh, placements)
    return DTensor.from_local(torch.empty(mine, dtype=meta.properties.dtype), mesh, placements, run_check=False,
                              shape=shape, stride=torch.empty(shape, device="meta").stride())


def _local_shape(layer, size: tuple) -> tuple[int, ...]:
    """The shape a state tensor of whole shape ``size`` has on this rank: per element as the
    weight, one row (per-row state, or per-element state flattened), rows (or row groups) first."""
    rows, cols = layer._w_shape
    full_rows, full_cols = native_full_shape(layer)
    if tuple(size) == (full_rows, full_cols):
        return rows, cols
    if len(size) > 1 and size[0] == 1:
        return 1, size[1] * rows // full_rows
    return (size[0] * rows // full_rows, *size[1:])


def _restore_optimizer(model: nn.Module, optimizer, loaded: dict) -> None:
    from torch.distributed.tensor import DTensor

    names = _names(model)
    parts = {}
    for part, opt in _parts(optimizer).items():
        saved = dict(loaded[part], **_from_bytes(loaded[part]["info"]))
        sd = opt.state_dict()
        targets = _targets(opt)
        index = {names[id(t)]: i for i, t in enumerate(targets)}
        if [g["targets"] for g in saved["groups"]] != [[names[id(t)] for t in _group_members(g)]
                                                      for g in opt.param_groups]:
            raise ValueError(f"optimizer part {part!r}: the checkpoint's param groups hold other targets than "
                             "this optimizer's (build it from the same model, policy and config)")
        state = {}
        per_shard = hasattr(opt, "targets")  # a target optimizer keeps every state per local shard
        for name, entry in saved["state"].items():
            t = targets[index[name]]
            state[index[name]] = {k: (v.to_local() if per_shard and isinstance(v, DTensor) else _tp_piece(t, v))
                                  for k, v in entry.items()}
        groups = []
        for current, g in zip(sd["param_groups"], saved["groups"]):
            merged = dict(current)
            merged.update(g["hyper"])
            groups.append(merged)
        new = {"state": state, "param_groups": groups}
        if saved.get("seed") is not None:
            new["seed"] = saved["seed"]
        parts[part] = new
    if hasattr(optimizer, "parts"):
        optimizer.load_state_dict({"parts": parts})
    else:
        optimizer.load_state_dict(parts["optimizer"])


def _tp_piece(target, v):
    """A whole per-element state tensor (saved without tensor parallelism) loaded for a native layer
    that tensor parallelism split: this rank's piece of it; anything else as it is."""
    if not (isinstance(target, nn.Module) and getattr(target, "_native_tp", None) is not None
            and isinstance(v, torch.Tensor)):
        return v
    R, K = native_full_shape(target)
    if v.numel() != R * K or v.numel() == 1:
        return v
    rows, cols = target._w_shape
    return native_local_piece(target, v.reshape(R, K), torch.empty(rows, cols, device="meta"), "state")


def load_sharded(path: str | Path, model: nn.Module, optimizer=None, *, rng: bool = True) -> dict[str, Any]:
    """Load a :func:`save_sharded` checkpoint into ``model`` (and ``optimizer``), built and sharded
    as in the run that continues (at any world size); returns its ``extra``. Each rank's RNG
    states are restored when the world size is the one that saved."""
    path = _resolve(Path(path))
    meta = _metadata(path)
    state: dict[str, Any] = {"model": _model_state(model), "extra": _template("extra", meta["extra"], None)}
    if optimizer is not None:
        state["optim"] = _optim_template(model, optimizer, meta)
    rng_key = f"rng.{_rank()}"
    same_world = {k.split(".")[1] for k in meta if k.startswith("rng.")} == {str(r) for r in range(_world())}
    if rng and same_world:
        state[rng_key] = _template(rng_key, meta[rng_key], None)
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    model.load_state_dict(state["model"])
    if optimizer is not None:
        _restore_optimizer(model, optimizer, state["optim"])
    if rng and same_world:
        set_rng_state(_from_bytes(state[rng_key]))
    elif rng:
        log.info("checkpoint %s was written by another number of ranks: RNG states start fresh", path)
    return _from_bytes(state["extra"])


# -------------------------------------------------------------------------------- export

def _index_optimizer(optim_state: dict) -> dict[str, Any]:
    """The FQN-keyed optimizer state as the 1-process optimizer's own state_dict."""
    parts = {}
    for part, saved in optim_state.items():
        saved = dict(saved, **_from_bytes(saved["info"]))
        order = [name for g in saved["groups"] for name in g["targets"]]
        index = {name: i for i, name in enumerate(order)}
        state = {index[name]: entry for name, entry in saved["state"].items()}
        groups, start = [], 0
        for g in saved["groups"]:
            members = list(range(start, start + len(g["targets"])))
            start += len(g["targets"])
            entry = dict(g["hyper"])
            if saved["kind"] == "target":
                entry.update(targets=members, shapes=g["shapes"])
            else:
                entry["params"] = members
            groups.append(entry)
        sd = {"state": state, "param_groups": groups}
        if saved.get("seed") is not None:
            sd["seed"] = saved["seed"]
        parts[part] = sd
    return {"parts": parts} if set(parts) != {"optimizer"} else parts["optimizer"]


def export_single_file(dcp_dir: str | Path, out: str | Path) -> Path:
    """Write the sharded checkpoint ``dcp_dir`` as ONE file in :mod:`experiments.checkpoint`'s format
    (``{"format": 1, "step", "model", "optimizer", <extra keys>}``, atomic, digest-checked), so that
    ``experiments.evaluate`` and a 1-process ``experiments.train`` resume read it. Runs in one
    process (it holds the whole model): call it on rank 0 only."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    src = _resolve(Path(dcp_dir))
    out = Path(out)
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        flat = Path(tmp) / "whole.pt"
        dcp_to_torch_save(src, flat)
        whole = torch.load(flat, map_location="cpu", weights_only=False)
    payload: dict[str, Any] = {"format": 1}
    payload.update(_from_bytes(whole["extra"]))
    payload.setdefault("step", 0)
    payload["model"] = whole["model"]
    if "optim" in whole:
        payload["optimizer"] = _index_optimizer(whole["optim"])
    if "rng.0" in whole:
        payload.setdefault("rng", _from_bytes(whole["rng.0"]))
    return save_checkpoint(out, payload)


# ------------------------------------------------------------------- a run's checkpoints

def sharded_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every finished sharded checkpoint ``dcp-<step>`` (one holding ``.metadata``)
    in ``directory``, oldest first. Temporary directories of saves that never finished are not
    listed."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and (p / ".metadata").exists()]
    return sorted(found)


def read_extra(path: str | Path) -> dict[str, Any]:
    """The ``extra`` of the sharded checkpoint at ``path``, read by this process alone (no
    collective, no model): what a run checks before loading it. ``FileNotFoundError`` when there is
    none; a damaged one raises what DCP raises."""
    path = _resolve(Path(path))
    state = {"extra": _template("extra", _metadata(path)["extra"], None)}
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return _from_bytes(state["extra"])


def _name_optimizer(model: nn.Module, optimizer, saved: dict) -> dict[str, Any]:
    """A 1-process optimizer state_dict (targets numbered) keyed by the targets' names, as
    :func:`_optim_state` writes it; ``optimizer`` (built on ``model``, sharded or not) names them."""
    names = _names(model)
    by_part = saved.get("parts", {"optimizer": saved})
    out: dict[str, Any] = {}
    for part, opt in _parts(optimizer).items():
        if part not in by_part:
            raise ValueError(f"the checkpoint holds no state for optimizer part {part!r}")
        sd = by_part[part]
        targets = _targets(opt)
        order = [names[id(t)] for t in targets]
        state = {order[int(i)]: _entry(opt, targets[int(i)], dict(entry), _whole_shape(targets[int(i)]))
                 for i, entry in sd["state"].items()}
        groups = []
        for now, g in zip(opt.param_groups, sd["param_groups"]):
            members = g["targets"] if "targets" in g else g["params"]
            groups.append({"hyper": {k: v for k, v in g.items() if k not in ("params", "targets", "shapes")},
                           "targets": [order[int(i)] for i in members],
                           "shapes": [_whole_shape(t) for t in _group_members(now)]})
        info = {"kind": "target" if hasattr(opt, "targets") else "torch", "groups": groups, "seed": sd.get("seed")}
        out[part] = {"state": state, "info": _to_bytes(info)}
    return out


def import_single_file(payload: dict[str, Any], path: str | Path, model: nn.Module, optimizer=None) -> Path:
    """Write ``payload`` (a checkpoint of :mod:`experiments.checkpoint`: one process's whole model
    and optimizer) as a sharded checkpoint at ``path``, which :func:`load_sharded` then loads at any
    number of ranks: the inverse of :func:`export_single_file`. ``model`` and ``optimizer`` are the
    ones that will load it (sharded or not); only the names of the optimizer's targets are taken
    from them. Runs in this process alone (no collective): call it on one rank. The directory
    appears complete or not at all (written under a temporary name, then renamed)."""
    path = Path(path)
    state: dict[str, Any] = {
        "model": dict(payload["model"]),
        "extra": _to_bytes({k: v for k, v in payload.items() if k not in ("model", "optimizer", "rng")})}
    if optimizer is not None and "optimizer" in payload:
        state["optim"] = _name_optimizer(model, optimizer, payload["optimizer"])
    if "rng" in payload:
        state["rng.0"] = _to_bytes(payload["rng"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with _single_process_quiet():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=True)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
