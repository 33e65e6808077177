"""Line and bar plots for sweeps and results pages, with matplotlib (no display needed: the Agg backend).

``line_plot(path, series, title=..., xlabel=..., ylabel=...)`` draws each series
``name -> (xs, ys)`` with labelled axes and a legend. Every series gets its own colour AND its own
line style and marker (the pair repeats only after 20 series), so curves stay apart in grey-scale
print and for readers who do not tell colours apart. ``logx`` puts x on a log scale (training
tokens, distances).
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window (before pyplot is imported)
import matplotlib.pyplot as plt  # noqa: E402

__all__ = ["STYLES", "style", "line_plot", "bar_plot"]

_COLOURS = plt.get_cmap("tab10").colors
_DASHES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
STYLES = 20  # lcm(10 colours, 4 dash patterns): distinct (colour, dash) pairs


def style(i: int) -> dict:
    """matplotlib keywords of series ``i``: (colour, dash) pairs are distinct for i < ``STYLES``."""
    return {"color": _COLOURS[i % len(_COLOURS)], "linestyle": _DASHES[i % len(_DASHES)],
            "marker": _MARKERS[i % len(_MARKERS)]}


def line_plot(path, series: dict[str, tuple[list, list]], *, title="", xlabel="", ylabel="", logx=False,
              ylim: tuple[float, float] | None = None, reference: float | None = None, size=(8.0, 4.8)) -> None:
    """One PNG with a line per series (points sorted by x; NaNs, and x <= 0 on a log axis, skipped);
    ``reference`` draws a horizontal line (e.g. the baseline's 1.0)."""
    fig, ax = plt.subplots(figsize=size, dpi=110)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        pts = sorted((float(x), float(y)) for x, y in zip(xs, ys)
                     if not math.isnan(float(y)) and (not logx or float(x) > 0))
        if not pts:
            continue
        ax.plot([x for x, _ in pts], [y for _, y in pts], label=name, linewidth=1.6, markersize=4,
                markevery=max(1, len(pts) // 8), **style(i))
    if reference is not None:
        ax.axhline(reference, color="black", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log")
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    if ax.lines:
        ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize="small", frameon=False)
    fig.savefig(Path(path), bbox_inches="tight")
    plt.close(fig)


_HATCHES = ("", "//", "..", "xx")


def bar_plot(path, categories: list[str], series: dict[str, list[float]], *, errors: dict[str, list[float]] | None = None,
             title="", xlabel="", reference: float | None = None, size=(8.0, 4.8)) -> None:
    """Horizontal bars: one group per category (top to bottom in the given order), one bar per
    series in it, each series its own colour and hatch; ``errors`` draws ± bars; ``reference``
    a vertical line (e.g. the baseline)."""
    fig, ax = plt.subplots(figsize=size, dpi=110)
    n = len(series)
    height = 0.8 / max(n, 1)
    for i, (name, values) in enumerate(series.items()):
        ys = [c + (i - (n - 1) / 2) * height for c in range(len(categories))]
        err = None if errors is None else errors.get(name)
        ax.barh(ys, values, height=height, xerr=err, capsize=3, label=name if n > 1 else None,
                color=_COLOURS[i % len(_COLOURS)], hatch=_HATCHES[i % len(_HATCHES)], edgecolor="black",
                linewidth=0.5)
    if reference is not None:
        ax.axvline(reference, color="black", linestyle="--", linewidth=1)
    ax.set_yticks(range(len(categories)), categories)
    ax.invert_yaxis()  # the first category on top, as in the table it comes from
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.grid(True, axis="x", alpha=0.3)
    if n > 1:
        ax.legend(loc="best", fontsize="small")
    fig.savefig(Path(path), bbox_inches="tight")
    plt.close(fig)
