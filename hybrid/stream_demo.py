"""Stream a model over a long document on CPU and show that memory stays flat.

    python -m hybrid.stream_demo                       # tiny preset, 1M tokens, chunked RNN
    python -m hybrid.stream_demo --tokens 2000000 --mode stream --every 500

Tokens are drawn segment by segment (the document is never held whole), the model runs under
`torch.no_grad()`, and every `--every` segments a row is printed: tokens so far, tokens/s, the
process's current and peak resident memory (RSS), and the bytes of the carried `HybridState`.
The rows are a markdown table that can be pasted into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import resource
import time

import torch

from .model import HybridLM
from .presets import preset


def rss_bytes() -> int:
    """Current resident set size of this process (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def peak_rss_bytes() -> int:
    """Peak resident set size so far (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stream_document(model: HybridLM, n_tokens: int, *, batch: int = 1, segment: int | None = None,
                    every: int = 0, seed: int = 0, log=print) -> list[dict]:
    """Run `model` over n_tokens random tokens per row, segment by segment; return the logged rows."""
    cfg = model.cfg
    L = cfg.window if segment is None else segment
    g = torch.Generator().manual_seed(seed)
    state, rows, done, seg = None, [], 0, 0
    t0 = time.perf_counter()
    with torch.no_grad():
        while done < n_tokens:
            n = min(L, n_tokens - done)
            tokens = torch.randint(0, cfg.vocab_size, (batch, n), generator=g)
            _, state = model(tokens, state)
            done += n
            seg += 1
            if (every and seg % every == 0) or done >= n_tokens:
                dt = time.perf_counter() - t0
                row = {"segments": seg, "tokens": done * batch, "tokens_per_s": done * batch / dt,
                       "rss_MiB": rss_bytes() / 2**20, "peak_rss_MiB": peak_rss_bytes() / 2**20,
                       "state_bytes": state.nbytes}
                rows.append(row)
                if log:
                    log(f"| {row['segments']} | {row['tokens']:,} | {row['tokens_per_s']:,.0f} | "
                        f"{row['rss_MiB']:.1f} | {row['peak_rss_MiB']:.1f} | {row['state_bytes']:,} |")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--mode", choices=("stream", "chunked"), default="chunked")
    ap.add_argument("--window", type=int, default=256, help="segment length (also sizes the position table)")
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--every", type=int, default=500, help="print a row every N segments")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    cfg = preset(a.preset).replace(rnn_mode=a.mode, window=a.window, max_window=max(a.window, preset(a.preset).max_window))
    model = HybridLM(cfg).eval()
    print(f"command: python -m hybrid.stream_demo --preset {a.preset} --mode {a.mode} --window {a.window} "
          f"--tokens {a.tokens} --batch {a.batch}")
    print(f"device: CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), "
          f"torch {torch.__version__}, date {datetime.date.today()}; params {model.num_params():,}")
    print("| segments | tokens | tokens/s | RSS MiB | peak RSS MiB | state bytes |")
    print("|---:|---:|---:|---:|---:|---:|")
    stream_document(model, a.tokens, batch=a.batch, every=a.every, seed=a.seed)


if __name__ == "__main__":
    main()
