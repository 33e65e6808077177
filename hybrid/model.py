"""`HybridLM`: the hybrid Transformer-RNN language model, one segment per call.

    e      = embed.tok(tokens)                                   (B, T, d)
    x      = e + embed.pos(0..T-1)                               positions count from the segment start
    m_new  = rnn(e, state)                                       (B, K, d): a slot per chunk that can end in this segment
    x      = fusion(x, [bank ; m_new], pos)                      gated cross-attention to the memory (causal, masked)
    x      = blocks[0..n_blocks-1](x)                            causal GQA within the segment
    logits = head(norm_f(x))                                     (B, T, vocab)

and the returned `HybridState` carries the LSTM state, a bank of the last `max_memory` chunk vectors
and the absolute position, all of shapes fixed by the config (`hybrid.state`): which slots hold a
chunk follows from the position, a tensor, so a compiled model does not recompile as a document
goes on. Self-attention sees only the current segment (at most `window` tokens); what
lies further back reaches a token only through the LSTM memory. With `memory=False` there are no
`rnn`/`fusion` modules: a windowed GQA transformer of the same width (the ablation baseline).

Module names are the paper's words, so precision policies (glob rules over names) can target them:
`embed.tok`, `embed.pos`, `rnn.lstm.N.{ih,hh,norm}`, `rnn.compressor.{fc1,fc2}`, `fusion.norm`,
`fusion.xattn.{q,k,v,o}`, `fusion.gate`, `blocks.N.{norm1,attn.{q,k,v,o},norm2,ffn.{up,down}}`,
`norm_f`, `head`. Every weight matrix is a plain `nn.Linear` or `nn.Embedding`, always called as a
module (never through its `.weight`), so `lowprec.apply_policy` can swap it in place. No precision
is chosen here.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Block, Fusion
from .config import HybridConfig
from .rnn import RNNMemory
from .state import HybridState


class BlockStack(nn.Module):
    """The GQA blocks, named ``blocks.N`` and indexed, iterated and counted as in a ``ModuleList``,
    called as one module: ``blocks(x)`` runs them in order. FSDP2 can then shard all of them as one
    unit whose hooks wrap the stack (a ``ModuleList`` it refuses), and a compiled step traces every
    block in one graph (FSDP2's hooks on each block of a group break the graph at each block)."""

    def __init__(self, blocks: Iterable[nn.Module]):
        super().__init__()
        for i, blk in enumerate(blocks):
            self.add_module(str(i), blk)

    def __len__(self) -> int:
        return len(self._modules)

    def __iter__(self) -> Iterator[nn.Module]:
        return iter(self._modules.values())

    def __getitem__(self, idx: int | slice):
        """A block (negative indices count from the end), or a list of them for a slice."""
        return list(self._modules.values())[idx]

    def forward(self, x: Tensor) -> Tensor:
        for blk in self._modules.values():
            x = blk(x)
        return x


class HybridLM(nn.Module):
    """The hybrid Transformer-RNN. `model(tokens, state=None) -> (logits, state)`."""

    def __init__(self, cfg: HybridConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = nn.ModuleDict({
            "tok": nn.Embedding(cfg.vocab_size, d),
            "pos": nn.Embedding(cfg.max_window, d),
        })
        self.drop = nn.Dropout(cfg.dropout)
        if cfg.memory:
            self.rnn = RNNMemory(d, cfg.rnn_layers, cfg.chunk, cfg.compressor_hidden, cfg.norm_eps, cfg.chunk_pool,
                                 cfg.rnn_cuda_graphs)
            self.fusion = Fusion(d, cfg.xattn_heads, cfg.chunk, cfg.max_memory, cfg.norm_eps)
        self.blocks = BlockStack(
            Block(d, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff, cfg.dropout, cfg.norm_eps,
                  compile_once=cfg.compile_blocks_once)
            for _ in range(cfg.n_blocks))
        self.norm_f = nn.LayerNorm(d, eps=cfg.norm_eps)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, init_std) for matrices, residual outputs scaled by 1/√(2·n_blocks);
        the memory path (compressor, cross-attention, gate) N(0, 1/fan_in); LSTM matrices U(±1/√d)
        as torch.nn.LSTM, forget-gate bias `rnn_forget_bias` (default 1: remember by default).

        Whole-tensor initializers only: on the meta device they cost nothing.
        """
        cfg = self.cfg
        std = cfg.init_std
        for mod in self.modules():
            if isinstance(mod, (nn.Linear, nn.Embedding)):
                nn.init.normal_(mod.weight, 0.0, std)
                if getattr(mod, "bias", None) is not None:
                    nn.init.zeros_(mod.bias)
        for blk in self.blocks:
            nn.init.normal_(blk.attn.o.weight, 0.0, std / math.sqrt(2 * cfg.n_blocks))
            nn.init.normal_(blk.ffn.down.weight, 0.0, std / math.sqrt(2 * cfg.n_blocks))
        if cfg.memory:
            # The memory path is a long chain (LSTM -> compressor -> xattn k/v -> o -> gate): at
            # N(0, 0.02) a small model's memory signal starts vanishingly small and never learns,
            # so these layers keep unit-scale activations with std 1/sqrt(fan_in).
            for mod in (*self.rnn.compressor.children(), *self.fusion.xattn.children(), self.fusion.gate):
                nn.init.normal_(mod.weight, 0.0, 1.0 / math.sqrt(mod.in_features))
            bound = 1.0 / math.sqrt(cfg.d_model)
            for layer in self.rnn.lstm:
                nn.init.uniform_(layer.ih.weight, -bound, bound)
                nn.init.uniform_(layer.hh.weight, -bound, bound)
                nn.init.zeros_(layer.ih.bias)
                layer.ih.bias[cfg.d_model:2 * cfg.d_model].fill_(cfg.rnn_forget_bias)
        if cfg.tie_embeddings:
            self.head.weight = self.embed["tok"].weight

    def compile_blocks(self, **compile_kwargs) -> int:
        """Regional compilation: each GQA block runs ``torch.compile`` of its body
        (``compile_kwargs`` go to ``torch.compile``). The blocks share one code object, so the first
        call compiles and every other block of the same input shape reuses that code with its own
        weights: the compile time of one block, whatever ``n_blocks``, on any torch release. The
        rest of the model runs eager, between the compiled blocks; module hooks (FSDP2's gathers,
        activation checkpointing) stay outside the compiled code. Evaluation and sampling call the
        compiled blocks too (a new batch shape or train/eval mode compiles once more). Returns the
        number of blocks; ``RuntimeError`` when called twice."""
        if any(blk.compiled is not None for blk in self.blocks):
            raise RuntimeError("the blocks are already compiled")
        compiled = torch.compile(Block.body, **compile_kwargs)  # a function of (block, x): a copy of the model shares it
        for blk in self.blocks:
            blk.compiled = compiled
        return len(self.blocks)

    # ---- one segment --------------------------------------------------------------------
    def initial_state(self) -> HybridState:
        """The state before the first token of a document (tensors are created on first use)."""
        return HybridState(pos=0)

    def forward(self, tokens: Tensor, state: HybridState | None = None) -> tuple[Tensor, HybridState]:
        """tokens (B, T) int64, 1 <= T <= window -> logits (B, T, vocab), state after the segment.

        Any T is allowed: a chunk may span segments (stream mode carries the LSTM over it;
        chunked mode keeps its tokens in `state.pending`). The shapes of the returned state depend
        only on the config and B, so a compiled model compiles once per segment length.
        """
        cfg = self.cfg
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, time); got shape {tuple(tokens.shape)}")
        B, T = tokens.shape
        if not 1 <= T <= cfg.window:
            raise ValueError(f"segment length T={T} must be in [1, window={cfg.window}]")
        state = self.initial_state() if state is None else state
        for name, t in (("h", state.h), ("memory", state.memory), ("pending", state.pending)):
            if t is not None and t.shape[-2 if name == "h" else 0] != B:
                raise ValueError(f"state.{name} has batch {t.shape[-2 if name == 'h' else 0]}, tokens have {B}")
        if isinstance(state.pos, Tensor):
            pos = state.pos.to(device=tokens.device, dtype=torch.int64)
        else:  # a fresh state, or an unpickled growing-bank one: a fill on the device, no copy to wait for
            pos = torch.full((), int(state.pos), dtype=torch.int64, device=tokens.device)

        e = self.embed["tok"](tokens)
        x = self.drop(e + self.embed["pos"](torch.arange(T, device=tokens.device)))
        new = HybridState(pos=pos + T)
        if cfg.memory:
            x, new = self._memory(tokens, e, x, state, pos, new)
        x = self.blocks(x)
        return self.head(self.norm_f(x)), new

    def _memory(self, tokens: Tensor, e: Tensor, x: Tensor, state: HybridState, pos: Tensor,
                new: HybridState) -> tuple[Tensor, HybridState]:
        """Run the RNN memory, fuse the bank into x, and fill `new` with the carried state.

        The new chunk vectors go into slots after the bank's M (`rnn.stream` / `rnn.chunked`
        return a fixed number, the first K = (pos + T) // C - pos // C real), so slot s of
        [bank ; new] holds chunk pos // C - M + s in both modes, and the next bank is slots K..K+M-1.
        """
        cfg = self.cfg
        T = tokens.shape[1]
        C, M = cfg.chunk, cfg.max_memory
        h, c = (state.h, state.c) if state.h is not None else self.rnn.zero_state(e)
        done = torch.div(pos, C, rounding_mode="floor")  # chunks completed before this segment
        if cfg.rnn_mode == "stream":
            m_new, h, c = self.rnn.stream(e, pos, h, c)
        else:
            # the r = pos % C pending tokens sit right-aligned in a (B, C - 1) buffer: chunk k of
            # [pending ; tokens] starts at C - 1 - r + kC; ceil((C - 1 + T) / C) slots cover every case
            pending = self._pending(state.pending, tokens)
            r = pos - done * C
            buf = torch.cat([pending, tokens], dim=1)
            e_buf = torch.cat([self.embed["tok"](pending), e], dim=1)
            k_max = buf.shape[1] // C
            idx = (C - 1 - r) + torch.arange(k_max * C, device=e.device)
            m_new, h, c = self.rnn.chunked(e_buf[:, idx.clamp(max=buf.shape[1] - 1)],
                                           torch.div(r + T, C, rounding_mode="floor"), h, c)
            new.pending = buf[:, T:]
        bank = self._bank(state.memory, m_new)
        keys = torch.cat([bank, m_new], dim=1)
        x = self.fusion(x, keys, pos)
        k_done = torch.div(pos + T, C, rounding_mode="floor") - done
        new.h, new.c = h, c
        new.memory = keys.index_select(1, k_done + torch.arange(M, device=keys.device))
        return x, new

    def _bank(self, memory: Tensor | None, like: Tensor) -> Tensor:
        """The carried bank as (B, M, d): zeros for a fresh document; a growing bank
        ((B, min(n, M), d), oldest first: the earlier state layout) is left-padded with empty slots."""
        B, _, d = like.shape
        M = self.cfg.max_memory
        if memory is None:
            return like.new_zeros(B, M, d)
        if memory.shape[1] > M:
            raise ValueError(f"state.memory has {memory.shape[1]} slots; this model's max_memory is {M}")
        return F.pad(memory, (0, 0, M - memory.shape[1], 0)) if memory.shape[1] < M else memory

    def _pending(self, pending: Tensor | None, tokens: Tensor) -> Tensor:
        """The pending tokens as a (B, C - 1) buffer, right-aligned (a (B, r) one, the earlier layout, is left-padded)."""
        P = self.cfg.chunk - 1
        if pending is None:
            return tokens.new_zeros(tokens.shape[0], P)
        if pending.shape[1] > P:
            raise ValueError(f"state.pending has {pending.shape[1]} tokens; a chunk of {self.cfg.chunk} leaves "
                             f"at most {P} pending")
        return F.pad(pending, (P - pending.shape[1], 0)) if pending.shape[1] < P else pending

    # ---- a long document ----------------------------------------------------------------
    def stream(self, tokens: Tensor, state: HybridState | None = None,
               segment: int | None = None) -> Iterator[tuple[Tensor, HybridState]]:
        """Process a long document (B, N) segment by segment; yields (logits (B, T_i, vocab), state).

        Segments are `segment` tokens (default: `window`), the last one possibly shorter. Memory is
        bounded by the segment and the state, not by N. Wrap in `torch.no_grad()` for inference;
        for training see `hybrid.tbptt`.
        """
        L = self.cfg.window if segment is None else segment
        for s in range(0, tokens.shape[1], L):
            logits, state = self(tokens[:, s:s + L], state)
            yield logits, state

    def num_params(self) -> int:
        """Parameters, tied ones counted once."""
        return sum(p.numel() for p in self.parameters())
