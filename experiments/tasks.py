"""Long-context retrieval tasks: a passkey, or one of several ``key: value`` records, hidden
in filler text and asked for at the end.

Every prompt is built in *token space* for a given tokenizer, from separately encoded
pieces, so lengths are exact::

    [intro] filler+records  NEEDLE_HEAD ANSWER NEEDLE_TAIL  filler+records  QUESTION  | ANSWER
                                        ^ needle_pos                                   ^ len(prompt)

``distance = len(prompt_ids) - needle_pos``: how many tokens back the first answer token
was stated. A model with attention window W, generating the answer at position
``len(prompt)``, cannot attend to the needle when ``distance > W`` — only memory (the RNN
state) can carry it; that is the point of the task. The question ends with the same words
as the needle's head, so a model copies what followed them.

Passkey:  "... The pass key is 71432. Remember it. ... What is the pass key? The pass key is" → " 71432"
Key–value: "... kzqwe: 40917. ... What is kzqwe? kzqwe:" → " 40917", beside ``n_pairs - 1``
distractor records placed at random before or after the queried one.

Filler is the tokens of some repeated plain sentences (``repeat``), any token stream such as the
validation split's (``corpus``), or a phrase of random lowercase words drawn for each prompt and
repeated (``random``: it cannot be memorized in the weights, so predicting it pays for copying
from earlier text on every token, the skill retrieval needs), read cyclically from a random
offset and cut to exact length.
Everything is drawn from ``random.Random`` seeded with strings, so it is identical across
runs and machines.

Training reads such prompts as TBPTT segments (:class:`RetrievalStreamer`); a model is scored by
:func:`memory_retrieval_accuracy`, with its memory on, off and shuffled across prompts.
"""
from __future__ import annotations

import logging
import random
import string
from dataclasses import dataclass, field, replace
from typing import Iterator, Sequence

import torch

from .tokenizer import Tokenizer

__all__ = [
    "TASKS", "DEFAULT_DISTANCES", "CONTROLS", "RetrievalConfig", "RetrievalExample", "make_example",
    "retrieval_examples", "RetrievalStreamer", "memory_retrieval_accuracy",
    "training_row_len", "random_phrase", "filler_source", "prompt_kwargs",
]

log = logging.getLogger(__name__)

TASKS = ("passkey", "kv")
DEFAULT_DISTANCES = (256, 1024, 4096, 16384, 65536)
FILLERS = ("repeat", "corpus", "random")

FILLER_TEXT = (
    " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
)
_INTRO = {
    "passkey": "There is a pass key hidden inside a lot of irrelevant text. Find it and "
               "remember it. You will be asked for it at the end.",
    "kv": "Some records of the form key: value are hidden inside a lot of irrelevant text. "
          "Remember them. You will be asked for one value at the end.",
}


