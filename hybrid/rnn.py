"""The RNN memory: a stack of LSTM layers written out by hand, and the chunk compressor.

Why by hand: `torch.nn.LSTM` (cuDNN) cannot be built at hidden size 16384 (its flat weight
storage overflows), and its weights are not `nn.Linear`s, so a precision policy could not reach
them. Here each layer is two plain `nn.Linear`s that `lowprec.apply_policy` can swap:

    rnn.lstm.N.ih   d -> 4d, with bias      input projection, ONE call over all T steps
    rnn.lstm.N.hh   d -> 4d, no bias        recurrent projection, one call per step (the sequential part)
    rnn.lstm.N.norm LayerNorm(d)

One layer, input x (B, T, d), carried (h_0, c_0) (B, d):

    G = ih(norm(x))                                (B, T, 4d)
    for t = 1..T:
        [i, f, g, o] = G_t + hh(h_{t-1})           gate order i, f, g, o (as torch.nn.LSTM)
        c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)
        h_t = σ(o) ⊙ tanh(c_t)
    y = h_1..T                                     (B, T, d)

Where the layer norm sits: on each layer's INPUT sequence (pre-norm), outside the recurrence.
So `rnn.lstm.0.norm` normalizes the token embeddings (N(0, 0.02)-scale, which would otherwise
give the gates almost no input signal), and `rnn.lstm.N.norm` for N >= 1 sits between layer N-1
and layer N. The top layer's raw output h ∈ (-1, 1) feeds the compressor. The norm costs nothing
sequential.

Precision: the gates, h and c are computed and carried in fp32 (`torch.promote_types(act, fp32)`,
so an fp64 model stays fp64); `hh` is called with h cast to the activation dtype, which is what
a policy's input quantizer would see anyway. No format is chosen here.

The compressor maps a chunk summary s (B, K, d) to one memory vector per chunk:

    m = fc2(GELU(fc1(s)))        rnn.compressor.fc1: d -> d/2, rnn.compressor.fc2: d/2 -> d (with biases)

Two modes produce the memory vectors (`RNNMemory.stream` / `RNNMemory.chunked`):

- `stream` (the paper as written): the stack runs over every token, state carried across chunks
  and segments; chunk j's summary is the top layer's output at the chunk's last token.
- `chunked`: every chunk is encoded by the SAME stack from a zero state, all chunks of the
  segment batched together (C sequential steps instead of T); its summary is the top output at
  its last token (`pool="last"`) or the mean of the top outputs over its C tokens (`pool="mean"`:
  every token reaches the summary directly, so what the chunk said early is not left to survive
  C forget gates; same parameters). The SAME stack (same weights) then recurs over the chunk summaries with the
  state carried across chunks and segments (T/C steps). Sequential steps per segment: C + T/C
  instead of T (64 + 2048 vs 131072 for the paper's largest window). Same parameters as `stream`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import CHUNK_POOLS


class LSTMLayer(nn.Module):
    """One LSTM layer (`ih`, `hh`) with a LayerNorm on its input sequence (`norm`)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.ih = nn.Linear(d, 4 * d, bias=True)
        self.hh = nn.Linear(d, 4 * d, bias=False)
        self.norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x: Tensor, h: Tensor, c: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, d) activations; h, c (B, d) in the state dtype -> (h_1..T (B, T, d), h_T, c_T).

        valid: None, or (T,) bool: at a step t with valid[t] False the state is held (h_t = h_{t-1},
        c_t = c_{t-1}), so steps past the end of a shorter sequence change nothing.
        """
        sd = h.dtype
        gx = self.ih(self.norm(x)).to(sd)  # all T input projections in one GEMM
        outs = []
        for t in range(x.shape[1]):
            gates = gx[:, t] + self.hh(h.to(x.dtype)).to(sd)
            i, f, g, o = gates.chunk(4, dim=-1)
            c_t = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h_t = torch.sigmoid(o) * torch.tanh(c_t)
            if valid is None:
                h, c = h_t, c_t
            else:
                h, c = torch.where(valid[t], h_t, h), torch.where(valid[t], c_t, c)
            outs.append(h)
        y = torch.stack(outs, dim=1) if outs else h.new_zeros(x.shape[0], 0, h.shape[-1])
        return y.to(x.dtype), h, c


class Compressor(nn.Module):
    """m = fc2(GELU(fc1(s))): d -> hidden -> d, applied to each chunk summary."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, s: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(s)))


