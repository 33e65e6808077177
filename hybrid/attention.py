"""Attention: the pre-norm GQA blocks, and the cross-attention fusion with the memory bank.

Block N (`blocks.N`), x (B, T, d):

    x = x + attn.o(GQA(attn.q(norm1 x), attn.k(norm1 x), attn.v(norm1 x)))   causal, within the segment
    x = x + ffn.down(GELU(ffn.up(norm2 x)))                                   d -> d_ff -> d

GQA: H query heads and H_kv key/value heads of size hd; query head i reads KV head
i // (H / H_kv) (`scaled_dot_product_attention(..., enable_gqa=True)`).

Fusion (`fusion`), tokens x (B, T, d), memory vectors m (B, S, d):

    u   = norm(x)
    ctx = xattn.o(softmax(R(q) R(k)ᵀ / √dx + mask) v)   q = xattn.q(u), k = xattn.k(m), v = xattn.v(m);
                                                        Hx heads, dx = d / Hx; R = rotary over chunk
                                                        indices (the score sees a memory's age)
    g   = σ(gate([u ; ctx]))                         gate: 2d -> d, with bias
    x'  = x + g ⊙ ctx

The key set gets one extra "null" slot (key 0, value 0, always allowed), so a token with no
completed chunk to read (the start of a document) gets ctx = 0 instead of a softmax over nothing,
and any token can choose to read nothing.

Causality of the memory (`memory_mask`): chunk j covers absolute positions [jC, (j+1)C - 1]; its
memory vector is computed from tokens <= (j+1)C - 1 only. A token at absolute position p may read
chunk j iff

    (j+1)C - 1 <= p                 the chunk has ended at or before p (p itself may be its last token)
    j >= n(p) - max_memory          only the max_memory most recent ones, n(p) = (p+1) // C
    j >= 0                          a slot of the bank not filled yet holds no chunk

so no memory vector a token reads holds information from a token after it. The memory vectors
come in slots of fixed number (the bank's `max_memory` plus the most chunks a segment of T tokens
can complete), so the mask, not the shapes, says which ones exist: a compiled model sees the same
shapes at every position of a document.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class SelfAttention(nn.Module):
    """Causal grouped-query self-attention: q d -> H·hd, k/v d -> H_kv·hd, o H·hd -> d (no biases)."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int, head_dim: int, dropout: float = 0.0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim, self.dropout = n_heads, n_kv_heads, head_dim, dropout
        self.q = nn.Linear(d, n_heads * head_dim, bias=False)
        self.k = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.v = nn.Linear(d, n_kv_heads * head_dim, bias=False)
        self.o = nn.Linear(n_heads * head_dim, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class FFN(nn.Module):
    """down(GELU(up x)): d -> d_ff -> d (no biases)."""

    def __init__(self, d: int, d_ff: int):
        super().__init__()
        self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    """Pre-norm transformer block: norm1, attn, norm2, ffn.

    ``compile_once`` (``HybridConfig.compile_blocks_once``): under ``torch.compile`` the block's
    body is a nested compile region (``torch.compiler.nested_compile_region``): the first block is
    traced and compiled, and every other block of the same shapes calls that code with its own
    weights, so compiling a model's blocks costs about one block's compilation; eager (and in
    the numbers it computes) nothing changes. The module's own hooks (FSDP2's gathers,
    activation checkpointing) run outside the region."""

    def __init__(self, d: int, n_heads: int, n_kv_heads: int, head_dim: int, d_ff: int,
                 dropout: float = 0.0, eps: float = 1e-5, compile_once: bool = False):
        super().__init__()
        if compile_once and _block_once is None:
            raise RuntimeError(f"compile_blocks_once needs torch >= 2.13 (this is {torch.__version__}): older "
                               "releases lack torch.compiler.nested_compile_region, or (2.11) trace every block "
                               "anew inside it and fail on the hybrid's graph; set model.compile_blocks_once=false")
        self.compile_once = compile_once
        self.compiled = None  # HybridLM.compile_blocks: torch.compile of Block.body, shared by the blocks
        self.norm1 = nn.LayerNorm(d, eps=eps)
        self.attn = SelfAttention(d, n_heads, n_kv_heads, head_dim, dropout)
        self.norm2 = nn.LayerNorm(d, eps=eps)
        self.ffn = FFN(d, d_ff)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) if self.compiled is None else self.compiled(self, x)

    def body(self, x: Tensor) -> Tensor:
        """What ``forward`` computes (``forward`` calls the compiled version when there is one)."""
        return _block_once(self, x) if self.compile_once else _block(self, x)


def _block(blk: Block, x: Tensor) -> Tensor:
    """The block's body (``Block.forward``)."""
    x = x + blk.drop(blk.attn(blk.norm1(x)))
    return x + blk.drop(blk.ffn(blk.norm2(x)))


_nested = getattr(torch.compiler, "nested_compile_region", None)
# torch 2.11 has the region, but traced each block's call anew (no compile time saved) and raised
# KeyError('example_value') on the hybrid's compiled step on a GPU; 2.13 is the release it is tested on
_block_once = _nested(_block) if _nested is not None and torch.torch_version.TorchVersion(torch.__version__) >= "2.13" else None


