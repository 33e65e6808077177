"""Retrieval as a training task (RetrievalStreamer, train.task) and the memory on/off/shuffled scoring."""
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from experiments.build import ConfigError, check_train
from experiments.loop import Stepper
from experiments.tasks import RetrievalStreamer, memory_retrieval_accuracy
from experiments.tokenizer import ByteTokenizer
from experiments.train import train
from hybrid import HybridState


@pytest.fixture
def tok():
    return ByteTokenizer()


def test_streamer_serves_each_prompt_as_k_segments_in_order(tok):
    s = RetrievalStreamer(tok, batch_size=3, seq_len=64, segments=4, seed=7)
    segs = [next(s) for _ in range(8)]
    assert [r for _, _, r in segs] == [True, False, False, False] * 2  # a new prompt every 4 segments
    for first in (0, 4):
        x = torch.cat([segs[first + i][0] for i in range(4)], dim=1)
        y = torch.cat([segs[first + i][1] for i in range(4)], dim=1)
        assert x.shape == (3, 256) and torch.equal(x[:, 1:], y[:, :-1])  # one row, y = x shifted
        for b in range(3):  # each row ends with the question and its answer
            text = tok.decode(torch.cat([x[b], y[b, -1:]]).tolist())
            key = text.split(" The pass key is ")[1][:5]
            assert key.isdigit() and text.endswith("What is the pass key? The pass key is " + key)
    assert not torch.equal(segs[0][0], segs[4][0])


def test_streamer_is_deterministic_and_resumes_exactly(tok):
    a = RetrievalStreamer(tok, 2, 64, 3, seed=1)
    [next(a) for _ in range(4)]
    b = RetrievalStreamer(tok, 2, 64, 3, seed=1)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        xa, ya, ra = next(a)
        xb, yb, rb = next(b)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and ra == rb
    with pytest.raises(ValueError, match="seed/kind"):
        RetrievalStreamer(tok, 2, 64, 3, seed=2).load_state_dict(a.state_dict())


def test_streamer_bad_input(tok):
    with pytest.raises(ValueError, match=r"total_len=33 is too short for a passkey row"):
        RetrievalStreamer(tok, 2, 16, 2)
    with pytest.raises(ValueError, match="unknown retrieval kind 'needle'"):
        RetrievalStreamer(tok, 2, 64, 2, kind="needle")


class InductionOracle(nn.Module):
    """Predicts, at every position, the token that followed the latest earlier occurrence of the
    last ``m`` tokens, searching everything it was shown: the current segment, plus the tokens
    carried in the state (``pending`` holds the whole history). A perfect memory, so the scoring
    must give 1 with memory on, 1 with it off only where the needle is in the answer's segment,
    and 0 with another prompt's memory."""

    def __init__(self, m: int = 16, vocab: int = 256):
        super().__init__()
        self.m, self.vocab = m, vocab

    def forward(self, x, state=None):
        hist = x if state is None else torch.cat([state.pending, x], dim=1)
        B, T = x.shape
        n0 = hist.shape[1] - T
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            h = hist[b].tolist()
            for t in range(T):
                i = n0 + t
                ctx = h[i - self.m + 1:i + 1]
                nxt = 0
                for s in range(i - 1, self.m - 2, -1):
                    if h[s - self.m + 1:s + 1] == ctx:
                        nxt = h[s + 1]
                        break
                logits[b, t, nxt] = 1.0
        return logits, HybridState(pos=hist.shape[1], pending=hist)


def test_memory_controls_with_a_perfect_memory(tok):
    acc = memory_retrieval_accuracy(InductionOracle(), tok, distances=[60, 200], per_bucket=3, device="cpu",
                                    segment=64)
    assert acc["on"] == {60: 1.0, 200: 1.0}
    # both distances put the needle in an earlier segment than the answer (d=60: a 76-token prompt,
    # needle at 16, answer's segment from 64), so without the state or with another prompt's it fails
    assert acc["off"] == {60: 0.0, 200: 0.0}
    assert acc["shuffled"] == {60: 0.0, 200: 0.0}
    short = memory_retrieval_accuracy(InductionOracle(), tok, distances=[60], per_bucket=2, device="cpu", segment=128)
    assert short == {"on": {60: 1.0}, "off": {60: 1.0}, "shuffled": {60: 1.0}}  # one segment: no state involved
    with pytest.raises(ValueError, match="per_bucket=1"):
        memory_retrieval_accuracy(InductionOracle(), tok, distances=[60], per_bucket=1, device="cpu", segment=64)


def test_prompts_as_long_as_the_training_rows(tok):
    """row_len: prompt + answer fill a training row (2 x 128 + 1 tokens), so the question sits at
    the end of the last segment as in training; d=60 then puts the needle in the answer's segment
    (the windowed control answers it; with the short 76-token prompt above the answer's segment
    would be the first one) and d=200 in the first segment, where only the memory reaches it."""
    acc = memory_retrieval_accuracy(InductionOracle(), tok, distances=[60, 200], per_bucket=3, device="cpu",
                                    segment=128, row_len=2 * 128 + 1)
    assert acc == {"on": {60: 1.0, 200: 1.0}, "off": {60: 1.0, 200: 0.0}, "shuffled": {60: 1.0, 200: 0.0}}
    with pytest.raises(ValueError, match="cannot hold a passkey needle at distance 300"):
        memory_retrieval_accuracy(InductionOracle(), tok, distances=[300], per_bucket=2, device="cpu",
                                  segment=128, row_len=2 * 128 + 1)


