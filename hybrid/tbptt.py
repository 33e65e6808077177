"""Training over a long sequence: segments in order, truncated backpropagation through the state.

A document (B, N+1) is cut into segments of `segment` tokens (inputs x[:, s:s+L], targets
x[:, s+1:s+L+1]); groups of `k` consecutive segments form one optimization step:

    state ← detach(state)                     cut the graph: gradients flow through at most k segments
    loss  = mean over the group's targets of  CE(model(x_seg, state).logits, y_seg)

`tbptt` yields one `TBPTTStep` per group; the caller runs `loss.backward()` and its optimizer
step (hybrid never imports `optim`), then asks for the next group. The LSTM state and the memory
bank carry forward across groups (values kept, history cut).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .model import HybridLM
from .state import HybridState


@dataclass
class TBPTTStep:
    loss: Tensor            # mean cross-entropy over the group's targets (graph through k segments)
    state: HybridState      # state after the group's last segment
    n_tokens: int           # targets per batch row in the group
    segments: int           # segments in the group (k, fewer at the end)


def tbptt(model: HybridLM, tokens: Tensor, *, state: HybridState | None = None,
          segment: int | None = None, k: int | None = None) -> Iterator[TBPTTStep]:
    """Yield one truncated-BPTT step per `k` segments (default `cfg.tbptt_segments`) of tokens (B, N+1)."""
    cfg = model.cfg
    L = cfg.window if segment is None else segment
    k = cfg.tbptt_segments if k is None else k
    if k < 1:
        raise ValueError(f"k={k} segments per step must be >= 1")
    N = tokens.shape[1] - 1
    if N < 1:
        raise ValueError(f"need at least 2 tokens per row (inputs and shifted targets); got {tokens.shape[1]}")
    starts = list(range(0, N, L))
    for g in range(0, len(starts), k):
        state = None if state is None else state.detach()
        total = tokens.new_zeros((), dtype=torch.float32)
        count = 0
        for s in starts[g:g + k]:
            x, y = tokens[:, s:min(s + L, N)], tokens[:, s + 1:min(s + L, N) + 1]
            logits, state = model(x, state)
            total = total + F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum")
            count += y.numel()
        n_seg = len(starts[g:g + k])
        yield TBPTTStep(loss=total / count, state=state, n_tokens=count // tokens.shape[0], segments=n_seg)
