"""Line plots written straight to PNG (numpy + zlib; no plotting library needed).

``line_plot(path, series, title=..., xlabel=..., ylabel=...)`` draws each series
``name -> (xs, ys)`` in its own colour with a legend, axes with min/max tick labels, and writes an
RGB PNG. Text uses a built-in 3x5 pixel font (upper-case letters, digits, a few symbols).
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import numpy as np

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]

# 3x5 glyphs, rows top to bottom, '#' = ink
_FONT = {
    "0": "###,#.#,#.#,#.#,###", "1": ".#.,##.,.#.,.#.,###", "2": "###,..#,###,#..,###", "3": "###,..#,###,..#,###",
    "4": "#.#,#.#,###,..#,..#", "5": "###,#..,###,..#,###", "6": "###,#..,###,#.#,###", "7": "###,..#,..#,.#.,.#.",
    "8": "###,#.#,###,#.#,###", "9": "###,#.#,###,..#,###", ".": "...,...,...,...,.#.", "-": "...,...,###,...,...",
    "+": "...,.#.,###,.#.,...", "%": "#.#,..#,.#.,#..,#.#", "/": "..#,..#,.#.,#..,#..", "_": "...,...,...,...,###",
    "(": ".#.,#..,#..,#..,.#.", ")": ".#.,..#,..#,..#,.#.", ":": "...,.#.,...,.#.,...", "=": "...,###,...,###,...",
    " ": "...,...,...,...,...", "A": ".#.,#.#,###,#.#,#.#", "B": "##.,#.#,##.,#.#,##.", "C": "###,#..,#..,#..,###",
    "D": "##.,#.#,#.#,#.#,##.", "E": "###,#..,##.,#..,###", "F": "###,#..,##.,#..,#..", "G": "###,#..,#.#,#.#,###",
    "H": "#.#,#.#,###,#.#,#.#", "I": "###,.#.,.#.,.#.,###", "J": "..#,..#,..#,#.#,###", "K": "#.#,#.#,##.,#.#,#.#",
    "L": "#..,#..,#..,#..,###", "M": "#.#,###,###,#.#,#.#", "N": "##.,#.#,#.#,#.#,#.#", "O": "###,#.#,#.#,#.#,###",
    "P": "###,#.#,###,#..,#..", "Q": "###,#.#,#.#,###,..#", "R": "##.,#.#,##.,#.#,#.#", "S": "###,#..,###,..#,###",
    "T": "###,.#.,.#.,.#.,.#.", "U": "#.#,#.#,#.#,#.#,###", "V": "#.#,#.#,#.#,#.#,.#.", "W": "#.#,#.#,###,###,#.#",
    "X": "#.#,#.#,.#.,#.#,#.#", "Y": "#.#,#.#,.#.,.#.,.#.", "Z": "###,..#,.#.,#..,###",
}
SCALE = 2  # font pixel size


def _text(img, x, y, s, color=(0, 0, 0)):
    for ch in s.upper():
        rows = _FONT.get(ch, _FONT[" "]).split(",")
        for r, row in enumerate(rows):
            for c, px in enumerate(row):
                if px == "#":
                    img[y + r * SCALE:y + (r + 1) * SCALE, x + c * SCALE:x + (c + 1) * SCALE] = color
        x += 4 * SCALE
    return x


def _line(img, x0, y0, x1, y1, color, width=2):
    n = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
    xs = np.linspace(x0, x1, n).round().astype(int)
    ys = np.linspace(y0, y1, n).round().astype(int)
    h, w, _ = img.shape
    for dx in range(width):
        for dy in range(width):
            ok = (xs + dx < w) & (ys + dy < h) & (xs >= 0) & (ys >= 0)
            img[ys[ok] + dy, xs[ok] + dx] = color


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.2e}"


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an RGB PNG."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)


def line_plot(path, series: dict[str, tuple[list, list]], *, title="", xlabel="", ylabel="", logx=False,
              width=720, height=440) -> None:
    """One PNG with a line per series (points sorted by x; NaNs skipped)."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    left, right, top, bottom = 70, width - 190, 30, height - 40
    pts = {k: [(float(x), float(y)) for x, y in zip(*v) if y == y and (not logx or x > 0)] for k, v in series.items()}
    allx = [math.log10(x) if logx else x for p in pts.values() for x, _ in p]
    ally = [y for p in pts.values() for _, y in p]
    _text(img, (left + right) // 2 - 4 * len(title), 8, title)
    _line(img, left, bottom, right, bottom, (0, 0, 0), 1)
    _line(img, left, top, left, bottom, (0, 0, 0), 1)
    if allx:
        x0, x1 = min(allx), max(allx)
        y0, y1 = min(ally), max(ally)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
        sx = lambda x: left + (((math.log10(x) if logx else x) - x0) / (x1 - x0)) * (right - left)  # noqa: E731
        sy = lambda y: bottom - ((y - y0) / (y1 - y0)) * (bottom - top)  # noqa: E731
        for i, (name, p) in enumerate(pts.items()):
            color = PALETTE[i % len(PALETTE)]
            p = sorted(p)
            for (xa, ya), (xb, yb) in zip(p, p[1:]):
                _line(img, sx(xa), sy(ya), sx(xb), sy(yb), color)
            if len(p) == 1:
                _line(img, sx(p[0][0]) - 3, sy(p[0][1]), sx(p[0][0]) + 3, sy(p[0][1]), color, 4)
            ly = top + 14 * i
            img[ly:ly + 8, right + 12:right + 24] = color
            _text(img, right + 30, ly, name[:20])
        _text(img, 4, bottom - 10, _fmt(y0))
        _text(img, 4, top, _fmt(y1))
        _text(img, left, bottom + 6, _fmt(10 ** x0 if logx else x0))
        lbl = _fmt(10 ** x1 if logx else x1)
        _text(img, right - 8 * len(lbl), bottom + 6, lbl)
    _text(img, (left + right) // 2 - 4 * len(xlabel), bottom + 22, xlabel)
    _text(img, 4, top - 18, ylabel)
    write_png(path, img)
