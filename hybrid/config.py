"""`HybridConfig`: every shape of the hybrid Transformer-RNN in one frozen dataclass.

The model (see `hybrid.model`) is

    tokens (B, T) ─ embed.tok ─┬─ + embed.pos ─ fusion(·, memory bank) ─ blocks × n_blocks ─ norm_f ─ head
                               └─ rnn.lstm × rnn_layers ─ one vector per `chunk` tokens ─ rnn.compressor ─ memory bank

Widths: self-attention has `n_heads` query heads and `n_kv_heads` key/value heads of size
`head_dim` (grouped-query attention), with `n_heads * head_dim == d_model`; the fusion
cross-attention has `xattn_heads` heads of size `d_model // xattn_heads`; the compressor is
`d_model -> compressor_hidden -> d_model`.

Lengths: a segment (one call of the model) holds at most `window` tokens; the learned position
table has `max_window` rows (the paper trains with windows of 32K, 64K and 131K tokens, so its table
has 131072 rows). The memory bank keeps at most `max_memory` chunk vectors (oldest dropped), so
the state is bounded whatever the document length.

Invariants are checked in `__post_init__`; each error names the bad value and the rule.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Mapping

RNN_MODES = ("stream", "chunked")
CHUNK_POOLS = ("last", "mean")


@dataclass(frozen=True)
class HybridConfig:
    """Shapes and switches of `HybridLM`.

    `head_dim` and `compressor_hidden` default to `d_model // n_heads` and `d_model // 2`;
    `d_ff` defaults to `4 * d_model`. They are resolved in `__post_init__`, so a built config
    always holds concrete integers.
    """

    d_model: int = 64
    n_blocks: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    head_dim: int | None = None
    d_ff: int | None = None
    vocab_size: int = 256
    window: int = 64
    max_window: int = 64
    # RNN memory
    memory: bool = True
    rnn_layers: int = 1
    rnn_mode: str = "stream"
    chunk: int = 16
    compressor_hidden: int | None = None
    xattn_heads: int = 4
    max_memory: int = 64
    # a chunk's summary (chunked mode): the top LSTM output at its last token, or the mean over its tokens
    chunk_pool: str = "last"
    rnn_forget_bias: float = 1.0  # initial LSTM forget-gate bias (sigma(b): the share of c kept per step)
    # on CUDA, replay each LSTM layer's step loops as CUDA graphs (hybrid.rnn.LSTMLayer.graphs_for)
    rnn_cuda_graphs: bool = True
    # under torch.compile, the GQA blocks are one nested compile region: one block is traced and
    # compiled, its code reused for every block (hybrid.attention.Block)
    compile_blocks_once: bool = False
    # training
    tbptt_segments: int = 2
    dropout: float = 0.0
    tie_embeddings: bool = False
    norm_eps: float = 1e-5
    init_std: float = 0.02

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise ValueError(f"HybridConfig: {msg}")

        for name in ("d_model", "n_blocks", "n_heads", "n_kv_heads", "vocab_size", "window",
                     "max_window", "chunk", "xattn_heads", "max_memory", "tbptt_segments"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                fail(f"{name}={v!r} must be a positive integer")
        d = self.d_model
        if self.head_dim is None:
            if d % self.n_heads:
                fail(f"n_heads={self.n_heads} does not divide d_model={d} "
                     f"(rule: n_heads * head_dim == d_model)")
            object.__setattr__(self, "head_dim", d // self.n_heads)
        if self.n_heads * self.head_dim != d:
            fail(f"n_heads * head_dim = {self.n_heads} * {self.head_dim} = "
                 f"{self.n_heads * self.head_dim} != d_model={d} (rule: n_heads * head_dim == d_model)")
        if self.n_heads % self.n_kv_heads:
            fail(f"n_kv_heads={self.n_kv_heads} does not divide n_heads={self.n_heads} "
                 f"(rule: grouped-query attention shares each KV head among n_heads/n_kv_heads query heads)")
        if self.d_ff is None:
            object.__setattr__(self, "d_ff", 4 * d)
        if self.d_ff < 1:
            fail(f"d_ff={self.d_ff} must be a positive integer")
        if self.window > self.max_window:
            fail(f"window={self.window} > max_window={self.max_window} "
                 f"(rule: a segment's positions must fit the learned position table)")
        if self.rnn_mode not in RNN_MODES:
            fail(f"unknown rnn_mode {self.rnn_mode!r}; choose one of {', '.join(RNN_MODES)}")
        if self.memory:
            if d % self.xattn_heads:
                fail(f"xattn_heads={self.xattn_heads} does not divide d_model={d} "
                     f"(rule: cross-attention heads have size d_model / xattn_heads)")
            if (d // self.xattn_heads) % 2:
                fail(f"d_model / xattn_heads = {d // self.xattn_heads} is odd "
                     f"(rule: rotary cross-attention rotates pairs of channels)")
            if self.window % self.chunk:
                fail(f"chunk={self.chunk} does not divide window={self.window} "
                     f"(rule: a full segment holds a whole number of chunks)")
            if not isinstance(self.rnn_layers, int) or self.rnn_layers < 1:
                fail(f"rnn_layers={self.rnn_layers!r} must be >= 1 when memory is on")
        for name in ("rnn_cuda_graphs", "compile_blocks_once"):
            if not isinstance(getattr(self, name), bool):
                fail(f"{name}={getattr(self, name)!r} must be true or false")
        if self.chunk_pool not in CHUNK_POOLS:
            fail(f"unknown chunk_pool {self.chunk_pool!r}; choose one of {', '.join(CHUNK_POOLS)}")
        if self.chunk_pool == "mean" and self.rnn_mode != "chunked":
            fail(f"chunk_pool='mean' needs rnn_mode='chunked' (in stream mode a chunk's tokens may span "
                 f"segments; its summary is the output at its last token); got rnn_mode={self.rnn_mode!r}")
        if self.compressor_hidden is None:
            object.__setattr__(self, "compressor_hidden", d // 2)
        if self.compressor_hidden < 1:
            fail(f"compressor_hidden={self.compressor_hidden} must be a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            fail(f"dropout={self.dropout} must be in [0, 1)")

    # ---- conversions -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "HybridConfig":
        """Build from a mapping (a plain dict or a Hydra `DictConfig`); unknown keys fail."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"HybridConfig: unknown key(s) {unknown}; valid keys are {sorted(names)}")
        return cls(**{k: d[k] for k in d})

    def replace(self, **changes: Any) -> "HybridConfig":
        """A copy with fields changed (derived fields re-derived only if passed as None)."""
        return HybridConfig.from_dict({**self.to_dict(), **changes})