def memory_mask(p: Tensor, j: Tensor, chunk: int, max_memory: int) -> Tensor:
    """Which memory vectors each token may read: bool (len(p), len(j)), True = allowed.

    p: absolute token positions; j: absolute chunk indices. Key j is allowed for position p iff
    max(n(p) - max_memory, 0) <= j < n(p), with n(p) = (p + 1) // chunk the chunks completed by p
    (module docstring). The always-allowed null slot is not part of this mask.
    """
    n_done = torch.div(p + 1, chunk, rounding_mode="floor")[:, None]
    j = j[None, :]
    return (j < n_done) & (j >= n_done - max_memory) & (j >= 0)


def rotate(x: Tensor, idx: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary position embedding: x (B, H, N, hd) rotated by angles idx (N,) · base^(-2i/hd).

    After rotating queries by a_q and keys by a_k, q·k depends on a_q - a_k (here: the age of a
    memory vector in chunks), not on absolute indices. Angles are computed in >= fp32 from
    indices kept small by the caller (relative to the oldest key), so they stay exact.
    """
    half = x.shape[-1] // 2
    dt = torch.promote_types(x.dtype, torch.float32)
    freqs = base ** (-torch.arange(half, device=x.device, dtype=dt) / half)
    ang = idx.to(dt)[:, None] * freqs[None, :]
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CrossAttention(nn.Module):
    """Multi-head attention from tokens to memory vectors, causal over chunks, with a null slot.

    q, k, v, o: d -> d (no biases), `n_heads` heads of size d / n_heads. Queries are rotated by
    n(p) and the key of chunk j by j + 1 (rotary), so a score can depend on the memory's age
    n(p) - 1 - j >= 0 as well as on its content, with no extra parameters: without it the bank
    is an unordered set and "what happened 3 chunks ago" would have to be written into the
    LSTM state itself. Queries are processed in blocks of `q_block` tokens, each against only
    the keys it may read, so the (T, S) score matrix of a 131072-token window is never whole.
    """

    def __init__(self, d: int, n_heads: int, chunk: int, max_memory: int, q_block: int = 4096):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, d // n_heads
        self.chunk, self.max_memory, self.q_block = chunk, max_memory, q_block
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)

    def forward(self, x: Tensor, m: Tensor, pos: Tensor) -> Tensor:
        """x (B, T, d) tokens at absolute positions pos.. (pos: () int64), m (B, S, d) memory slots:
        slot s holds chunk pos // chunk - max_memory + s -> ctx (B, T, d).

        Slots that hold no chunk a token may read (not filled yet, not completed by that token, or
        too old) are masked, so S is fixed by the config and T, not by pos.
        """
        B, T, d = x.shape
        S = m.shape[1]
        H, hd, C, M = self.n_heads, self.head_dim, self.chunk, self.max_memory
        base = torch.div(pos, C, rounding_mode="floor") - M  # chunk index of slot 0
        first = base.clamp(min=0)  # the oldest chunk any token of the segment may read
        p = pos + torch.arange(T, device=x.device)
        j = base + torch.arange(S, device=x.device)
        # indices relative to the oldest readable key keep the rotary angles small
        q = rotate(self.q(x).view(B, T, H, hd).transpose(1, 2), torch.div(p + 1, C, rounding_mode="floor") - first)
        k = rotate(self.k(m).view(B, S, H, hd).transpose(1, 2), j - first + 1)
        v = self.v(m).view(B, S, H, hd).transpose(1, 2)
        null = q.new_zeros(B, H, 1, hd)
        ys = []
        for t0 in range(0, T, self.q_block):
            t1 = min(T, t0 + self.q_block)
            # slots any token of the block may read, whatever pos is: n(p) - pos // C lies in
            # [(t0 + 1) // C, ceil(t1 / C)] for p in [pos + t0, pos + t1)
            ks, ke = (t0 + 1) // C, min(S, M + -(-t1 // C))
            mask = memory_mask(p[t0:t1], j[ks:ke], C, M)
            mask = torch.cat([mask, mask.new_ones(t1 - t0, 1)], dim=1)
            ys.append(F.scaled_dot_product_attention(
                q[:, :, t0:t1], torch.cat([k[:, :, ks:ke], null], dim=2),
                torch.cat([v[:, :, ks:ke], null], dim=2), attn_mask=mask))
        y = torch.cat(ys, dim=2) if len(ys) > 1 else ys[0]
        return self.o(y.transpose(1, 2).reshape(B, T, d))


class Fusion(nn.Module):
    """x' = x + σ(gate([u; ctx])) ⊙ ctx, u = norm(x), ctx = xattn(u, memory)."""

    def __init__(self, d: int, n_heads: int, chunk: int, max_memory: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(d, eps=eps)
        self.xattn = CrossAttention(d, n_heads, chunk, max_memory)
        self.gate = nn.Linear(2 * d, d)

    def forward(self, x: Tensor, m: Tensor, pos: Tensor) -> Tensor:
        """x (B, T, d) at absolute positions pos.., m (B, S, d) memory slots (see CrossAttention) -> x' (B, T, d)."""
        u = self.norm(x)
        ctx = self.xattn(u, m, pos)
        g = torch.sigmoid(self.gate(torch.cat([u, ctx], dim=-1)))
        return x + g * ctx
