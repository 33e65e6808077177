"""Plots: distinct styles, ablate's summary from each run's summary.json, the docs' pictures from the docs' tables."""
import csv
import json
from pathlib import Path

import pytest

from experiments.ablate import summarize
from experiments.figures import FIGURES, draw, number, tables
from experiments.plot import STYLES, line_plot, style

PNG = b"\x89PNG\r\n\x1a\n"
DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_every_series_gets_its_own_colour_and_line_style():
    pairs = [(style(i)["color"], style(i)["linestyle"]) for i in range(STYLES)]
    assert len(set(pairs)) == STYLES
    assert len({c for c, _ in pairs[:10]}) == 10 and len({d for _, d in pairs[:4]}) == 4


def test_line_plot_writes_a_png_skipping_nan_and_nonpositive_x_on_a_log_axis(tmp_path):
    line_plot(tmp_path / "a.png", {"a": ([0, 10, 100], [1.0, float("nan"), 2.0]), "b": ([], [])},
              title="t", xlabel="x", ylabel="y", logx=True)
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG


def _run(out: Path, variant: str, seed: int, best: float, curve: list[tuple[int, float]], retrieval=None):
    d = out / variant / f"seed{seed}"
    d.mkdir(parents=True)
    summary = {"best_val_loss": best, "best_val_bpc": best / 0.6931, "tokens_per_s": 1000.0,
               "train_bytes_per_param": 12.0, "weight_format_bytes": 100, "params": 50,
               "curve": {"step": [s for s, _ in curve], "tokens": [s * 64 for s, _ in curve],
                         "val_loss": [v for _, v in curve], "val_bpc": [v / 0.6931 for _, v in curve]},
               "retrieval": retrieval}
    (d / "summary.json").write_text(json.dumps(summary))


def test_ablate_summary_reads_each_runs_summary(tmp_path):
    _run(tmp_path, "bf16", 0, 2.0, [(10, 3.0), (20, 2.0)], {"64": 1.0, "256": 0.5})
    _run(tmp_path, "bf16", 1, 2.2, [(10, 3.2), (20, 2.2)], {"64": 1.0, "256": 0.0})
    _run(tmp_path, "ternary", 0, 2.3, [(10, 3.5), (20, 2.3)])
    (tmp_path / "empty").mkdir()  # a variant with no finished run is left out
    md = summarize(tmp_path)
    rows = {r["variant"]: r for r in csv.DictReader((tmp_path / "summary.csv").open())}
    assert set(rows) == {"bf16", "ternary"} and rows["bf16"]["seeds"] == "2"
    # mean and sample std of 2.0 and 2.2 (the mean is exactly the float 2.1; the std and the gap of
    # 2.3 to the mean, in %, are compared at 1e-9: a few roundings in a different order)
    assert float(rows["bf16"]["best_val_loss"]) == 2.1
    assert float(rows["bf16"]["loss_std"]) == pytest.approx(0.02 ** 0.5, rel=1e-9)
    assert float(rows["ternary"]["gap_pct"]) == pytest.approx(100 * (2.3 / 2.1 - 1), rel=1e-9)
    assert float(rows["bf16"]["retrieval_mean"]) == 0.625  # (1.0 + 0.25) / 2: the distances' mean
    assert "| bf16 | 2 | 2.1000 ± 0.1414 |" in md and "| ternary | 1 | 2.3000 ± 0.0000 |" in md
    for png in ("val_loss.png", "retrieval.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG


def test_markdown_tables_and_numbers():
    md = "# A\n\n## B (x)\n\ntext\n\n| k | v |\n|---|---|\n| a | −1.5% |\n| b | 1,024 ± 3 |\n\n## C\n\n| k |\n|---|\n| z |\n"
    (rows,) = tables(md, "## B")
    assert rows == [{"k": "a", "v": "−1.5%"}, {"k": "b", "v": "1,024 ± 3"}]
    assert [number(r["v"]) for r in rows] == [-1.5, 1024.0]
    with pytest.raises(KeyError, match="no section '## D'"):
        tables(md, "## D")


def test_every_picture_of_the_results_page_is_drawn_from_its_tables(tmp_path):
    """benchmarks.md and experiments.figures agree: every figure finds its table (none skipped)."""
    done = draw(DOCS / "benchmarks.md", tmp_path)
    assert set(done) == set(FIGURES)
    for name, path in done.items():
        assert isinstance(path, Path), f"{name}: {path}"
        assert path.read_bytes()[:8] == PNG
        assert f"]({path.name})" in (DOCS / "benchmarks.md").read_text(), f"{path.name} is not shown on the page"
