"""Tokenizers: raw UTF-8 bytes, or a byte-level BPE trained locally and cached on disk.

Both map any ``str`` to ids in ``[0, vocab_size)`` and back exactly
(``decode(encode(s)) == s``). Both are *byte-level*: every id stands for a fixed byte
string (``token_bytes(id)``). That makes characters countable without decoding: a run of
ids covers as many characters as its bytes hold UTF-8 *lead* bytes (a byte ``0b10xxxxxx``
continues a character, any other byte starts one). The count is additive over any cut of
the id stream, so the characters under the targets of every window sum to the characters
of the text, and

    bits per character  bpc = total_nats / (n_chars · ln 2)

is exact for either tokenizer; a loss in nats/token converts with the split's
chars/token: ``bpc = loss / (chars_per_token · ln 2)``. That is what makes a byte model
and a BPE model comparable.

The BPE is trained with HuggingFace ``tokenizers`` on the *training* split only, once: the
result is cached as ``<cache_dir>/bpe-<vocab>-<key>.json`` where ``key`` hashes the corpus
identity, the vocabulary size and the recipe version (``BPE_VERSION`` and the library's
version), and later constructions load it.
"""
from __future__ import annotations

import abc
import hashlib
import math
import os
import re
import tempfile
from functools import cached_property
from pathlib import Path
from typing import Iterable, Sequence

import tokenizers
import torch
from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

__all__ = [
    "TOKENIZERS", "BPE_VERSION", "Tokenizer", "ByteTokenizer", "BPETokenizer",
    "build_tokenizer", "train_bpe", "default_cache_dir", "bits_per_char", "chars_per_token",
]

TOKENIZERS = ("bytes", "bpe")
# Bump when the training recipe below changes, so cached tokenizers are retrained.
BPE_VERSION = 1


class Tokenizer(abc.ABC):
    """Common interface: text ↔ ids, and the byte string each id stands for."""

    name: str
    vocab_size: int

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """The ids of ``text``."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    @abc.abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token ``token_id`` stands for."""

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; a cut through a multi-byte character decodes to U+FFFD."""
        table = self._byte_table
        return b"".join(table[int(i)] for i in ids).decode("utf-8", errors="replace")

    @cached_property
    def _byte_table(self) -> list[bytes]:
        return [self.token_bytes(i) for i in range(self.vocab_size)]

    @cached_property
    def char_counts(self) -> torch.Tensor:
        """(vocab_size,) int64: UTF-8 lead bytes in each token = characters it starts."""
        return torch.tensor(
            [sum(1 for b in tb if b & 0xC0 != 0x80) for tb in self._byte_table], dtype=torch.int64
        )

    def count_chars(self, ids: Sequence[int] | torch.Tensor) -> int:
        """Characters covered by ``ids`` (any shape); additive over any cut of a stream."""
        ids = torch.as_tensor(ids, dtype=torch.int64)
        return int(self.char_counts[ids.reshape(-1)].sum())

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """Identity on UTF-8 bytes: vocab 256, id = byte value."""

    name = "bytes"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_tensor(self, text: str) -> torch.Tensor:
        """(len(utf8),) int64 without a Python list: the fast path for whole corpora."""
        data = bytearray(text.encode("utf-8"))
        if not data:
            return torch.empty(0, dtype=torch.int64)
        return torch.frombuffer(data, dtype=torch.uint8).to(torch.int64)

    def token_bytes(self, token_id: int) -> bytes:
        if not 0 <= token_id < 256:
            raise ValueError(f"byte token id {token_id} out of range [0, 256)")
        return bytes([token_id])

    def decode(self, ids: Iterable[int]) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        return bytes(ids).decode("utf-8", errors="replace")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-character map that byte-level BPE vocabularies are spelled in."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_PIECE_END = re.compile(r"(?<=\S)\n")
_PIECE_CHARS = 4096


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style pre-tokenization, no special tokens) from ``tokenizers``.

    ``loaded_from_cache`` says whether this instance was read from disk or trained now;
    ``path`` is its cache file.
    """

    name = "bpe"

    def __init__(self, hf_tokenizer, *, path: Path | None = None, loaded_from_cache: bool = False):
        self._tok = hf_tokenizer
        self.path = path
        self.loaded_from_cache = loaded_from_cache
        self.vocab_size = hf_tokenizer.get_vocab_size()
        char_to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        self._bytes = [b""] * self.vocab_size
        for token, i in hf_tokenizer.get_vocab().items():
            self._bytes[i] = bytes(char_to_byte[c] for c in token)
        # Every single byte must be a token, or some text could not be encoded at all.
        missing = set(range(256)) - {tb[0] for tb in self._bytes if len(tb) == 1}
        if missing:
            raise ValueError(f"BPE vocabulary lacks {len(missing)} single-byte tokens, e.g. {sorted(missing)[:5]}")

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        return cls(HFTokenizer.from_file(str(path)), path=Path(path), loaded_from_cache=True)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # Long texts are encoded in pieces (about 2x faster on whole plays). A piece ends
        # before a newline that follows a non-space character: no pre-token of the GPT-2
        # pattern spans such a point (letters, digits and punctuation runs exclude
        # whitespace, and whitespace runs start at whitespace), so the ids are identical.
        pieces, owner = [], []
        for k, text in enumerate(texts):
            start = 0
            for m in _PIECE_END.finditer(text):
                if m.start() - start >= _PIECE_CHARS:
                    pieces.append(text[start:m.start()])
                    owner.append(k)
                    start = m.start()
            pieces.append(text[start:])
            owner.append(k)
        out: list[list[int]] = [[] for _ in texts]
        for k, enc in zip(owner, self._tok.encode_batch(pieces)):
            out[k].extend(enc.ids)
        return out

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id]


