"""Each data-parallel rank's rows: of every batch, and of the state a TBPTT run carries.

With N ranks and a global batch of B rows (B a multiple of N), rank r reads rows
``[r B/N, (r+1) B/N)`` of every batch the 1-process run reads, so the N ranks together read
exactly its batches, in its order, and (each rank's loss the mean over its rows, gradients averaged
over the ranks) follow its loss curve. The position in the data is the same on every rank and does
not depend on N: a run resumes at another number of ranks.

The hybrid state carried between TBPTT segments holds one row per stream (``h``, ``c``: dim 1;
``memory``, ``pending``: dim 0); :func:`gather_state_rows` makes the 1-process state of the
global batch from the ranks' rows (for a checkpoint), :func:`state_rows` takes a rank's rows back.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

import torch
import torch.distributed as dist

__all__ = ["RankBatches", "gather_state_rows", "state_rows"]

_ROW_DIM = {"h": 1, "c": 1, "memory": 0, "pending": 0}  # HybridState fields with one row per stream


class RankBatches:
    """This rank's rows of a token source's global batch. ``source``: a ``SegmentStreamer`` or a
    ``TokenBatcher`` built with the GLOBAL batch size; ``state_dict`` is its position."""

    def __init__(self, source, rank: int = 0, world: int = 1):
        if source.batch_size % world:
            raise ValueError(f"global batch {source.batch_size} rows do not split over {world} data-parallel ranks; "
                             f"choose train.batch_size as a multiple of {world}")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, {world})")
        self.source, self.rank, self.world = source, rank, world
        self.rows = slice(rank * source.batch_size // world, (rank + 1) * source.batch_size // world)

    @classmethod
    def for_rank(cls, source, d) -> "RankBatches":
        """For the data-parallel rank of ``d`` (an ``experiments.parallel.Distributed``)."""
        return cls(source, d.dp_rank, d.dp)

    @property
    def batch_size(self) -> int:
        """Rows per rank."""
        return self.source.batch_size // self.world

    def __iter__(self) -> Iterator:
        return self

    def __next__(self):
        # every rank cuts the global batch (B x T token ids: nothing next to a step)
        batch = next(self.source)
        return tuple(t[self.rows] if isinstance(t, torch.Tensor) else t for t in batch)

    def __getattr__(self, name):  # segments_per_epoch, batches_per_epoch, seq_len, ...
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def state_dict(self) -> dict[str, int]:
        return self.source.state_dict()

    def load_state_dict(self, state) -> None:
        self.source.load_state_dict(state)


@torch.no_grad()
def _all_gather_rows(t: torch.Tensor, dim: int, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    rows = t.detach().movedim(dim, 0).contiguous()
    out = rows.new_empty((world * rows.shape[0], *rows.shape[1:]))
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, rows, group=group)
    return out.movedim(0, dim)


def gather_state_rows(state, group=None):
    """The carried state of the global batch: every rank's rows, in rank order, detached (what a
    checkpoint stores; a collective: every rank of ``group`` calls it). Without a process group,
    ``state`` itself."""
    if state is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return state
    return replace(state, **{k: _all_gather_rows(getattr(state, k), d, group)
                             for k, d in _ROW_DIM.items() if getattr(state, k) is not None})


def state_rows(state, rank: int, world: int):
    """Rank ``rank``'s rows (of ``world``) of a carried state of the global batch."""
    if state is None or world == 1:
        return state
    out = {}
    for k, d in _ROW_DIM.items():
        t = getattr(state, k)
        if t is not None:
            n = t.shape[d] // world
            out[k] = t.narrow(d, rank * n, n)
    return replace(state, **out)
