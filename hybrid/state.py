"""`HybridState`: what `HybridLM` carries from one segment of a document to the next.

    pos      int                 tokens of the document consumed so far (absolute position of the next token)
    h, c     (L, B, d)  >= fp32  LSTM hidden and cell state per layer (fp32, or fp64 for an fp64 model)
    memory   (B, M, d)           memory bank: vectors of the last M <= max_memory completed chunks, oldest first;
                                 entry i belongs to chunk index pos // chunk - M + i
    pending  (B, r) int64        chunked mode only: the r = pos % chunk tokens of the unfinished chunk

Every tensor is bounded by the config (L, d, max_memory, chunk), never by the document length.
A state pickles with `torch.save` and loads with `torch.load` (also under `weights_only=True`:
the class is registered as a safe global), and `state_dict()` / `from_state_dict()` give a plain
dict form. `detach()` cuts the autograd graph (truncated BPTT).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import Tensor


@dataclass
class HybridState:
    pos: int = 0
    h: Tensor | None = None
    c: Tensor | None = None
    memory: Tensor | None = None
    pending: Tensor | None = None

    def _tensors(self) -> dict[str, Tensor]:
        return {k: v for k, v in self.state_dict().items() if isinstance(v, Tensor)}

    def detach(self) -> "HybridState":
        """The same values with no autograd history (the cut of truncated BPTT)."""
        return replace(self, **{k: v.detach() for k, v in self._tensors().items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "HybridState":
        """Move every tensor to `device`; cast the float ones to `dtype` (token ids stay int64)."""
        return replace(self, **{k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                                for k, v in self._tensors().items()})

    @property
    def nbytes(self) -> int:
        """Resident bytes of the carried tensors."""
        return sum(v.numel() * v.element_size() for v in self._tensors().values())

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "h": self.h, "c": self.c, "memory": self.memory, "pending": self.pending}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any]) -> "HybridState":
        return cls(**d)


torch.serialization.add_safe_globals([HybridState])
