"""The RNN memory: a stack of LSTM layers written out by hand, and the chunk compressor.

Why by hand: `torch.nn.LSTM` (cuDNN) cannot be built at hidden size 16384 (its flat weight
storage overflows), and its weights are not `nn.Linear`s, so a precision policy could not reach
them. Here each layer is two plain `nn.Linear`s that `lowprec.apply_policy` can swap:

    rnn.lstm.N.ih   d -> 4d, with bias      input projection, ONE call over all T steps
    rnn.lstm.N.hh   d -> 4d, no bias        recurrent projection, one GEMM per step (the sequential part)
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

Backward: T dgrad GEMMs through `hh` are sequential, but its weight gradient Σ_t dG_tᵀ h_{t-1} is
not. A plain `nn.Linear` `hh` runs as `LSTMRecurrence`, which computes it as ONE GEMM over the
stacked steps ((4d, T·B) @ (T·B, d)). A policy's layer (`QLinear`) is called once per step, so
each call quantizes its operands with its own scales as the policy says, and autograd adds the T
weight gradients (T rank-B GEMMs, each written out in full).

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


class LSTMRecurrence(torch.autograd.Function):
    """The recurrence of one layer with a plain `hh` weight W (4d, d), as one autograd node.

    Forward: the loop of the module doc, op for op (so the same numbers as calling `hh` per step).
    Backward, per step t from the last (the sequential part; a = gate pre-activations, ad = the
    activation dtype W and h_{t-1} enter `hh` in, everything else in the state dtype):

        dh_t += dy_t                                        (y_t = h_t)
        do = dh_t ⊙ tanh(c_t)          dc_t += dh_t ⊙ o ⊙ (1 - tanh²(c_t))
        di = dc_t ⊙ g     df = dc_t ⊙ c_{t-1}     dg = dc_t ⊙ i     dc_{t-1} = dc_t ⊙ f
        da_t = [di ⊙ i(1-i), df ⊙ f(1-f), dg ⊙ (1-g²), do ⊙ o(1-o)]
        dh_{t-1} = da_t W                                   (dgrad, in ad)

    and then the weight gradient of all steps as ONE GEMM over the stacked steps,
    dW = Σ_t da_tᵀ h_{t-1} = [da_1; ...; da_T]ᵀ [h_0; ...; h_{T-1}]  ((4d, T·B) @ (T·B, d)),
    instead of T rank-B products each written out and added into a (4d, d) buffer. dgx = da.
    A step with valid[t] False holds the state (h_t = h_{t-1}, c_t = c_{t-1}): its da_t is 0 and
    the gradients pass it unchanged.
    """

    @staticmethod
    def forward(ctx, gx, h, c, w, valid):
        """gx (B, T >= 1, 4d) input projections and h, c (B, d) in the state dtype; w (4d, d);
        valid (T,) bool or None -> y (B, T, d) = h_1..T, h_T, c_T (state dtype)."""
        ad = w.dtype
        hs_prev, cs_prev, acts, tanh_cs, ys = [], [], [], [], []
        for t, gx_t in enumerate(gx.unbind(1)):
            h_in = h.to(ad)
            gates = gx_t + F.linear(h_in, w).to(h.dtype)
            i, f, g, o = gates.chunk(4, dim=-1)
            i, f, g, o = torch.sigmoid(i), torch.sigmoid(f), torch.tanh(g), torch.sigmoid(o)
            c_t = f * c + i * g
            tanh_c = torch.tanh(c_t)
            h_t = o * tanh_c
            hs_prev.append(h_in)
            cs_prev.append(c)
            acts.append(torch.cat([i, f, g, o], dim=-1))
            tanh_cs.append(tanh_c)
            if valid is not None:
                h_t, c_t = torch.where(valid[t], h_t, h), torch.where(valid[t], c_t, c)
            h, c = h_t, c_t
            ys.append(h)
        ctx.save_for_backward(w, valid, torch.stack(hs_prev), torch.stack(cs_prev), torch.stack(acts),
                              torch.stack(tanh_cs))
        ctx.steps = len(ys)
        return torch.stack(ys, dim=1), h, c

    @staticmethod
    def backward(ctx, dy, dh, dc):
        w, valid, hs_prev, cs_prev, acts, tanh_cs = ctx.saved_tensors
        T, (B, d), ad = ctx.steps, cs_prev.shape[1:], w.dtype
        das = [None] * T
        for t in range(T - 1, -1, -1):
            dh = dh + dy[:, t]
            i, f, g, o = acts[t].chunk(4, dim=-1)
            tanh_c = tanh_cs[t]
            if valid is not None:  # a held step passes dh, dc on to step t - 1 unchanged
                dh_held, dc_held = torch.where(valid[t], 0.0, dh), torch.where(valid[t], 0.0, dc)
                dh, dc = torch.where(valid[t], dh, 0.0), torch.where(valid[t], dc, 0.0)
            dc = dc + dh * o * (1 - tanh_c * tanh_c)
            das[t] = torch.cat([dc * g * i * (1 - i), dc * cs_prev[t] * f * (1 - f),
                                dc * i * (1 - g * g), dh * tanh_c * o * (1 - o)], dim=-1)
            if t == 0 and not (ctx.needs_input_grad[1] or ctx.needs_input_grad[2]):
                break  # h_0, c_0 need no gradient: skip the last dgrad
            dh, dc = (das[t].to(ad) @ w).to(dh.dtype), dc * f
            if valid is not None:
                dh, dc = dh + dh_held, dc + dc_held
        da = torch.stack(das, dim=1)  # (B, T, 4d)
        dw = None
        if ctx.needs_input_grad[3]:  # one GEMM over all T·B rows
            dw = da.transpose(0, 1).reshape(T * B, -1).to(ad).t() @ hs_prev.reshape(T * B, d)
        return da, *(g if need else None for g, need in zip((dh, dc), ctx.needs_input_grad[1:3])), dw, None


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

        A plain `nn.Linear` `hh` runs as `LSTMRecurrence` (its weight gradient in one GEMM); any
        other `hh` (a policy's quantized layer) is called once per step, so every call quantizes
        its operands exactly as the policy says, and autograd sums the T weight gradients.
        """
        sd = h.dtype
        gx = self.ih(self.norm(x)).to(sd)  # all T input projections in one GEMM
        # exactly an nn.Linear (not a policy's layer, nor a subclass with its own forward), in the
        # activation dtype and outside autocast (whose casts the per-step path leaves to autograd)
        if (type(self.hh) is nn.Linear and self.hh.bias is None and self.hh.weight.dtype == x.dtype
                and not torch.is_autocast_enabled(x.device.type)):
            y, h, c = LSTMRecurrence.apply(gx, h, c, self.hh.weight, valid)
            return y.to(x.dtype), h, c
        outs = []
        for t, gx_t in enumerate(gx.unbind(1)):  # unbind: one backward node (a select per step would zero-fill (B, T, 4d) each)
            gates = gx_t + self.hh(h.to(x.dtype)).to(sd)
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
