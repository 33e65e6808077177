"""Replaying a loop of small kernels as one CUDA graph.

A recurrence runs one small GEMM and a few pointwise kernels per step; at a modest width the GPU
finishes each in microseconds while Python needs tens to launch it, so the loop is bound by the
host. :class:`GraphCache` captures such a function once per signature of its inputs and replays it
afterwards: the host then launches one graph per call instead of every kernel of every step.

What a replay reads and writes:

- ``copied`` inputs (activations, incoming gradients) are copied into buffers the graph owns, so
  the caller may pass new tensors at every call;
- ``fixed`` inputs (weights) are read where they are: the signature holds their addresses, so a
  weight updated in place is read as it is now, and a weight that moved gets a graph of its own;
- every output is copied out of the graph's memory, so nothing a caller keeps is overwritten by a
  later replay (the graphs of a process share one memory pool).

Random numbers drawn inside the graph (stochastic rounding) come from PyTorch's CUDA generator,
which advances at every replay, so a replay does not repeat the previous call's draws. Weight
operands derived inside the capture are shared by its steps (:func:`lowprec.gemm.shared_operands`),
so a replay quantizes each weight once, as the eager loop does through the layer's cache.

The first call of a signature runs the function as is (its warm-up: lazy initialisation, compiled
kernels); the second captures it and replays; later calls replay. A signature whose copied inputs
exceed ``max_bytes`` is never captured (its kernels are large enough that launching them is not
the bottleneck, and the copies would cost memory). Weights that move between calls (a sharded
model gathers them into new memory for each use) would need a graph per call: after the fixed
inputs of one shape have moved twice, a cache copies them too, into buffers of the graph (one
copy of each weight per call, and the graph's own copy of it in memory; weights and copied inputs
together within ``max_bytes``). A cache never holds more than ``max_graphs`` graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .gemm import shared_operands

_POOLS: dict[int, tuple] = {}  # device index -> the memory pool the graphs on it share


def _pool(device: torch.device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _POOLS:
        _POOLS[index] = torch.cuda.graph_pool_handle()
    return _POOLS[index]


def _signature(t: torch.Tensor | None, strides: bool):
    if t is None:
        return None
    sig = (tuple(t.shape), t.dtype, t.device)
    return (*sig, t.stride()) if strides else sig


class _Graph:
    """``fn(*copied, *fixed)`` captured; ``copied`` are copied into buffers at each call, the last
    ``strided`` of them into buffers of their own strides (weights copied in), the others contiguous.
    ``first``: what the warm-up run returned, with ``keep_first``."""

    def __init__(self, fn, copied, fixed, strided: int = 0, keep_first: bool = False):
        first = len(copied) - strided
        self.inputs = [None if t is None else torch.empty_like(t) if i >= first
                       else torch.empty_like(t, memory_format=torch.contiguous_format)
                       for i, t in enumerate(copied)]
        self._load(copied)
        stream = torch.cuda.Stream(device=self._device(copied, fixed))
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), shared_operands():  # warm-up on the capture stream
            warm = fn(*self.inputs, *fixed)
        # ``keep_first``: the warm-up's results are this call's (a function that writes its fixed inputs has
        # done this call's work in its warm-up)
        self.first = warm if keep_first else None
        del warm
        self.graph = torch.cuda.CUDAGraph()
        # the fixed inputs are not kept: a later call of this signature passes a tensor at each address
        with torch.cuda.graph(self.graph, pool=_pool(stream.device), stream=stream,
                              capture_error_mode="thread_local"), shared_operands():
            out = fn(*self.inputs, *fixed)
        torch.cuda.current_stream().wait_stream(stream)
        self.outputs, self.spec = tree_flatten(out)

    @staticmethod
    def _device(copied, fixed) -> torch.device:
        return next(t.device for t in (*copied, *fixed) if t is not None)

    def _load(self, copied) -> None:
        for buf, t in zip(self.inputs, copied):
            if buf is not None:
                buf.copy_(t)

    def __call__(self, copied):
        self._load(copied)
        self.graph.replay()
        return tree_unflatten([o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs], self.spec)


class GraphCache:
    """``cache(fn, copied, fixed, key)`` -> ``fn(*copied, *fixed)``, run as a CUDA graph from the
    second call of the same signature on (see the module doc). ``key``: whatever else ``fn``'s
    work depends on (flags, dtypes), hashable. ``fn`` must launch the same kernels for the same
    signature, make no host synchronisation and return tensors (in any nesting of tuples and lists)
    or Nones.

    ``mutating``: ``fn`` writes its fixed inputs in place (an optimizer's state): they are never
    copied in (fixed inputs at new addresses get a graph of their own, up to ``max_graphs``; past it
    ``fn`` runs as it is), and the call that captures a graph is the graph's warm-up run, which does
    that call's work, and is not also replayed. A replay bumps the fixed inputs' version counters,
    as an in-place op would: whatever keys on them (a layer's operand cache) sees the new values.

    ``captures``, ``replays`` and ``moves`` (of the fixed inputs; from 2 on, they are copied in)
    count what happened. A cache is dropped, not copied, with a copy of its owner
    (``copy.deepcopy`` and pickling give an empty one)."""

    def __init__(self, max_graphs: int = 16, max_bytes: int = 1 << 30, mutating: bool = False):
        self.max_graphs, self.max_bytes, self.mutating = max_graphs, max_bytes, mutating
        self._graphs: dict = {}
        self._seen: set = set()
        self._addresses: dict = {}  # signature without addresses -> the fixed inputs' addresses last seen
        self.captures = self.replays = self.moves = 0

    def __reduce__(self):
        return type(self), (self.max_graphs, self.max_bytes, self.mutating)

    def __call__(self, fn: Callable, copied: Sequence[torch.Tensor | None], fixed: Sequence[torch.Tensor | None],
                 key: Hashable):
        # buffers made under inference mode cannot be written outside it: a graph of its own there
        shapes = (key, torch.is_inference_mode_enabled(), tuple(_signature(t, False) for t in copied),
                  tuple(_signature(t, True) for t in fixed))
        if self.moves < 2 or self.mutating:
            addresses = tuple(None if t is None else t.data_ptr() for t in fixed)
            if self._addresses.setdefault(shapes, addresses) != addresses and not self.mutating:
                self._addresses[shapes] = addresses
                self.moves += 1
                if self.moves >= 2:  # graphs of addresses that will not come back
                    self._graphs.clear()
        if self.moves >= 2:  # the weights move at every call: the graph copies them in as well
            sig, inputs, fixed_in, strided = (shapes, "copied"), [*copied, *fixed], (), len(fixed)
        else:
            sig, inputs, fixed_in, strided = (shapes, addresses), list(copied), fixed, 0
        graph = self._graphs.get(sig)
        if graph is None:
            size = sum(t.numel() * t.element_size() for t in inputs if t is not None)
            if sig not in self._seen or len(self._graphs) >= self.max_graphs or size > self.max_bytes:
                self._seen.add(sig)
                return fn(*copied, *fixed)
            graph = self._graphs[sig] = _Graph(fn, inputs, fixed_in, strided, keep_first=self.mutating)
            self.captures += 1
            if self.mutating:  # the warm-up did this call's work: replaying now would do it twice
                first, graph.first = graph.first, None
                return first
        self.replays += 1
        out = graph(inputs)
        if self.mutating:  # written behind autograd's back: bump their versions as an in-place op would
            torch.autograd.graph.increment_version([t for t in fixed if t is not None])
        return out

    def clear(self) -> None:
        """Drop every graph (their memory returns to the pool) and start afresh."""
        self._graphs.clear()
        self._seen.clear()
        self._addresses.clear()
        self.moves = 0


__all__ = ["GraphCache"]