@dataclass(frozen=True)
class RetrievalConfig:
    """The retrieval evaluation of a run (the ``retrieval`` block of a data config)."""

    kinds: tuple[str, ...] = TASKS
    distances: tuple[int, ...] = DEFAULT_DISTANCES
    per_bucket: int = 20          # prompts per (kind, distance)
    n_digits: int = 5             # digits of a passkey / value
    n_pairs: int = 8              # kv: records per prompt, the queried one included
    filler: str = "repeat"        # repeat: FILLER_TEXT; corpus: the validation split's tokens; random: per prompt
    intro: bool = False           # prepend the instruction sentence (for instruction-tuned models)
    seed: int = 1234

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))
        object.__setattr__(self, "distances", tuple(int(d) for d in self.distances))
        for k in self.kinds:
            if k not in TASKS:
                raise ValueError(f"unknown retrieval kind {k!r}; choose from {TASKS}")
        if not self.distances or min(self.distances) <= 0:
            raise ValueError(f"retrieval distances must be positive token counts, got {self.distances}")
        if self.filler not in FILLERS:
            raise ValueError(f"unknown retrieval filler {self.filler!r}; choose one of {FILLERS}")
        for name in ("per_bucket", "n_digits", "n_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"retrieval.{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class RetrievalExample:
    """One prompt; ``prompt_ids[needle_pos:needle_pos+len(answer_ids)] == answer_ids``."""

    kind: str
    prompt_ids: list[int]
    answer_ids: list[int]
    answer: str              # the answer's text, e.g. " 71432"
    distance: int            # len(prompt_ids) - needle_pos, in tokens
    needle_pos: int
    meta: dict = field(default_factory=dict)


def _take(filler: Sequence[int], n: int, rng: random.Random) -> list[int]:
    """``n`` tokens of ``filler`` read cyclically from a random offset."""
    if n <= 0:
        return []
    start = rng.randrange(len(filler))
    reps = (start + n) // len(filler) + 1
    return (list(filler) * reps)[start:start + n] if reps > 1 else list(filler[start:start + n])


def _region(length: int, records: list[list[int]], filler, rng: random.Random) -> list[int]:
    """Exactly ``length`` tokens: filler with ``records`` placed at random cut points."""
    free = length - sum(map(len, records))
    assert free >= 0, (length, records)
    cuts = sorted(rng.randint(0, free) for _ in records)
    out, prev = [], 0
    for cut, rec in zip(cuts, records):
        out += _take(filler, cut - prev, rng) + rec
        prev = cut
    return out + _take(filler, free - prev, rng)


def random_phrase(rng: random.Random, words: tuple[int, int] = (3, 6)) -> str:
    """`` w1 w2 ... wn.``: a random number of random lowercase words (2-6 letters; no digits, so it
    never looks like a key), the unit a ``random`` filler repeats."""
    n = rng.randint(*words)
    return " " + " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6)))
                          for _ in range(n)) + "."


def filler_source(mode: str, corpus_tokens):
    """What :func:`make_example` takes as ``filler`` for a ``data.retrieval.filler`` mode."""
    if mode not in FILLERS:
        raise ValueError(f"unknown retrieval filler {mode!r}; choose one of {FILLERS}")
    return {"repeat": None, "corpus": corpus_tokens, "random": "random"}[mode]


def prompt_kwargs(retrieval, corpus_tokens) -> dict:
    """The :func:`make_example` keywords a ``data.retrieval`` block sets (digits, records, intro,
    filler), ``corpus_tokens`` standing in for the ``corpus`` filler."""
    return {"n_digits": retrieval.n_digits, "n_pairs": retrieval.n_pairs, "intro": retrieval.intro,
            "filler": filler_source(retrieval.filler, corpus_tokens)}


def _digits(n: int, rng: random.Random) -> str:
    return str(rng.randint(10 ** (n - 1), 10 ** n - 1))


def make_example(
    kind: str,
    tokenizer: Tokenizer,
    distance: int | None,
    *,
    rng: random.Random,
    filler: Sequence[int] | torch.Tensor | str | None = None,
    prefix_tokens: int = 0,
    total_len: int | None = None,
    n_digits: int = 5,
    n_pairs: int = 8,
    intro: bool = False,
) -> RetrievalExample:
    """One retrieval prompt whose needle is exactly ``distance`` tokens before its end.

    ``prefix_tokens``: filler tokens before the needle (records placed there add to it).
    ``total_len``: instead make ``len(prompt_ids) + len(answer_ids) == total_len`` (a training
    row), the prefix taking up the rest; with ``distance=None`` the distance is then drawn
    uniformly over what fits.
    """
    if kind not in TASKS:
        raise ValueError(f"unknown retrieval kind {kind!r}; choose from {TASKS}")
    if distance is None and total_len is None:
        raise ValueError("make_example needs a distance, or a total_len to draw one within")
    enc = tokenizer.encode
    if isinstance(filler, str):
        if filler != "random":
            raise ValueError(f"filler={filler!r}: give token ids, None (the plain sentences) or 'random'")
        filler = enc(random_phrase(rng))
    if filler is None:
        filler = enc(FILLER_TEXT)
    elif isinstance(filler, torch.Tensor):
        filler = filler.reshape(-1).tolist()
    if len(filler) == 0:
        raise ValueError("retrieval filler is empty")

    records: list[list[int]] = []
    secret = _digits(n_digits, rng)
    if kind == "passkey":
        head, tail = enc(" The pass key is"), enc(". Remember it.")
        question = enc(" What is the pass key? The pass key is")
    else:
        keys: list[str] = []
        while len(keys) < n_pairs:
            k = "".join(rng.choice(string.ascii_lowercase) for _ in range(5))
            if k not in keys:
                keys.append(k)
        head, tail = enc(f" {keys[0]}:"), enc(".")
        question = enc(f" What is {keys[0]}? {keys[0]}:")
        records = [enc(f" {k}:") + enc(" " + _digits(n_digits, rng)) + enc(".") for k in keys[1:]]
    answer_text = " " + secret
    answer = enc(answer_text)
    intro_ids = enc(_INTRO[kind]) if intro else []

    # Records go before or after the needle at random, so position says nothing about which is asked.
    side_after = [rng.random() < 0.5 for _ in records]
    min_distance = len(answer) + len(tail) + len(question)
    fixed = len(intro_ids) + len(head)  # tokens of the prompt outside distance and prefix
    n_records = sum(map(len, records))
    if total_len is not None:
        room = total_len - len(answer) - fixed - n_records  # for the free filler of both regions
        if room < min_distance:
            raise ValueError(
                f"total_len={total_len} is too short for a {kind} row: it needs >= "
                f"{total_len - room + min_distance} tokens with this tokenizer"
            )
        if distance is None:
            distance = rng.randint(min_distance, room) + sum(
                len(r) for r, after in zip(records, side_after) if after)
    if distance < min_distance:
        raise ValueError(
            f"{kind} distance {distance} is shorter than the answer, needle tail and question "
            f"take ({min_distance} tokens with this tokenizer)"
        )
    gap = distance - min_distance
    after = [r for r, a in zip(records, side_after) if a]
    before = [r for r, a in zip(records, side_after) if not a]
    while sum(map(len, after)) > gap:  # records that do not fit after the needle go before it
        before.append(after.pop())
    prefix = prefix_tokens + sum(map(len, before))
    if total_len is not None:
        prefix = total_len - len(answer) - fixed - distance
        # records that do not fit before the needle go after it, where the gap has room
        while before and sum(map(len, before)) > prefix and sum(map(len, after)) + len(before[-1]) <= gap:
            after.append(before.pop())
        if prefix < sum(map(len, before)):
            raise ValueError(
                f"total_len={total_len} cannot hold a {kind} needle at distance {distance}: it "
                f"needs >= {total_len - prefix + sum(map(len, before))} tokens with this tokenizer"
            )
    prompt = (intro_ids + _region(prefix, before, filler, rng) + head + answer + tail
              + _region(gap, after, filler, rng) + question)
    needle_pos = len(prompt) - distance
    assert prompt[needle_pos:needle_pos + len(answer)] == answer
    return RetrievalExample(kind, prompt, answer, answer_text, distance, needle_pos,
                            meta={"n_records": len(records) + (kind == "kv")})


def retrieval_examples(
    tokenizer: Tokenizer,
    kind: str = "passkey",
    *,
    distances: Sequence[int] = DEFAULT_DISTANCES,
    per_bucket: int = 20,
    seed: int = 0,
    filler: Sequence[int] | torch.Tensor | str | None = None,
    **kwargs,
) -> list[RetrievalExample]:
    """``per_bucket`` prompts at each distance; example ``i`` at ``d`` depends only on
    (seed, kind, d, i), so buckets can be added without changing the others."""
    out = []
    for d in distances:
        for i in range(per_bucket):
            rng = random.Random(f"retrieval:{seed}:{kind}:{d}:{i}")
            out.append(make_example(kind, tokenizer, int(d), rng=rng, filler=filler, **kwargs))
    return out


def training_row_len(train) -> int | None:
    """Prompt + answer length of the rows a run's ``train`` section trains on with a retrieval task
    (``tbptt_segments x seq_len + 1``, as :class:`RetrievalStreamer` builds them); None for a run
    trained on running text (``task=lm``)."""
    if train.get("task", "lm") == "lm":
        return None
    return int(train["tbptt_segments"]) * int(train["seq_len"]) + 1


class RetrievalStreamer:
    """Retrieval prompts for TBPTT training, read like a ``SegmentStreamer``: B rows of
    ``k·T + 1`` tokens (prompt + answer), served as k segments (B, T) in order.

    Yields ``(x, y, reset)``; ``reset`` is True on a row set's first segment (the carried state
    must be dropped: a new prompt starts). The needle's distance is drawn uniformly over what
    fits the row, so most needles sit in an earlier segment than the answer and only the carried
    state (the memory) can bring them back. ``answer_only``: every target but the answer's is
    ``IGNORE`` (-100, cross-entropy's ignore_index), so the loss is the answer's alone. Row set
    ``r`` depends only on (seed, kind, r); ``state_dict`` (row set, segment) resumes exactly.
    ``kwargs`` go to :func:`make_example` (n_digits, n_pairs, intro)."""

    IGNORE = -100

    def __init__(self, tokenizer: Tokenizer, batch_size: int, seq_len: int, segments: int, seed: int = 0, *,
                 kind: str = "passkey", filler: Sequence[int] | torch.Tensor | str | None = None,
                 answer_only: bool = False, **kwargs):
        if kind not in TASKS:
            raise ValueError(f"unknown retrieval kind {kind!r}; choose from {TASKS}")
        if min(batch_size, seq_len, segments) < 1:
            raise ValueError(f"batch_size, seq_len and segments must be >= 1, got {batch_size}, {seq_len}, {segments}")
        if isinstance(filler, torch.Tensor):
            filler = filler.reshape(-1).tolist()
        self.tokenizer, self.batch_size, self.seq_len, self.segments, self.seed = (
            tokenizer, batch_size, seq_len, segments, seed)
        self.kind, self.filler, self.kwargs, self.answer_only = kind, filler, kwargs, answer_only
        self.rowset, self.segment = 0, 0
        self._rows: tuple[int, torch.Tensor, torch.Tensor] | None = None
        self._make(0)  # fail now (row too short for the task) rather than at the first step

    def _make(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows (B, L) of prompt + answer, targets (B, L - 1): the rows shifted by one)."""
        if self._rows is None or self._rows[0] != r:
            L = self.segments * self.seq_len + 1
            rows = torch.empty(self.batch_size, L, dtype=torch.int64)
            targets = torch.empty(self.batch_size, L - 1, dtype=torch.int64)
            for b in range(self.batch_size):
                rng = random.Random(f"retrieval-stream:{self.seed}:{self.kind}:{r}:{b}")
                ex = make_example(self.kind, self.tokenizer, None, rng=rng, filler=self.filler, total_len=L,
                                  **self.kwargs)
                rows[b] = torch.tensor(ex.prompt_ids + ex.answer_ids, dtype=torch.int64)
                targets[b] = rows[b, 1:]
                if self.answer_only:
                    targets[b, :len(ex.prompt_ids) - 1] = self.IGNORE
            self._rows = (r, rows, targets)
        return self._rows[1], self._rows[2]

    @property
    def segments_per_epoch(self) -> int:
        return self.segments

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, bool]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor, bool]:
        if self.segment >= self.segments:
            self.rowset, self.segment = self.rowset + 1, 0
        (rows, targets), T, s = self._make(self.rowset), self.seq_len, self.segment
        x, y = rows[:, s * T:(s + 1) * T], targets[:, s * T:(s + 1) * T]
        self.segment += 1
        return x.contiguous(), y.contiguous(), s == 0

    def state_dict(self) -> dict:
        return {"seed": self.seed, "kind": self.kind, "rowset": self.rowset, "segment": self.segment}

    def load_state_dict(self, state: dict) -> None:
        if (state["seed"], state["kind"]) != (self.seed, self.kind):
            raise ValueError(f"RetrievalStreamer state is for seed/kind {state['seed']}/{state['kind']}, "
                             f"this one is {self.seed}/{self.kind}")
        self.rowset, self.segment = int(state["rowset"]), int(state["segment"])


# ------------------------------------------------------------------------------- scoring

@torch.no_grad()
def _run(model, ids: torch.Tensor, state, segment: int, *, carry: bool = True):
    """Feed ``ids`` (B, N) ``segment`` tokens at a time; returns (logits (B, N, V), state).
    ``carry=False`` drops the state before every segment (a windowed model)."""
    outs = []
    for s in range(0, ids.shape[1], segment):
        logits, state = model(ids[:, s:s + segment], state if carry else None)
        outs.append(logits)
    return (torch.cat(outs, dim=1) if outs else None), state


def _roll(state):
    """The state of row b replaced by row b+1's (cyclically): each prompt gets a neighbour's memory."""
    dims = {"h": 1, "c": 1, "memory": 0, "pending": 0}
    return replace(state, **{k: torch.roll(getattr(state, k), 1, dims[k]) for k in dims
                             if getattr(state, k) is not None})


CONTROLS = ("on", "off", "shuffled")


@torch.no_grad()
def memory_retrieval_accuracy(model, tokenizer, *, distances, per_bucket: int, device, segment: int,
                              kind: str = "passkey", seed: int = 0, row_len: int | None = None,
                              **example_kwargs) -> dict[str, dict[int, float]]:
    """{control: {distance: accuracy}} for a retrieval task with memory ``on`` / ``off`` / ``shuffled``.

    Each prompt is read ``segment`` tokens at a time (the training segment length: self-attention
    sees the current segment, everything earlier arrives through the carried state). Scored by
    teacher forcing: prompt + the answer's first k-1 tokens go in, and an example counts as correct
    iff the argmax at each of the k answer positions is the answer token, which is exactly when
    greedy decoding would produce the answer. The segment holding the first answer position starts
    at ``cut``. Controls: ``on`` carries the state; ``off`` drops it before every segment (a
    windowed model); ``shuffled`` carries into the segment at ``cut`` the state another prompt of
    the same distance bucket left there (prompts of a bucket are scored as one batch, the state
    rolled by one row), so only what the memory holds about THIS prompt can help.

    ``row_len``: every prompt + answer is exactly this long (filler before the needle makes up the
    rest), as the rows of a retrieval training task are: a model trained on such rows has only
    seen the question at their end (in the last segment, at the same in-segment positions), so
    shorter prompts would score it on positions it never answered at. None: the prompts are as
    short as the distance allows (a model trained on running text)."""
    if per_bucket < 2:
        raise ValueError(f"per_bucket={per_bucket}: the shuffled control needs >= 2 prompts per distance")
    if row_len is not None:
        example_kwargs["total_len"] = row_len
    examples = retrieval_examples(tokenizer, kind, distances=distances, per_bucket=per_bucket, seed=seed,
                                  **example_kwargs)
    groups: dict[tuple[int, int], list] = {}
    for ex in examples:  # rows of a group share the distance and the cut (equal prompt prefixes)
        groups.setdefault((ex.distance, (len(ex.prompt_ids) - 1) // segment * segment), []).append(ex)
    hits: dict[str, dict[int, list[int]]] = {m: {} for m in CONTROLS}
    was_training = model.training
    model.eval()
    for (distance, cut), exs in groups.items():
        if len(exs) < 2:
            log.warning("retrieval: a lone prompt at distance %d (its prefix length differs from the bucket's) "
                        "is left out: the shuffled control needs a neighbour", distance)
            continue
        prefix = torch.tensor([ex.prompt_ids[:cut] for ex in exs], dtype=torch.int64, device=device)
        tails = [ex.prompt_ids[cut:] + ex.answer_ids[:-1] for ex in exs]
        width = max(map(len, tails))
        tail = torch.tensor([t + [0] * (width - len(t)) for t in tails], dtype=torch.int64, device=device)
        _, state = _run(model, prefix, None, segment) if cut else (None, None)
        for mode in CONTROLS:
            carried = None if mode == "off" or state is None else (_roll(state) if mode == "shuffled" else state)
            logits, _ = _run(model, tail, carried, segment, carry=mode != "off")
            pred = logits.argmax(-1).tolist()
            for ex, p in zip(exs, pred):
                first = len(ex.prompt_ids) - 1 - cut
                hits[mode].setdefault(distance, []).append(int(p[first:first + len(ex.answer_ids)] == ex.answer_ids))
    model.train(was_training)
    return {m: {d: sum(v) / len(v) for d, v in sorted(h.items())} for m, h in hits.items()}
