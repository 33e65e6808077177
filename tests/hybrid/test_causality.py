"""Changing token t changes no logit at a position < t: within a segment, across segments and chunk
boundaries, in both RNN modes. Run in float64 and compared EXACTLY: a logit at p < t is computed
from operations that never read token t (masked attention terms contribute exact zeros, GEMM rows
and the LSTM steps before t do not depend on later rows), so any difference is a leak."""
import pytest
import torch

from hybrid import HybridLM, memory_mask, preset

N, SEG = 50, 13  # 13: segments cut through chunks of 4, so chunks span segments


def run(model, x, seg=SEG):
    return torch.cat([lg for lg, _ in model.stream(x, segment=seg)], dim=1)


@pytest.fixture(scope="module", params=["stream", "chunked"])
def model(request):
    torch.manual_seed(0)
    return HybridLM(preset("tiny").replace(rnn_mode=request.param)).double().eval()


def test_no_logit_before_t_depends_on_token_t(model):
    x = torch.randint(0, 32, (2, N))
    ref = run(model, x)
    # first token, inside a chunk, a chunk's last token (3, 11, 15), segment starts (13, 26, 39),
    # a segment's last token (12, 25), the end
    for t in (0, 3, 5, 11, 12, 13, 15, 16, 25, 26, 31, 39, 49):
        y = x.clone()
        y[:, t] = (y[:, t] + 1) % 32
        out = run(model, y)
        assert torch.equal(out[:, :t], ref[:, :t]), f"token {t} leaked into an earlier logit"
        assert not torch.equal(out[:, t], ref[:, t])


def test_memory_carries_across_segments(model):
    """The only path from segment 1 to segment 2 is the RNN memory: it must be used."""
    x = torch.randint(0, 32, (2, 2 * 16))
    y = x.clone()
    y[:, 2] = (y[:, 2] + 1) % 32
    a, b = run(model, x, seg=16), run(model, y, seg=16)
    assert not torch.allclose(a[:, 16:], b[:, 16:])


def test_memory_off_segments_are_independent():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny").replace(memory=False)).double().eval()
    x = torch.randint(0, 32, (2, 32))
    y = x.clone()
    y[:, :16] = torch.randint(0, 32, (2, 16))
    assert torch.equal(run(model, x, 16)[:, 16:], run(model, y, 16)[:, 16:])


def test_segmentation_does_not_change_the_memory_stream():
    """In stream mode the LSTM and the chunk vectors are the same whatever the segment cut; check
    the state after the document (float64; tolerance 1e-12 because the batched GEMMs of different
    segment lengths may sum in a different order)."""
    torch.manual_seed(0)
    for mode in ("stream", "chunked"):
        model = HybridLM(preset("tiny").replace(rnn_mode=mode)).double().eval()
        x = torch.randint(0, 32, (2, 48))
        *_, (_, s1) = model.stream(x, segment=16)
        *_, (_, s2) = model.stream(x, segment=7)
        assert s1.pos == s2.pos == 48
        torch.testing.assert_close(s1.memory, s2.memory, rtol=0, atol=1e-12)
        torch.testing.assert_close(s1.h, s2.h, rtol=0, atol=1e-12)


def test_memory_mask_rule():
    # chunk 4, bank 2: position p reads chunk j iff n(p) - 2 <= j < n(p), n(p) = (p + 1) // 4
    p, j = torch.arange(0, 16), torch.arange(0, 4)
    m = memory_mask(p, j, chunk=4, max_memory=2)
    assert not m[:3].any()                          # nothing has ended before position 3
    assert m[3].tolist() == [True, False, False, False]  # chunk 0 ends at 3: p = 3 may read it
    assert m[7].tolist() == [True, True, False, False]
    assert m[11].tolist() == [False, True, True, False]  # only the 2 most recent
    for pp in range(16):
        for jj in range(4):
            if m[pp, jj]:
                assert 4 * (jj + 1) - 1 <= pp        # the chunk's last token is not after p


@pytest.mark.parametrize("mode", ["stream", "chunked"])
def test_query_blocking_is_exact(mode):
    """Cross-attention in query blocks (each against only the keys it may read) equals one block:
    float64, tolerance 1e-12 because a block's softmax sums over fewer (masked, exactly zero) terms."""
    torch.manual_seed(0)
    model = HybridLM(preset("tiny").replace(rnn_mode=mode, max_memory=3)).double().eval()
    x = torch.randint(0, 32, (2, 45))
    ref = run(model, x, seg=15)
    model.fusion.xattn.q_block = 4
    torch.testing.assert_close(run(model, x, seg=15), ref, rtol=0, atol=1e-12)
