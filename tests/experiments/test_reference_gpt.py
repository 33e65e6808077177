"""The plain reference GPT scores exactly the bytes the main job validates on, each once."""
import torch
import torch.nn.functional as F

from experiments.data import SegmentStreamer
from experiments.reference_gpt import GPT, score_streams, validation_streams


def test_score_streams_with_a_context_as_long_as_the_row_is_the_plain_loss():
    torch.manual_seed(0)
    model = GPT(context=64).eval()
    rows = torch.randint(0, 256, (3, 49))
    with torch.no_grad():
        plain = F.cross_entropy(model(rows[:, :-1]).reshape(-1, 256), rows[:, 1:].reshape(-1)).item()
    assert abs(score_streams(model, rows, 64) - plain) < 1e-6  # the same sum in another order (fp32)


def test_score_streams_scores_every_byte_exactly_once():
    """A context-free model with a different loss for every byte value: the mean over the windows
    equals the mean over the targets only if each target is counted once."""
    class Unigram(torch.nn.Module):
        def forward(self, x):
            return torch.linspace(-3, 3, 256).expand(*x.shape, 256)

    rows = torch.randint(0, 256, (2, 201), generator=torch.Generator().manual_seed(1))
    direct = F.cross_entropy(torch.linspace(-3, 3, 256).expand(rows[:, 1:].numel(), 256), rows[:, 1:].reshape(-1)).item()
    for context in (16, 64, 300):
        assert abs(score_streams(Unigram(), rows, context) - direct) < 1e-5, context


def test_validation_streams_are_the_main_jobs_validation_segments(tmp_path):
    tokens = torch.arange(5000) % 256
    data = type("D", (), {"val_tokens": tokens})()
    rows = validation_streams(data, batch_size=4, seq_len=32, eval_batches=5, seed=7)
    streamer = SegmentStreamer(tokens, 4, 32, 7)
    for s in range(5):
        x, y, _ = next(streamer)
        assert torch.equal(rows[:, s * 32:(s + 1) * 32], x) and torch.equal(rows[:, s * 32 + 1:(s + 1) * 32 + 1], y)
