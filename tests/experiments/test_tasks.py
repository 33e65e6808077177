"""Long-context retrieval prompts: exact distances, determinism, training rows."""
import random
import re

import pytest
import torch

from experiments import (
    ByteTokenizer,
    RetrievalConfig,
    RetrievalStreamer,
    make_example,
    retrieval_examples,
    train_bpe,
)
from experiments.tasks import FILLER_TEXT

DISTANCES = [64, 256, 1024, 4096, 16384, 65536]


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    text = (FILLER_TEXT * 50 + " The pass key is 12345. Remember it. What is the pass key?"
            " abcde: 67890. What is abcde? 0123456789") * 20
    return train_bpe([text], 300, cache_dir=tmp_path_factory.mktemp("tok"), corpus_id="tasks")


@pytest.fixture(params=["bytes", "bpe"])
def tokenizer(request, bpe):
    return ByteTokenizer() if request.param == "bytes" else bpe


@pytest.mark.parametrize("kind", ["passkey", "kv"])
def test_needle_is_exactly_distance_tokens_before_the_end(kind, tokenizer):
    for ex in retrieval_examples(tokenizer, kind, distances=DISTANCES, per_bucket=2, seed=5):
        n = len(ex.answer_ids)
        pos = len(ex.prompt_ids) - ex.distance
        assert ex.distance in DISTANCES and pos == ex.needle_pos
        assert ex.prompt_ids[pos:pos + n] == ex.answer_ids
        assert re.fullmatch(r" [1-9]\d{4}", ex.answer) and tokenizer.decode(ex.answer_ids) == ex.answer
        prompt = tokenizer.decode(ex.prompt_ids)
        if kind == "passkey":
            assert prompt.endswith(" What is the pass key? The pass key is")
            assert prompt.count(ex.answer.strip()) == 1  # stated once
        else:
            key = re.search(r"What is (\w+)\? \1:$", prompt).group(1)
            records = re.findall(r" ([a-z]{5}): (\d{5})\.", prompt)
            assert len(records) == 8 and dict(records)[key] == ex.answer.strip()


def test_prompts_are_a_pure_function_of_the_seed():
    tok = ByteTokenizer()
    a = retrieval_examples(tok, "kv", distances=[300], per_bucket=3, seed=1)
    b = retrieval_examples(tok, "kv", distances=[300], per_bucket=3, seed=1)
    c = retrieval_examples(tok, "kv", distances=[300], per_bucket=3, seed=2)
    assert [e.prompt_ids for e in a] == [e.prompt_ids for e in b]
    assert [e.answer for e in a] != [e.answer for e in c]
    # Adding a bucket leaves the others' prompts as they were.
    d = retrieval_examples(tok, "kv", distances=[100, 300], per_bucket=3, seed=1)
    assert [e.prompt_ids for e in d[3:]] == [e.prompt_ids for e in a]


def test_corpus_filler_and_intro():
    tok = ByteTokenizer()
    filler = tok.encode("To be, or not to be, that is the question. " * 10)
    ex = make_example("passkey", tok, 500, rng=random.Random(0), filler=torch.tensor(filler),
                      prefix_tokens=100, intro=True)
    prompt = tok.decode(ex.prompt_ids)
    assert prompt.startswith("There is a pass key hidden") and "not to be" in prompt
    assert len(ex.prompt_ids) - ex.needle_pos == 500


