"""The carried state: save/load round trip, detach, bounded size; truncated BPTT."""
import io

import pytest
import torch

from hybrid import HybridLM, HybridState, preset, tbptt


@pytest.mark.parametrize("mode", ["stream", "chunked"])
@pytest.mark.parametrize("weights_only", [True, False])
def test_state_round_trip_gives_identical_logits(mode, weights_only, tmp_path):
    torch.manual_seed(0)
    model = HybridLM(preset("tiny").replace(rnn_mode=mode)).eval()
    x = torch.randint(0, 32, (3, 40))
    with torch.no_grad():
        _, s = model(x[:, :14])          # 14: stops mid-chunk, so chunked mode has pending tokens
        _, s = model(x[:, 14:23], s)
        torch.save(s, tmp_path / "state.pt")
        loaded = torch.load(tmp_path / "state.pt", weights_only=weights_only)
        assert isinstance(loaded, HybridState) and loaded.pos == 23
        if mode == "chunked":  # the 23 % 4 tokens of the open chunk, right-aligned in a (B, chunk - 1) buffer
            assert loaded.pending.shape == (3, 3) and torch.equal(loaded.pending[:, -3:], x[:, 20:23])
        a, sa = model(x[:, 23:39], s)
        b, sb = model(x[:, 23:39], loaded)
    assert torch.equal(a, b)             # exact: same inputs, same ops
    assert torch.equal(sa.memory, sb.memory) and torch.equal(sa.h, sb.h)


def test_state_dict_form_and_detach():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny"))
    _, s = model(torch.randint(0, 32, (2, 16)))
    assert s.h.requires_grad and s.h.dtype == torch.float32 and s.c.dtype == torch.float32
    d = s.detach()
    assert not d.h.requires_grad and not d.memory.requires_grad and d.pos == s.pos
    buf = io.BytesIO()
    torch.save(d.state_dict(), buf)
    buf.seek(0)
    back = HybridState.from_state_dict(torch.load(buf))
    assert torch.equal(back.memory, d.memory) and back.pos == 16


def test_lstm_state_stays_fp32_in_a_bf16_model():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny")).to(torch.bfloat16)
    logits, s = model(torch.randint(0, 32, (2, 16)))
    assert logits.dtype == torch.bfloat16 and s.memory.dtype == torch.bfloat16
    assert s.h.dtype == s.c.dtype == torch.float32


@pytest.mark.parametrize("mode", ["stream", "chunked"])
def test_state_size_does_not_grow(mode):
    """A short version of `python -m hybrid.stream_demo`: the state is bounded by max_memory."""
    from hybrid.stream_demo import stream_document
    torch.manual_seed(0)
    cfg = preset("tiny").replace(rnn_mode=mode)
    model = HybridLM(cfg).eval()
    rows = stream_document(model, 16 * 60, segment=15, every=10, log=None)
    sizes = [r["state_bytes"] for r in rows]
    # bank + LSTM h, c + position + (chunked) the pending-token buffer: the same from the first segment on
    full = cfg.max_memory * cfg.d_model * 4 + 2 * cfg.rnn_layers * cfg.d_model * 4 + 8
    assert set(sizes) == {full + (8 * (cfg.chunk - 1) if mode == "chunked" else 0)}


def test_bad_calls_fail_clearly():
    model = HybridLM(preset("tiny"))
    with pytest.raises(ValueError, match="T=17 must be in \\[1, window=16\\]"):
        model(torch.zeros(1, 17, dtype=torch.long))
    _, s = model(torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="batch"):
        model(torch.zeros(3, 8, dtype=torch.long), s)


def test_tbptt_cuts_the_graph_every_k_segments():
    torch.manual_seed(0)
    model = HybridLM(preset("tiny"))
    x = torch.randint(0, 32, (2, 16 * 5 + 1))
    steps = list(tbptt(model, x, k=2))
    assert [s.segments for s in steps] == [2, 2, 1]
    assert sum(s.n_tokens for s in steps) == 80 and steps[-1].state.pos == 80
    # step 2's loss must not reach step 1's segments: its graph starts from a detached state
    model.zero_grad()
    steps[1].loss.backward()
    emb_grad = model.embed["tok"].weight.grad
    used_later = torch.zeros(32, dtype=torch.bool)
    used_later[x[:, 32:64].flatten()] = True
    assert emb_grad[~used_later].abs().sum() == 0


