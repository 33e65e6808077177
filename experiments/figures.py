"""The pictures of ``docs/benchmarks.md``, drawn from that page's own tables.

    python -m experiments.figures                      # reads docs/benchmarks.md, writes docs/*.png
    python -m experiments.figures page=path/to/benchmarks.md

The tables are the one record of the measurements; this script only reads them, so a picture
never disagrees with its table. Run it again after a table changes. A section whose table is
missing or has another header is reported and skipped, the others are still drawn.

| picture | drawn from |
|---|---|
| ``bench_ffn_speedup.png`` | FFN block: "vs bf16" by width, at the largest token count |
| ``bench_memory_per_param.png`` | training memory: resident and at-step bytes per parameter |
| ``ablation_h100_best_val_loss.png`` | precision ablation: best validation loss, mean ± std over seeds |
| ``retrieval_h100_passkey.png`` | passkey retrieval: accuracy by distance, memory on, mean over seeds |
| ``ptq_h100_gap.png`` | PTQ beside native NVFP4 (streams): the gap to bf16 |
"""
from __future__ import annotations

import re
import statistics
import sys
from pathlib import Path

from omegaconf import OmegaConf

from .plot import bar_plot, line_plot

__all__ = ["tables", "number", "draw", "main"]

_NUMBER = re.compile(r"[−-]?\d+(?:[.,]\d+)*")


def tables(markdown: str, heading: str) -> list[list[dict[str, str]]]:
    """The tables of the section whose heading line contains ``heading`` (up to the next heading
    of the same or a higher level), each a list of rows ``{column header: cell}``."""
    lines = markdown.splitlines()
    start = next((i for i, ln in enumerate(lines) if ln.startswith("#") and heading in ln), None)
    if start is None:
        raise KeyError(f"no section {heading!r}")
    level = len(lines[start]) - len(lines[start].lstrip("#"))
    found, current = [], None
    for ln in lines[start + 1:]:
        if ln.startswith("#") and len(ln) - len(ln.lstrip("#")) <= level:
            break
        if ln.startswith("|"):
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if current is None:
                current = {"header": cells, "rows": []}
            elif not all(set(c) <= set("-: ") for c in cells):
                current["rows"].append(dict(zip(current["header"], cells)))
        elif current is not None:
            found.append(current["rows"])
            current = None
    if current is not None:
        found.append(current["rows"])
    return found


def number(cell: str) -> float:
    """The first number of a cell (``−1.96%`` → -1.96, ``1.7820 ± 0.0482`` → 1.782, ``1.70x`` → 1.7)."""
    m = _NUMBER.search(cell)
    if m is None:
        raise ValueError(f"no number in {cell!r}")
    return float(m.group().replace("−", "-").replace(",", ""))


def _numbers(cell: str) -> list[float]:
    return [float(x.replace("−", "-").replace(",", "")) for x in _NUMBER.findall(cell)]


def _ffn(md: str, out: Path) -> Path:
    rows = next(t for t in tables(md, "## FFN block") if t and "vs bf16" in t[0])
    tokens = max(int(r["tokens"]) for r in rows)
    series: dict[str, tuple[list, list]] = {}
    for r in rows:
        if int(r["tokens"]) == tokens and r["precision"] != "bf16" and r["vs bf16"] not in ("-", ""):
            xs, ys = series.setdefault(r["precision"], ([], []))
            xs.append(int(r["d"]))
            ys.append(number(r["vs bf16"]))
    path = out / "bench_ffn_speedup.png"
    line_plot(path, series, title=f"FFN block forward + backward, {tokens} tokens: speed-up over bf16",
              xlabel="model width d", ylabel="speed-up over bf16 (×; dashed: bf16)", logx=True, reference=1.0)
    return path


