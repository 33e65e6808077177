"""experiments.bench_compile: its table on the tiny hybrid, traced only (aot_eager)."""
import re

import torch

from experiments.bench_compile import PHASES, counting_backend, main, phases


def test_table_counts_the_graphs_of_each_mode(corpus, capsys):
    """The tiny hybrid over 3 TBPTT steps: eager compiles no graph, ``blocks`` one (one block body
    for both blocks); each row reports three step times (no timing is asserted: it is a
    benchmark). (``true``'s single graph is tested with the trainer in test_step.py.)"""
    main(["--modes", "false", "blocks", "--backend", "aot_eager", "--steps", "3", "--",
          "model=tiny", "data=local", f"data.path={corpus}", "data.doc_chars=null", "data.tokenizer=bytes",
          "train.batch_size=2", "train.threads=1", "train.device=cpu", "precision=bf16",
          "model.rnn_mode=chunked"])
    rows = [ln for ln in capsys.readouterr().out.splitlines() if re.match(r"\| (false|blocks) \|", ln)]
    assert len(rows) == 2
    for row, graphs in zip(rows, ["0", "1"], strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(float(c) >= 0 for c in cells[1:4]), row   # step times (an eager step may print as 0.0x)
        assert cells[4] == graphs, row
    blocks = [c.strip() for c in rows[1].strip("|").split("|")]
    assert blocks[5].startswith("Dynamo tracing "), rows[1]   # aot_eager: tracing phases only, no inductor
    assert "inductor" not in blocks[5], rows[1]


def test_phases_name_the_timers_that_ran_in_order():
    timers = {"bytecode_tracing": 1.25, "compile_fx_inner": 30.0, "async_compile.wait": 12.04, "unrelated": 9.0}
    assert phases(timers) == "Dynamo tracing 1.2; inductor, all graphs 30.0; waiting for kernel compiles 12.0"
    assert phases({}) == ""
    assert len({key for _, key in PHASES}) == len(PHASES)


def test_the_counting_backend_takes_a_compile_calls_options():
    """A ``torch.compile(..., options=...)`` inside the step (the LSTM cell's on CUDA) hands its options
    to the backend: the counting backend takes them, counts the graph and compiles it."""
    graphs = []
    f = torch.compile(lambda x: x * 2 + 1, backend=counting_backend("aot_eager", graphs), fullgraph=True,
                      options={"max_autotune": False})
    assert torch.equal(f(torch.ones(3)), torch.full((3,), 3.0))
    assert len(graphs) == 1