@pytest.mark.parametrize("kind", ["passkey", "kv"])
def test_training_rows_fill_the_segments_and_end_with_the_answer(kind, tokenizer):
    """Rows of 2 segments x 64 tokens + 1: prompt + answer exactly, the answer last; with
    answer_only every other target is ignored; a resumed streamer serves the identical next rows."""
    rows = RetrievalStreamer(tokenizer, 4, 64, 2, seed=0, kind=kind, answer_only=True, n_pairs=3)
    segs = [next(rows) for _ in range(2)]
    x = torch.cat([segs[0][0], segs[1][0]], dim=1)
    y = torch.cat([segs[0][1], segs[1][1]], dim=1)
    assert x.shape == y.shape == (4, 128) and [r for _, _, r in segs] == [True, False]
    scored = y != RetrievalStreamer.IGNORE
    assert torch.equal(x[:, 1:][scored[:, :-1]], y[:, :-1][scored[:, :-1]])  # targets: the row shifted by one
    for b in range(4):
        answer = tokenizer.decode(y[b][scored[b]].tolist())
        assert re.fullmatch(r" \d{5}", answer)
        assert int(scored[b].nonzero()[-1]) == 127  # the answer ends the row
    state = rows.state_dict()
    expected = next(rows)
    resumed = RetrievalStreamer(tokenizer, 4, 64, 2, seed=0, kind=kind, answer_only=True, n_pairs=3)
    resumed.load_state_dict(state)
    got = next(resumed)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_bad_input_is_refused_with_the_numbers():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"unknown retrieval kind 'needle'; choose from \('passkey', 'kv'\)"):
        make_example("needle", tok, 100, rng=random.Random(0))
    with pytest.raises(ValueError, match=r"passkey distance 10 is shorter than .* \(58 tokens"):
        make_example("passkey", tok, 10, rng=random.Random(0))
    with pytest.raises(ValueError, match="total_len=40 is too short for a passkey row"):
        RetrievalStreamer(tok, 1, 39, 1)
    with pytest.raises(ValueError, match="unknown retrieval filler 'lorem'"):
        RetrievalConfig(filler="lorem")


def test_random_filler_is_a_repeated_phrase_drawn_per_prompt():
    """filler='random': around the needle and question, the prompt is one phrase of random lowercase
    words repeated (read from a random offset); the phrase depends only on the prompt's rng."""
    from experiments.tasks import filler_source, random_phrase

    tok = ByteTokenizer()
    exs = [make_example("passkey", tok, 120, rng=random.Random(f"r{i}"), filler="random") for i in range(3)]
    again = make_example("passkey", tok, 120, rng=random.Random("r0"), filler="random")
    assert again.prompt_ids == exs[0].prompt_ids
    phrases = []
    for i, ex in enumerate(exs):
        text = tok.decode(ex.prompt_ids)
        head = text.index(" The pass key is")
        phrase = random_phrase(random.Random(f"r{i}"))
        assert re.fullmatch(r"( [a-z]{2,6}){3,6}\.", phrase)
        # the text before the needle is a run of the phrase, cut at both ends
        assert text[:head] in phrase * (head // len(phrase) + 2)
        assert not re.search(r"[0-9]", text.replace(ex.answer, ""))  # no digit but the key's
        phrases.append(phrase)
    assert len(set(phrases)) == 3
    assert filler_source("random", None) == "random" and filler_source("repeat", [1]) is None
    with pytest.raises(ValueError, match="unknown retrieval filler 'noise'"):
        filler_source("noise", None)
    with pytest.raises(ValueError, match="filler='noise'"):
        make_example("passkey", tok, 120, rng=random.Random(0), filler="noise")
    assert RetrievalConfig(filler="random").filler == "random"


def test_kv_records_move_after_the_needle_when_the_row_has_no_room_before_it():
    """A 385-token row, 8 records of 11 bytes, the needle 320 tokens from the end: the 7 distractors
    fit only if some go after the needle (before it there are 385 - 3 - 7 - 320 = 55 tokens). Every
    draw still gives an exact row with every record in it, for any random side of each record."""
    tok = ByteTokenizer()
    sides = set()
    for i in range(100):
        ex = make_example("kv", tok, 320, rng=random.Random(f"kv-fit:{i}"), total_len=385, n_digits=2, n_pairs=8)
        assert len(ex.prompt_ids) + len(ex.answer_ids) == 385 and ex.distance == 320
        assert ex.prompt_ids[ex.needle_pos:ex.needle_pos + len(ex.answer_ids)] == ex.answer_ids
        text = tok.decode(ex.prompt_ids)
        records = re.findall(r" ([a-z]{5}): (\d{2})\.", text)
        assert len(records) == 8 and len({k for k, _ in records}) == 8  # 7 distractors + the needle
        sides.add(sum(text.index(f" {k}:") < ex.needle_pos for k, _ in records) - 1)  # the needle's own is one
    assert max(sides) <= 5  # never all seven before the needle: 5 x 11 = 55 tokens is all there is