def test_train_task_config_errors():
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[2] / "configs"), version_base=None):
        cfg = compose("config")
    t = OmegaConf.to_container(cfg.train, resolve=True)
    assert check_train(OmegaConf.create(t))["task"] == "lm"
    with pytest.raises(ConfigError, match=r"train.task='needle' is unknown; choose one of \('lm', 'passkey', 'kv'\)"):
        check_train(OmegaConf.create({**t, "task": "needle"}))
    with pytest.raises(ConfigError, match="train.task=passkey needs train.tbptt=true"):
        check_train(OmegaConf.create({**t, "task": "passkey", "tbptt": False}))
    with pytest.raises(ConfigError, match=r"train.task_loss='tokens' is unknown; choose one of \('all', 'answer'\)"):
        check_train(OmegaConf.create({**t, "task_loss": "tokens"}))
    with pytest.raises(ConfigError, match="train.retrieval_eval='yes' must be true or false"):
        check_train(OmegaConf.create({**t, "retrieval_eval": "yes"}))


def test_train_on_passkeys_scores_retrieval_into_the_summary(corpus, cfg_of, tmp_path):
    """A real (tiny) run: train.task=passkey reads prompts in TBPTT segments; retrieval_eval puts the
    accuracy by distance with every control into summary.json (and ablate's column)."""
    s = train(cfg_of(corpus, tmp_path, "model.window=32", "train.seq_len=32", "precision=bf16", "train.task=passkey",
                     "train.tbptt_segments=4", "train.steps=4", "train.eval_every=4", "train.eval_batches=1",
                     "train.sample_tokens=0", "train.telemetry_every=0", "train.retrieval_eval=true",
                     "data.retrieval.distances=[64,100]", "data.retrieval.per_bucket=2"))
    saved = json.loads((tmp_path / "summary.json").read_text())
    # 4 steps cannot teach 5 random digits (chance 1e-5 per prompt): every control scores exactly 0;
    # the scoring's 1s are checked with the oracle above
    assert saved["retrieval_controls"] == {c: {"64": 0.0, "100": 0.0} for c in ("on", "off", "shuffled")}
    assert saved["retrieval"] == saved["retrieval_controls"]["on"] and s["retrieval"] == {64: 0.0, 100: 0.0}
    assert saved["curve"]["step"] == [4] and saved["curve"]["tokens"] == [4 * 4 * 4 * 32]


@pytest.mark.parametrize("extra, message", [
    ((), "data.retrieval: passkey distance 20 is shorter than the answer"),
    # trained on passkey rows of 2 x 64 + 1 tokens, it is scored on prompts that long: d=200 cannot fit
    (("train.task=passkey", "train.tbptt_segments=2", "train.seq_len=64", "model.window=64", "model.max_window=64",
      "data.retrieval.distances=[200]"), "data.retrieval: total_len=129 cannot hold a passkey needle at distance 200"),
])
def test_retrieval_eval_bad_distances_fail_before_training(corpus, cfg_of, tmp_path, extra, message):
    """A distance too short for the prompt, or too long for the training rows, is refused when the
    run is built, not after training."""
    with pytest.raises(ConfigError, match=re.escape(message)):
        train(cfg_of(corpus, tmp_path / "run", "train.retrieval_eval=true", "data.retrieval.distances=[20]", *extra))
    assert not (tmp_path / "run").exists()


def test_answer_only_targets_score_the_answer_alone(tok):
    full = RetrievalStreamer(tok, 2, 64, 3, seed=4)
    ans = RetrievalStreamer(tok, 2, 64, 3, seed=4, answer_only=True)
    ys_full = torch.cat([next(full)[1] for _ in range(3)], dim=1)
    ys_ans = torch.cat([next(ans)[1] for _ in range(3)], dim=1)
    kept = ys_ans != RetrievalStreamer.IGNORE
    # exactly the 5 answer digits (+ the leading space) at the end of each row stay, unchanged
    assert kept.sum(1).tolist() == [6, 6] and bool(kept[:, -6:].all())
    assert torch.equal(ys_ans[kept], ys_full[kept])
    assert tok.decode(ys_ans[0, -6:].tolist()).strip().isdigit()


def test_stepper_loss_is_the_mean_over_scored_targets(tok):
    """With answer-only targets the step's loss is the mean cross-entropy of the answer tokens
    (not diluted by the ignored ones), and the token count is still every token read."""
    class Uniform(nn.Module):  # logits that give log(256) nats on every target
        def forward(self, x, state=None):
            return torch.zeros(*x.shape, 256, requires_grad=True), HybridState()

    src = RetrievalStreamer(tok, 2, 64, 3, seed=4, answer_only=True)
    st = Stepper(Uniform(), None, None, None, src, tbptt=True, k=3)
    loss, _, count = st._forward(st._next_batches(), None)
    assert count == 2 * 3 * 64
    # rel 1e-6: the same float32 log(256), summed over 12 targets in another order
    assert float(loss.detach()) == pytest.approx(float(F.cross_entropy(torch.zeros(1, 256), torch.tensor([0]))), rel=1e-6)