def default_cache_dir() -> Path:
    """``$LOWPREC_CACHE/tokenizers``, else ``~/.cache/lowprec/tokenizers``."""
    root = os.environ.get("LOWPREC_CACHE") or Path.home() / ".cache" / "lowprec"
    return Path(root) / "tokenizers"


def _cache_key(corpus_id: str, vocab_size: int) -> str:
    spec = f"{corpus_id}|vocab={vocab_size}|bpe_v{BPE_VERSION}|tokenizers={tokenizers.__version__}"
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def train_bpe(
    texts: Sequence[str],
    vocab_size: int,
    *,
    cache_dir: str | Path | None = None,
    corpus_id: str | None = None,
) -> BPETokenizer:
    """Byte-level BPE with ``vocab_size`` ids (256 bytes + merges) trained on ``texts``.

    Loaded from ``cache_dir`` when a tokenizer with the same key exists, else trained and
    written there atomically (a concurrent run never reads a half-written file).
    ``corpus_id`` names the training text (default: a hash of ``texts``).
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size <= 256:
        raise ValueError(
            f"bpe vocab_size must be an int > 256 (the byte alphabet), got {vocab_size!r}; "
            "use tokenizer=bytes for a 256-id vocabulary"
        )
    if corpus_id is None:
        h = hashlib.sha256()
        for t in texts:
            h.update(hashlib.sha256(t.encode("utf-8")).digest())
        corpus_id = h.hexdigest()
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = cache_dir / f"bpe-{vocab_size}-{_cache_key(corpus_id, vocab_size)}.json"
    if path.exists():
        return BPETokenizer.load(path)

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        tok.save(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return BPETokenizer(tok, path=path, loaded_from_cache=False)


def build_tokenizer(
    name: str,
    *,
    vocab_size: int | None = None,
    train_texts: Sequence[str] | None = None,
    corpus_id: str | None = None,
    cache_dir: str | Path | None = None,
) -> Tokenizer:
    """``bytes`` → ByteTokenizer; ``bpe`` → ``train_bpe(train_texts, vocab_size, ...)``."""
    if name == "bytes":
        if vocab_size not in (None, 256):
            raise ValueError(f"tokenizer=bytes has vocab_size 256, got vocab_size={vocab_size}")
        return ByteTokenizer()
    if name == "bpe":
        if train_texts is None:
            raise ValueError("tokenizer=bpe needs train_texts (the training split) to train on")
        return train_bpe(train_texts, vocab_size, cache_dir=cache_dir, corpus_id=corpus_id)
    raise ValueError(f"unknown tokenizer {name!r}; choose one of {TOKENIZERS}")


def bits_per_char(total_nats: float, n_chars: int) -> float:
    """bpc = total_nats / (n_chars · ln 2)."""
    if n_chars <= 0:
        raise ValueError(f"bits_per_char needs n_chars > 0, got {n_chars}")
    return float(total_nats) / (n_chars * math.log(2))


def chars_per_token(tokenizer: Tokenizer, tokens: Sequence[int] | torch.Tensor) -> float:
    """Characters per token over ``tokens``; ``bpc = loss_nats_per_token / (this · ln 2)``."""
    n_tokens = len(tokens)
    if n_tokens == 0:
        raise ValueError("chars_per_token of an empty token stream")
    return tokenizer.count_chars(tokens) / n_tokens
