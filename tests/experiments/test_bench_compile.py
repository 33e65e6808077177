"""experiments.bench_compile: its table on the tiny hybrid, traced only (aot_eager)."""
import re

from experiments.bench_compile import main


def test_table_counts_one_graph_per_mode(corpus, capsys):
    """Both modes compile exactly one graph for the tiny hybrid over 3 TBPTT steps (``true``: the
    carried-state step's graph, step 1 running eager; ``blocks``: one block body for both
    blocks), and each row reports three step times."""
    main(["--modes", "true", "blocks", "--backend", "aot_eager", "--steps", "3", "--",
          "model=tiny", "data=local", f"data.path={corpus}", "data.doc_chars=null", "data.tokenizer=bytes",
          "train.batch_size=2", "train.threads=1", "train.device=cpu"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\| (true|blocks) \|", ln)]
    assert len(rows) == 2
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c) > 0 for c in cells[1:4]), row
        assert cells[4] == "1", row
