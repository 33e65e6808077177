"""The FP8 operand benchmark's arithmetic and inputs (its timings need a GPU)."""
import pytest
import torch

from experiments import bench_fp8_cast as bench


def test_shapes_parse_and_bad_ones_are_refused():
    assert bench.parse_shape("8192x2048") == (8192, 2048)
    assert bench.parse_shape("3X5") == (3, 5)
    for bad in ("8192", "8192x", "0x16", "ax4", "2x3x4", "-2x4"):
        with pytest.raises(ValueError, match="ROWSxCOLS"):
            bench.parse_shape(bad)


def test_minimum_bytes_count_two_reads_and_each_layout_written():
    # 3 x 5 bf16: 30 bytes read twice; row-major codes 15 bytes; transposed 5 x 16 padded = 80 bytes
    assert bench.min_bytes(3, 5, "row") == 60 + 15
    assert bench.min_bytes(3, 5, "transposed") == 60 + 80
    assert bench.min_bytes(3, 5, "both") == 60 + 15 + 80
    assert bench.min_bytes(32, 4, "transposed", element_bytes=4) == 2 * 128 * 4 + 4 * 32


def test_the_general_quantizers_layouts_are_the_operators_on_the_cpu():
    """What ``--check`` compares on the GPU, here through the operator's CPU path."""
    import lowprec
    from lowprec import fp8_cast

    fmt = lowprec.format("fp8_e4m3", granularity="tensor")
    x = torch.randn(40, 24, dtype=torch.bfloat16)
    ours = {"row": fp8_cast.operand(x, fmt), "transposed": fp8_cast.operand(x, fmt, transposed=True),
            "both": fp8_cast.operands(x, fmt)}
    for layout, out in ours.items():
        for a, b in zip(bench._codes(out, layout), bench._codes(bench._general(fmt, layout)(x), layout), strict=True):
            assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_the_delayed_tables_three_ways_agree_on_the_cpu():
    """What ``--delayed`` checks on the GPU before it times, here through the operators' CPU paths: with the
    tensor's own amax in the history, current scaling and delayed scaling in two passes and in one give the
    same codes and scales in both layouts; the two delayed ways push the history alike."""
    import lowprec

    fmt = lowprec.format("fp8_e5m2", granularity="tensor")
    x = torch.randn(40, 24, dtype=torch.bfloat16) * 100
    full = torch.full((4,), float(x.abs().amax()))
    histories = {name: full.clone() for name in ("current", "two passes", "one pass")}
    outs = {name: way(x, histories[name]) for name, way in bench.delayed_ways(fmt, compiled=False).items()}
    for layout in (0, 1):
        for name in ("two passes", "one pass"):
            assert torch.equal(outs[name][layout][0].view(torch.uint8), outs["current"][layout][0].view(torch.uint8))
            assert torch.equal(outs[name][layout][1], outs["current"][layout][1])
    assert torch.equal(histories["two passes"], histories["one pass"]) and torch.equal(histories["current"], full)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_without_a_gpu_it_says_so():
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--shapes", "64x64"])
    with pytest.raises(SystemExit, match="needs a CUDA GPU"):
        bench.main(["--delayed"])
    with pytest.raises(ValueError, match="ROWSxCOLS"):
        bench.main(["--shapes", "64"])


def test_the_sweep_tries_the_module_tiles_and_only_tiles_that_fit():
    """Every pass's own tile sizes are among the sweep's (its fastest is never slower than what runs
    unswept), each tile holds 1,024 to 16,384 elements of a pass, no tile is listed twice, and the
    sweep's default shapes parse; the per-row (``--rows``) table's tilings hold the module's, none
    twice."""
    from lowprec import fp8_cast

    names = [bench.tiles(c) for c in bench.CAST_SWEEP]
    assert bench.tiles(fp8_cast.CAST_BLOCKS) in names and bench.tiles(fp8_cast.CAST_BLOCKS_TRANSPOSED) in names
    assert bench.tiles(fp8_cast.AMAX_BLOCKS) in [bench.tiles(c) for c in bench.AMAX_SWEEP]
    assert all(1024 <= c["BLOCK_M"] * c["BLOCK_K"] <= 16384 for c in bench.CAST_SWEEP)
    assert all(c["BLOCK_M"] * c["BLOCK_K"] <= 16384 for c in bench.AMAX_SWEEP)
    assert len(set(names)) == len(names) and len({bench.tiles(c) for c in bench.AMAX_SWEEP}) == len(bench.AMAX_SWEEP)
    assert bench.tiles(dict(BLOCK_M=32, BLOCK_K=256, CHUNKS=4, num_warps=8)) == "32x256 x4 w8"
    assert [bench.parse_shape(s) for s in bench.SWEEP_SHAPES][0] == (16384, 128)
    rows = [bench.tiles(c) for c in bench.ROWS_SWEEP]  # the one-kernel per-row table's, the module's among them
    assert bench.tiles(fp8_cast.ROWS_BLOCKS) in rows and len(set(rows)) == len(rows)