class RNNMemory(nn.Module):
    """`lstm` (ModuleList of `LSTMLayer`) + `compressor`; turns token embeddings into chunk vectors."""

    def __init__(self, d: int, n_layers: int, chunk: int, hidden: int, eps: float = 1e-5, pool: str = "last"):
        super().__init__()
        if pool not in CHUNK_POOLS:
            raise ValueError(f"unknown chunk pool {pool!r}; choose one of {', '.join(CHUNK_POOLS)}")
        self.chunk, self.pool = chunk, pool
        self.lstm = nn.ModuleList(LSTMLayer(d, eps) for _ in range(n_layers))
        self.compressor = Compressor(d, hidden)

    @staticmethod
    def state_dtype(act: torch.dtype) -> torch.dtype:
        return torch.promote_types(act, torch.float32)

    def zero_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(h, c) zeros of shape (L, B, d) in the state dtype for activations x (B, ·, d)."""
        z = x.new_zeros(len(self.lstm), x.shape[0], x.shape[-1], dtype=self.state_dtype(x.dtype))
        return z, z.clone()

    def run_stack(self, x: Tensor, h: Tensor, c: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """All layers over x (B, T, d) from (h, c) (L, B, d) -> (top output (B, T, d), h', c');
        `valid` (T,) bool or None as in `LSTMLayer.forward`."""
        hs, cs = [], []
        for n, layer in enumerate(self.lstm):
            x, hn, cn = layer(x, h[n], c[n], valid)
            hs.append(hn)
            cs.append(cn)
        return x, torch.stack(hs), torch.stack(cs)

    def stream(self, e: Tensor, pos: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`stream` mode. e (B, T, d) embeddings of absolute positions pos..pos+T-1 (pos: () int64).

        Returns memory vectors (B, ceil(T / C), d): vector k is chunk pos // C + k, summarized at
        its last token (a chunk ends at absolute position p with (p + 1) % chunk == 0); only the
        first (pos + T) // C - pos // C of them end in this segment, the rest are placeholders
        (the output at the segment's last token) that the caller must ignore. And the carried (h, c).
        """
        y, h, c = self.run_stack(e, h, c)
        C, T = self.chunk, e.shape[1]
        first = (C - 1 - pos) % C  # local index of the first chunk end in this segment
        ends = first + C * torch.arange(-(-T // C), device=e.device)
        return self.compressor(y[:, ends.clamp(max=T - 1)]), h, c

    def chunked(self, e: Tensor, n_chunks: Tensor, h: Tensor, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """`chunked` mode. e (B, K*C, d): embeddings of K chunks, of which the first n_chunks
        (() int64, <= K) are whole chunks of the document and the rest placeholders.

        Returns memory vectors (B, K, d) (placeholders past n_chunks, to be ignored) and the
        carried chunk-level (h, c), which the placeholders leave unchanged.
        """
        B, n, d = e.shape
        C = self.chunk
        K = n // C
        xs = e.reshape(B * K, C, d)  # chunks are independent: batch them
        h0, c0 = self.zero_state(xs)
        y, _, _ = self.run_stack(xs, h0, c0)
        summaries = (y[:, -1] if self.pool == "last" else y.mean(dim=1)).reshape(B, K, d)
        valid = torch.arange(K, device=e.device) < n_chunks
        z, h, c = self.run_stack(summaries, h, c, valid)  # the same stack recurs over the chunk summaries
        return self.compressor(z), h, c
