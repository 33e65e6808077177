"""experiments: what a researcher runs — data, tokenizers, long-context tasks (and the Hydra apps).

Names below are imported lazily on first use, so ``import experiments`` stays cheap
(no torch, no tokenizers) and ``python -m experiments.<app>`` starts fast.
"""
from importlib import import_module

_EXPORTS = {
    # experiments.data
    "SOURCES": "data", "Document": "data", "Corpus": "data", "DataConfig": "data", "Data": "data",
    "load_corpus": "data", "split_corpus": "data", "encode_corpus": "data",
    "require_tokens": "data", "prepare_data": "data", "TokenBatcher": "data",
    "SegmentStreamer": "data", "ValidationWindows": "data",
    # experiments.tokenizer
    "TOKENIZERS": "tokenizer", "Tokenizer": "tokenizer", "ByteTokenizer": "tokenizer",
    "BPETokenizer": "tokenizer", "build_tokenizer": "tokenizer", "train_bpe": "tokenizer",
    "default_cache_dir": "tokenizer", "bits_per_char": "tokenizer", "chars_per_token": "tokenizer",
    # experiments.tasks
    "TASKS": "tasks", "DEFAULT_DISTANCES": "tasks", "RetrievalConfig": "tasks",
    "RetrievalExample": "tasks", "make_example": "tasks", "retrieval_examples": "tasks",
    "RetrievalStreamer": "tasks", "memory_retrieval_accuracy": "tasks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