def _memory(md: str, out: Path) -> Path:
    rows = next(t for t in tables(md, "## Training memory per parameter") if t and "case" in t[0])
    cases = [r["case"] for r in rows]
    series = {"resident between steps": [number(r["resident B/param"]) for r in rows],
              "at the step (with gradients)": [number(r["at step B/param"]) for r in rows]}
    path = out / "bench_memory_per_param.png"
    bar_plot(path, cases, series, title="training memory per parameter (weights + optimizer state)",
             xlabel="bytes per parameter", size=(8.0, 6.0))
    return path


def _ablation(md: str, out: Path) -> Path:
    rows = next(t for t in tables(md, "## Precision ablation") if t and "best val loss (nats/token)" in t[0])
    names = [r["variant"] for r in rows]
    loss = [_numbers(r["best val loss (nats/token)"]) for r in rows]
    base = next(m for (m, _), r in zip(loss, rows) if r["variant"] == "bf16")
    path = out / "ablation_h100_best_val_loss.png"
    bar_plot(path, names, {"best validation loss": [m for m, _ in loss]},
             errors={"best validation loss": [s for _, s in loss]}, reference=base,
             title="precision ablation: best validation loss, mean ± std over 3 seeds (dashed: bf16)",
             xlabel="nats per token (lower is better)", size=(8.0, 4.8))
    return path


def _retrieval(md: str, out: Path) -> Path:
    rows = next(t for t in tables(md, "## Long-context retrieval") if t and "memory" in t[0])
    header = [h for h in rows[0] if h.startswith("d=")]
    curves, variant = {}, None
    for r in rows:
        variant = r["variant"] or variant
        if r["memory"] != "on":
            continue
        pick = 1 if "kv" in variant else 0  # "d=160 / 140": passkey distance / kv distance
        xs = [_numbers(h)[min(pick, len(_numbers(h)) - 1)] for h in header]
        ys = [statistics.fmean(_numbers(r[h])) for h in header]
        curves[variant] = (xs, ys)
    path = out / "retrieval_h100_passkey.png"
    line_plot(path, curves, title="passkey retrieval, memory on (mean over seeds); 128-token segments",
              xlabel="distance from the key to the question (tokens)", ylabel="accuracy", ylim=(-0.02, 1.02))
    return path


def _ptq(md: str, out: Path) -> Path:
    rows = next(t for t in tables(md, "### H100, with NVFP4") if t and "val loss, streams" in t[0])
    rows = [r for r in rows if r["kind"] != "trained in bf16"]
    names = [f"{r['kind']}: {r['precision'].split(' (')[0]}" for r in rows]
    path = out / "ptq_h100_gap.png"
    bar_plot(path, names, {"gap to bf16": [number(r["gap to bf16"]) for r in rows]}, reference=0.0,
             title="validation loss gap to the bf16 model, read as streams (28M hybrid, H100)",
             xlabel="% above bf16 (lower is better)", size=(8.0, 3.6))
    return path


FIGURES = {"ffn": _ffn, "memory": _memory, "ablation": _ablation, "retrieval": _retrieval, "ptq": _ptq}


def draw(page: Path, out: Path | None = None) -> dict[str, Path | str]:
    """Draw every picture of ``page`` into ``out`` (default: the page's folder);
    {figure: path, or the reason it was skipped}."""
    md = page.read_text()
    out = page.parent if out is None else out
    done: dict[str, Path | str] = {}
    for name, fn in FIGURES.items():
        try:
            done[name] = fn(md, out)
        except (KeyError, StopIteration, ValueError, IndexError) as e:
            done[name] = f"skipped: {type(e).__name__}: {e}"
    return done


def main(argv=None) -> None:
    args = OmegaConf.from_dotlist(list(sys.argv[1:] if argv is None else argv))
    unknown = set(args) - {"page", "out"}
    if unknown:
        raise SystemExit(f"unknown argument(s) {sorted(unknown)}; use page=PATH out=DIR")
    page = Path(args.get("page", "docs/benchmarks.md"))
    if not page.exists():
        raise SystemExit(f"{page} does not exist; run from the repository root or pass page=PATH")
    for name, result in draw(page, Path(args.out) if args.get("out") else None).items():
        print(f"{name}: {result}")


if __name__ == "__main__":
    main()
