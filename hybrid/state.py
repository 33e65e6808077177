"""`HybridState`: what `HybridLM` carries from one segment of a document to the next.

Every shape is fixed by the config (L layers, width d, `max_memory` M, `chunk` C) and the batch B,
never by the position in the document, so a compiled model sees the same shapes at every step:

    pos      () int64              tokens of the document consumed so far (absolute position of the next token)
    h, c     (L, B, d)  >= fp32    LSTM hidden and cell state per layer (fp32, or fp64 for an fp64 model)
    memory   (B, M, d)             memory bank, right-aligned: slot i holds the vector of chunk
                                   n - M + i, n = pos // C the chunks completed so far (newest in the last
                                   slot); slots of chunk index < 0 are empty (zeros), so the first
                                   `memory_len(C, M)` = min(n, M) slots from the right are in use
    pending  (B, C - 1) int64      chunked mode only: the r = pos % C tokens of the unfinished chunk,
                                   right-aligned (the first C - 1 - r entries are unused)

What is valid in `memory` and `pending` follows from `pos` alone, so the state needs no separate
counts. `pos` is a tensor on the model's device, so no Python integer of the document position
reaches a compiled graph. A state of the earlier, growing layout (`pos` an int, `memory`
(B, min(n, M), d), `pending` (B, r)) still loads: `from_state_dict` makes `pos` a tensor, and
`HybridLM` pads the short bank and pending buffer to the fixed shapes on first use.

A state pickles with `torch.save` and loads with `torch.load` (also under `weights_only=True`:
the class is registered as a safe global), and `state_dict()` / `from_state_dict()` give a plain
dict form. `detach()` cuts the autograd graph (truncated BPTT).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor

FIELDS = ("pos", "h", "c", "memory", "pending")


@dataclass
class HybridState:
    pos: Tensor | int = 0
    h: Tensor | None = None
    c: Tensor | None = None
    memory: Tensor | None = None
    pending: Tensor | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pos, Tensor):
            self.pos = torch.tensor(int(self.pos), dtype=torch.int64)

    def _tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if isinstance(v, Tensor)}

    def detach(self) -> HybridState:
        """The same values with no autograd history (the cut of truncated BPTT)."""
        return replace(self, **{k: v.detach() for k, v in self._tensors().items()})

    def requiring_grad(self) -> HybridState:
        """The same values, cut from any graph, the floating ones as leaves that require grad: a state
        carried into a compiled segment then meets the graph the segment's own output state meets."""
        return replace(self, **{k: v.detach().requires_grad_(v.is_floating_point())
                                for k, v in self._tensors().items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> HybridState:
        """Move every tensor to `device`; cast the float ones to `dtype` (`pos` and token ids stay int64)."""
        return replace(self, **{k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                                for k, v in self._tensors().items()})

    @property
    def nbytes(self) -> int:
        """Resident bytes of the carried tensors."""
        return sum(v.numel() * v.element_size() for v in self._tensors().values())

    def memory_len(self, chunk: int, max_memory: int) -> Tensor:
        """Slots of `memory` in use (counted from the right): min(pos // chunk, max_memory), () int64."""
        return torch.clamp(torch.div(torch.as_tensor(self.pos), chunk, rounding_mode="floor"), max=max_memory)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in FIELDS}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> HybridState:
        unknown = sorted(set(d) - set(FIELDS))
        if unknown:
            raise ValueError(f"HybridState: unknown key(s) {unknown}; valid keys are {list(FIELDS)}")
        return cls(**d)


torch.serialization.add_safe_globals([HybridState])