def test_stream_mode_accepts_segments_shorter_than_a_chunk():
    """Token-by-token generation in stream mode: segments of 1 token, chunk ends every 4."""
    cfg = preset("tiny")
    assert cfg.rnn_mode == "stream" and cfg.chunk > 1
    torch.manual_seed(0)
    model = HybridLM(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        full, _ = model(tokens)
        state, outs = None, []
        for t in range(tokens.shape[1]):
            out, state = model(tokens[:, t:t + 1], state)
            outs.append(out)
    assert state.memory_len(cfg.chunk, cfg.max_memory) == 2  # chunks ending at positions 3 and 7
    assert state.memory[:, -2:].abs().amin() > 0 and not state.memory[:, :-2].any()  # right-aligned, rest empty
    # one token at a time, attention sees only the current segment: not the same logits as the
    # full window, but the memory bank advances (and the first token is identical)
    assert torch.allclose(outs[0], full[:, :1], atol=1e-6)


def test_mean_pooled_chunk_summaries_and_forget_bias():
    """chunk_pool='mean': a chunk's summary is the mean of the top LSTM outputs over its tokens
    (rebuilt here by hand from the same layers), not the output at its last token; the forget-gate
    bias starts at rnn_forget_bias. Same parameters either way."""
    torch.manual_seed(0)
    cfg = preset("tiny").replace(rnn_mode="chunked", chunk_pool="mean", rnn_forget_bias=3.0)
    model = HybridLM(cfg).double()
    d, C = cfg.d_model, cfg.chunk
    for layer in model.rnn.lstm:
        assert torch.equal(layer.ih.bias[d:2 * d], torch.full((d,), 3.0, dtype=torch.float64))
        assert torch.equal(layer.ih.bias[:d], torch.zeros(d, dtype=torch.float64))
    x = torch.randint(0, cfg.vocab_size, (2, 3 * C))
    _, state = model(x)
    e = model.embed["tok"](x).reshape(2 * 3, C, d)
    h0, c0 = model.rnn.zero_state(e)
    y, _, _ = model.rnn.run_stack(e, h0, c0)
    s = y.mean(dim=1).reshape(2, 3, d)
    h1, c1 = model.rnn.zero_state(s)
    z, _, _ = model.rnn.run_stack(s, h1, c1)
    # same ops in the same order in float64: equal to rounding (1e-12, far below any real difference)
    torch.testing.assert_close(state.memory[:, -3:], model.rnn.compressor(z), rtol=0, atol=1e-12)
    last = HybridLM(cfg.replace(chunk_pool="last")).double()
    last.load_state_dict(model.state_dict())  # same parameters, another summary
    assert not torch.allclose(last(x)[1].memory[:, -3:], state.memory[:, -3:])


# ---- the fixed-shape bank against a growing one ----------------------------------------------

def reference_segment(model, tokens, ref):
    """One segment the straightforward way, from the model's own layers: the bank is a growing list
    of chunk vectors, oldest first (at most max_memory), `pending` holds exactly the open chunk's
    tokens, and each token attends over exactly the vectors it may read plus the null slot.
    ref: {"pos": int, "h", "c", "bank" (B, n, d), "pending" (B, r)} or None -> (logits, ref)."""
    cfg, rnn, fusion = model.cfg, model.rnn, model.fusion
    B, T = tokens.shape
    C, M, H, d = cfg.chunk, cfg.max_memory, cfg.xattn_heads, cfg.d_model
    e = model.embed["tok"](tokens)
    x = e + model.embed["pos"](torch.arange(T))
    if ref is None:
        h, c = rnn.zero_state(e)
        ref = {"pos": 0, "h": h, "c": c, "bank": e.new_zeros(B, 0, d), "pending": tokens.new_zeros(B, 0)}
    pos = ref["pos"]
    if cfg.rnn_mode == "stream":
        y, h, c = rnn.run_stack(e, ref["h"], ref["c"])
        m_new = rnn.compressor(y[:, [t for t in range(T) if (pos + t + 1) % C == 0]])
        pending = ref["pending"]
    else:
        buf = torch.cat([ref["pending"], tokens], dim=1)
        K = buf.shape[1] // C
        h, c, m_new = ref["h"], ref["c"], e.new_zeros(B, 0, d)
        if K:
            xs = model.embed["tok"](buf[:, :K * C]).reshape(B * K, C, d)
            y, _, _ = rnn.run_stack(xs, *rnn.zero_state(xs))
            s = (y[:, -1] if cfg.chunk_pool == "last" else y.mean(dim=1)).reshape(B, K, d)
            z, h, c = rnn.run_stack(s, h, c)
            m_new = rnn.compressor(z)
        pending = buf[:, K * C:]
    keys = torch.cat([ref["bank"], m_new], dim=1)
    first = (pos + T) // C - keys.shape[1]  # chunk index of keys[:, 0]
    u = fusion.norm(x)
    hd = d // H

    def heads(t):
        return t.view(B, -1, H, hd).transpose(1, 2)

    def rotary(t, idx):  # rotate pairs (i, i + hd/2) by idx * 10000^(-2i/hd)
        ang = idx.to(t.dtype)[:, None] * 10000.0 ** (-torch.arange(hd // 2, dtype=t.dtype) / (hd // 2))
        t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
        return torch.cat([t1 * ang.cos() - t2 * ang.sin(), t1 * ang.sin() + t2 * ang.cos()], dim=-1)

    p = torch.arange(pos, pos + T)
    j = torch.arange(first, first + keys.shape[1])
    n = (p + 1) // C
    q = rotary(heads(fusion.xattn.q(u)), n - first)
    k = rotary(heads(fusion.xattn.k(keys)), j - first + 1)
    v = heads(fusion.xattn.v(keys))
    scores = torch.cat([q @ k.transpose(-1, -2), q.new_zeros(B, H, T, 1)], dim=-1) / hd ** 0.5
    allowed = torch.cat([(j[None] < n[:, None]) & (j[None] >= n[:, None] - M), torch.ones(T, 1, dtype=torch.bool)], 1)
    w = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    ctx = fusion.xattn.o((w[..., :-1] @ v).transpose(1, 2).reshape(B, T, d))
    x = x + torch.sigmoid(fusion.gate(torch.cat([u, ctx], dim=-1))) * ctx
    for blk in model.blocks:
        x = blk(x)
    new = {"pos": pos + T, "h": h, "c": c, "bank": keys[:, -M:], "pending": pending}
    return model.head(model.norm_f(x)), new


@pytest.mark.parametrize("mode", ["stream", "chunked"])
def test_fixed_bank_equals_a_growing_bank(mode):
    """Segments of 1..16 tokens (chunks of 4 cut through them), a bank of 3: before, at and after
    the bank fills, the logits and the carried state equal the growing-bank reference, the bank's
    unused slots are exactly zero, and nothing is NaN when no chunk is readable yet (the first
    segments: every key masked but the null slot). float64; tolerance 1e-12 because the fixed shapes
    add exactly-zero terms (masked keys, placeholder chunk slots) to sums that may then be added
    up in another order."""
    torch.manual_seed(0)
    cfg = preset("tiny").replace(rnn_mode=mode, max_memory=3)
    model = HybridLM(cfg).double().eval()
    C, M = cfg.chunk, cfg.max_memory
    lengths = [1, 2, 7, 16, 1, 3, 16, 9, 13, 16]
    x = torch.randint(0, cfg.vocab_size, (2, sum(lengths)))
    state, ref, s0 = None, None, 0
    with torch.no_grad():
        for T in lengths:
            logits, state = model(x[:, s0:s0 + T], state)
            want, ref = reference_segment(model, x[:, s0:s0 + T], ref)
            s0 += T
            assert torch.isfinite(logits).all()
            torch.testing.assert_close(logits, want, rtol=0, atol=1e-12)
            n = ref["bank"].shape[1]
            assert int(state.pos) == ref["pos"] and state.memory_len(C, M) == n
            assert state.memory.shape == (2, M, cfg.d_model) and not state.memory[:, :M - n].any()
            torch.testing.assert_close(state.memory[:, M - n:], ref["bank"], rtol=0, atol=1e-12)
            torch.testing.assert_close(state.h, ref["h"], rtol=0, atol=1e-12)
            if mode == "chunked":
                r = ref["pending"].shape[1]
                assert state.pending.shape == (2, C - 1) and torch.equal(state.pending[:, C - 1 - r:], ref["pending"])
    assert n == M and s0 // C > M  # the bank filled and dropped its oldest vectors


@pytest.mark.parametrize("mode", ["stream", "chunked"])
def test_a_state_saved_with_a_growing_bank_still_loads(mode):
    """The earlier layout (pos an int, memory (B, n, d) with n = min(pos // chunk, max_memory),
    pending (B, pos % chunk)) loads through from_state_dict and gives the same logits as the
    fixed-shape state (bit for bit: the model pads it to the same tensors)."""
    torch.manual_seed(0)
    cfg = preset("tiny").replace(rnn_mode=mode, max_memory=3)
    model = HybridLM(cfg).eval()
    C, M = cfg.chunk, cfg.max_memory
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        for cut in (6, 23):  # bank of 1 (not full), of 3 (full); 2 and 3 pending tokens
            _, s = model(x[:, :min(cut, 16)])
            if cut > 16:
                _, s = model(x[:, 16:cut], s)
            n, r = min(cut // C, M), cut % C
            old = {"pos": cut, "h": s.h, "c": s.c, "memory": s.memory[:, M - n:],
                   "pending": s.pending[:, C - 1 - r:] if mode == "chunked" else None}
            loaded = HybridState.from_state_dict(old)
            assert loaded.pos.dtype == torch.int64 and int(loaded.pos) == cut
            a, sa = model(x[:, cut:cut + 7], s)
            b, sb = model(x[:, cut:cut + 7], loaded)
            assert torch.equal(a, b) and torch.equal(sa.memory, sb.memory)
    with pytest.raises(ValueError, match="state.memory has 4 slots; this model's max_memory is 3"):
        model(x[:, :4], HybridState(pos=16, h=s.h, c=s.c, memory=torch.zeros(2, 4, cfg.d_model)))
    with pytest.raises(ValueError, match="unknown key"):
        HybridState.from_state_dict({"pos": 0, "bank": None})
