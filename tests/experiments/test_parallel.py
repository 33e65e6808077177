"""Training on several processes, on the CPU: FSDP2, tensor parallelism, low-bit all-gathers,
sharded checkpoints and the batch split by rank (experiments.parallel, experiments.sharded_checkpoint,
lowprec.distributed, lowprec.fsdp, lowprec.tensor_parallel).

Multi-process checks run in 2 gloo processes forked from this one (no interpreter start-up), one
group of checks per fork; each rank returns its numbers and the tests below compare them. The
reference for a data-parallel gradient is one process running the ranks' rows as separate
micro-batches and averaging: with per-tensor activation scales (FP8) the scale of a batch depends
on the batch, so that, not the whole batch at once, is what N ranks compute.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

import lowprec
import optim
from experiments.checkpoint import load_checkpoint
from experiments.data import SegmentStreamer, TokenBatcher
from experiments.parallel import (
    ParallelConfig,
    all_reduce_found_inf,
    clip_grads_over_ranks_,
    gather_bytes,
    init_distributed,
    shard_model,
)
from experiments.rank_data import RankBatches, gather_state_rows, state_rows
from experiments.sharded_checkpoint import (
    export_single_file,
    load_sharded,
    save_sharded,
)
from hybrid import HybridLM, preset
from lowprec.distributed import native_shards, record_all_gathers, sync_native_scales
from lowprec.fsdp import precompute_gather_amax

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
FP8_NATIVE = {"name": "fp8_native", "default": {"weight": "fp8_e4m3", "input": None, "grad": None, "storage": "native"},
              "rules": [{"match": "embed.*", "weight": "bf16", "storage": "latent"},
                        {"match": "head", "weight": "bf16", "storage": "latent"}]}


# ternary_native with unquantized activations: a row-parallel layer's int8 input would get one
# scale per token and shard (as for latent weights), which no longer compares exactly
TERNARY_NATIVE_FP = {"name": "ternary_native_fp", "default": {"weight": "ternary", "input": None, "grad": None,
                                                               "storage": "native"},
                     "rules": [{"match": "embed.*", "weight": "bf16", "storage": "latent"},
                               {"match": "head", "weight": "bf16", "storage": "latent"}]}


def policy(name: str):
    shipped = {"fp8_native": FP8_NATIVE, "ternary_native_fp": TERNARY_NATIVE_FP}
    cfg = shipped.get(name) or yaml.safe_load((CONFIGS / "precision" / f"{name}.yaml").read_text())
    return lowprec.PrecisionPolicy.from_config(cfg)


def optim_cfg(name: str) -> dict:
    cfg = yaml.safe_load((CONFIGS / "optim" / f"{name}.yaml").read_text())
    return {k: v for k, v in cfg.items() if k not in ("name", "schedule")}


def build(name: str | None, cfg=None, seed: int = 0) -> HybridLM:
    torch.manual_seed(seed)
    model = HybridLM(cfg or preset("tiny"))
    if name is not None:
        lowprec.apply_policy(model, policy(name))
    return model


def sr_adamw_cfg(moments: str) -> dict:
    """configs/optim/sr_adamw (SRAdamW on latent masters, AdamW on the rest) with fp32 or fp8 moments."""
    cfg = optim_cfg("sr_adamw")
    cfg["latent"] = dict(cfg["latent"], moment_dtype=moments, moment_block=128)
    return cfg


def batch(rows: int = 4, T: int = 16, vocab: int = 32):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (rows, T), generator=g), torch.randint(0, vocab, (rows, T), generator=g)


def loss_of(model, x, y):
    logits, _ = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def microbatch_reference(model, x, y, n: int) -> None:
    """Gradients of n micro-batches summed, then divided by n (parameters and native layers)."""
    for xi, yi in zip(x.chunk(n), y.chunk(n)):
        loss_of(model, xi, yi).backward()
    for p in model.parameters():
        p.grad /= n
    for m in model.modules():
        if getattr(m, "is_native", False) and m.native_grad is not None:
            m.native_grad = m.native_grad / n


def full(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- processes

def run_ranks(fork_ranks, fn, world: int = 2, *args):
    """``fn(rank, world, *args)`` on ``world`` ranks joined in a gloo group (the ``fork_ranks``
    fixture); each rank's return value, rank order. A rank's exception fails the test with its
    traceback."""
    results = fork_ranks(lambda rank, side: fn(rank, world, *args), world)
    for r, (ok, out, _) in enumerate(results):
        if not ok:
            pytest.fail(f"rank {r} failed:\n{out}")
    return [out for _, out, _ in results]


# ------------------------------------------------------------------- group A: 2 ranks, dp = 2

def _data_parallel_checks(rank, world, tmp):
    d = init_distributed(ParallelConfig(), device="cpu")
    out = {"describe": d.describe(), "dp": d.dp, "tp": d.tp, "mesh": tuple(d.mesh.shape)}
    x, y = batch()
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]

    # forward/backward of the tiny hybrid under FSDP2 against one process
    for name in (None, "bf16", "paper", "ternary_native", "fp8"):
        model, ref = build(name), build(name)
        shard_model(model, d.mesh)
        loss_of(model, xs, ys).backward()
        microbatch_reference(ref, x, y, world)
        refs = dict(ref.named_parameters())
        out[f"grad_diff/{name}"] = max(float((full(p.grad) - refs[n].grad).abs().max())
                                       for n, p in model.named_parameters())
        ref_mods = dict(ref.named_modules())
        out[f"native_grad_diff/{name}"] = max(
            [float((layer.native_grad - ref_mods[n].native_grad.chunk(world)[rank]).abs().max())
             for n, layer in native_shards(model).items()] or [0.0])
        out[f"native_layers/{name}"] = len(native_shards(model))
        if name == "ternary_native":  # the norm over every rank's shards: ‖g‖ of the whole model
            mixed = optim.build_optimizer(model, optim_cfg("ternary_native"))
            ref_opt = optim.build_optimizer(ref, optim_cfg("ternary_native"))
            out["norm"] = float(clip_grads_over_ranks_(list(mixed.grads()), None, d))
            out["ref_norm"] = float(torch.linalg.vector_norm(torch.stack(
                [torch.linalg.vector_norm(g.double()) for g in ref_opt.grads()])))
        if name is None:  # against the whole batch in one process (the loss curve of 1 process)
            whole = build(name)
            loss_of(whole, x, y).backward()
            wholes = dict(whole.named_parameters())
            out["whole_batch_rel_diff"] = max(float((full(p.grad) - wholes[n].grad).abs().max()
                                                    / wholes[n].grad.abs().max()) for n, p in model.named_parameters())

    # the FP8 gathers' amaxes taken for all weights in one all-reduce: the same gradients, no
    # all-reduce left in the forward; an in-place update of a master makes its amax stale
    calls = []
    real_all_reduce = torch.distributed.all_reduce

    def counting(*a, **k):
        calls.append(1)
        return real_all_reduce(*a, **k)

    grads = []
    for pre in (False, True):
        model = build("fp8")
        shard_model(model, d.mesh)
        out["amax_precomputed"] = precompute_gather_amax(model) if pre else 0
        torch.distributed.all_reduce = counting
        try:
            calls.clear()
            loss = loss_of(model, xs, ys)
            out[f"forward_all_reduces/{pre}"] = len(calls)
            loss.backward()
            grads.append({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
            if pre:
                with torch.no_grad():
                    next(p for n, p in model.named_parameters() if n == "blocks.0.attn.q.weight").mul_(0.5)
                calls.clear()
                loss_of(model, xs, ys)
                out["forward_all_reduces/stale"] = len(calls)
        finally:
            torch.distributed.all_reduce = real_all_reduce
    out["amax_precomputed_same_grads"] = (grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
                                          and all(torch.equal(grads[0][n], grads[1][n]) for n in grads[0]))

    # explicit prefetching: each block's forward has started the next block's all-gather; the
    # gradients are the same bits
    gathers, prefetch_grads = {}, []
    for k in (0, 1):
        model = build("paper")
        shard_model(model, d.mesh, ParallelConfig(prefetch=k))
        with record_all_gathers() as rec:
            for blk in model.blocks:  # runs after FSDP2's pre-forward hook (registered before it)
                blk.register_forward_pre_hook(lambda m, a, k=k, rec=rec: gathers.setdefault(k, []).append(len(rec.received)))
            loss_of(model, xs, ys).backward()
        prefetch_grads.append({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
    out["prefetch/gathers_at_blocks"] = gathers

    # blocks gathered together (blocks_per_unit 2: the tiny hybrid's two blocks in one FSDP2 group):
    # one all-gather fewer per forward, the same gradients bit for bit
    grouped_grads, grouped_gathers = [], []
    for k in (1, 2, [2]):  # [2]: the same grouping given as a list of group sizes
        model = build("paper")
        shard_model(model, d.mesh, ParallelConfig(blocks_per_unit=k))
        with record_all_gathers() as rec:
            loss = loss_of(model, xs, ys)
            grouped_gathers.append(len(rec.received))
        loss.backward()
        grouped_grads.append({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
    out["grouped/gathers"] = grouped_gathers
    # all the blocks in one unit: FSDP2 shards the block stack, whose hooks wrap the stack alone, so a
    # compiled forward runs both blocks in one graph instead of one graph per block (FSDP2's hooks on
    # each block of a group break the graph at each): one compiled graph fewer runs per forward
    from torch.distributed.fsdp import FSDPModule

    graph_runs = []
    for k in (1, 2):
        torch._dynamo.reset()
        model = build("bf16")
        shard_model(model, d.mesh, ParallelConfig(blocks_per_unit=k))
        runs = [0]

        def counting(gm, example_inputs, runs=runs):  # each graph as traced, counted when it runs
            def run(*args):
                runs[0] += 1
                return gm(*args)
            return run

        loss = torch.compile(loss_of, backend=counting)(model, xs, ys)
        graph_runs.append(runs[0])
        loss.backward()
        if k == 2:
            out["grouped/stack_sharded"] = (isinstance(model.blocks, FSDPModule)
                                            and not any(isinstance(b, FSDPModule) for b in model.blocks))
    torch._dynamo.reset()
    out["grouped/graph_runs"] = graph_runs
    out["grouped/same_grads"] = all(
        grouped_grads[0].keys() == other.keys() and len(other) > 0
        and all(torch.equal(grouped_grads[0][n], other[n]) for n in other) for other in grouped_grads[1:])

    # blocks compiled once (a nested compile region) on sharded ranks: FSDP2's hooks run between the
    # compiled pieces; under aot_eager the same gradients, bit for bit, as the blocks compiled apiece
    once_grads = []
    for once in (False, True):
        torch._dynamo.reset()
        model = build("paper", preset("tiny").replace(compile_blocks_once=once))
        shard_model(model, d.mesh, ParallelConfig(param_dtype="bf16"))
        torch.compile(loss_of, backend="aot_eager")(model, xs, ys).backward()
        once_grads.append({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
    torch._dynamo.reset()
    out["compile_once/same_grads"] = (once_grads[0].keys() == once_grads[1].keys() and len(once_grads[0]) > 0
                                      and all(torch.equal(once_grads[0][n], once_grads[1][n]) for n in once_grads[0]))

    # bf16 weights with param_dtype bf16: FSDP2's own cast gathers them (no wrapper), the same bits
    # as the wrapper's bf16 codes
    from lowprec.fsdp import LowBitGatherWeight, lowbit_gather_weights

    cast_grads, wrapped = [], []
    for wrap in (False, True):
        model = build("bf16")
        if wrap:
            lowbit_gather_weights(model, world)
        shard_model(model, d.mesh, ParallelConfig(param_dtype="bf16"))
        wrapped.append(sum(isinstance(getattr(p, "_local_tensor", p), LowBitGatherWeight) for p in model.parameters()))
        loss_of(model, xs, ys).backward()
        cast_grads.append({n: full(p.grad) for n, p in model.named_parameters() if p.grad is not None})
    out["param_dtype_cast/wrapped"] = wrapped

    # one process with parallel.param_dtype bf16 computes what the ranks compute: gradients of the
    # micro-batch reference equal to the sharded ones, bit for bit, in policies that gather in bf16,
    # in FP8 / FP4 codes, or packed native codes
    for name in ("bf16", "paper", "fp8", "ternary_native"):
        model, ref = build(name), build(name)
        shard_model(model, d.mesh, ParallelConfig(param_dtype="bf16"))
        loss_of(model, xs, ys).backward()
        shard_model(ref, None, ParallelConfig(param_dtype="bf16"))
        microbatch_reference(ref, x, y, world)
        refs, ref_mods = dict(ref.named_parameters()), dict(ref.named_modules())
        out[f"one_process_bf16/{name}"] = max(float((full(p.grad) - refs[n].grad).abs().max())
                                              for n, p in model.named_parameters())
        out[f"one_process_bf16_native/{name}"] = max(
            [float((layer.native_grad - ref_mods[n].native_grad.chunk(world)[rank]).abs().max())
             for n, layer in native_shards(model).items()] or [0.0])
        out[f"one_process_bf16_dtypes/{name}"] = sorted({str(p.dtype) for p in ref.parameters()})
    out["param_dtype_cast/same_grads"] = (cast_grads[0].keys() == cast_grads[1].keys() and len(cast_grads[0]) > 0
                                          and all(torch.equal(cast_grads[0][n], cast_grads[1][n]) for n in cast_grads[0]))
    out["prefetch/same_grads"] = (prefetch_grads[0].keys() == prefetch_grads[1].keys()
                                  and all(torch.equal(prefetch_grads[0][n], prefetch_grads[1][n]) for n in prefetch_grads[0]))

    flag = torch.tensor(float(rank == 1))
    out["found_inf"] = (all_reduce_found_inf(rank == 1), all_reduce_found_inf(False),
                        float(all_reduce_found_inf(flag)), float(flag))

    # the carried TBPTT state: the ranks' rows gathered are the 1-process state of the global batch
    model = build("bf16")
    keys = ("h", "c", "memory")
    _, whole_state = model(x)
    each = [model(xi)[1] for xi in x.chunk(world)]  # every rank's state, as that rank computes it
    my_state = each[rank]
    gathered = gather_state_rows(my_state)
    # in rank order, each rank's rows exactly where they were computed, and a rank's rows of the gathered state are its own
    out["state_rows"] = all(torch.equal(getattr(state_rows(gathered, j, world), k), getattr(each[j], k))
                            for j in range(world) for k in keys)
    out["state_rows_back"] = all(torch.equal(getattr(state_rows(gathered, rank, world), k), getattr(my_state, k))
                                 for k in keys)
    # the 1-process state of the whole batch: equal up to the CPU GEMM's rounding, which on some CPUs depends on
    # the number of rows it multiplies (1 float32 ulp of h and c seen on an AMD EPYC)
    out["state_rows_whole_rel_diff"] = max(
        float((getattr(gathered, k) - getattr(whole_state, k)).abs().max() / getattr(whole_state, k).abs().max())
        for k in keys)

    # bytes of each unit's all-gathers, per format, on a wider model (its blocks are mostly weights)
    wide = replace(preset("tiny"), d_model=128, head_dim=32, d_ff=512, memory=False)
    for name in ("bf16", "ternary_native", "binary_native", "fp8", "fp8_native"):
        model = build(name, wide)
        shard_model(model, d.mesh, ParallelConfig(param_dtype="bf16"))
        out[f"bytes/{name}"] = gather_bytes(model)

    # a training step, then a sharded checkpoint written by 2 ranks
    model = build("ternary_native")
    shard_model(model, d.mesh)
    opt = optim.build_optimizer(model, optim_cfg("ternary_native"))
    loss_of(model, xs, ys).backward()
    opt.step()
    opt.zero_grad()
    out["synced"] = sync_native_scales(model)
    save_sharded(Path(tmp) / "dp2", model, opt, {"step": 1, "config": "model: tiny\n", "meta": {"curve": [[1, 2.5]]}})
    whole_state = {k: full(v) for k, v in model.state_dict().items()}
    if rank == 0:
        torch.save(whole_state, Path(tmp) / "dp2-model.pt")

    # SRAdamW on FSDP2's Parameters: each rank updates its shards, two steps, then a sharded checkpoint
    for moments in ("fp32", "fp8"):
        model = build("fp8")
        shard_model(model, d.mesh)
        opt = optim.build_optimizer(model, sr_adamw_cfg(moments))
        for _ in range(2):
            loss_of(model, xs, ys).backward()
            opt.step()
            opt.zero_grad()
        # numpy arrays: a tensor sent to the parent would live in this process's shared memory
        out[f"sr/params/{moments}"] = {n: full(p).detach().numpy() for n, p in model.named_parameters()}
        sr = opt.parts["latent"]
        out[f"sr/moments/{moments}"] = {
            n: {k: v.numpy() for k, v in sr.dense_state(p, sr.state[p]).items() if isinstance(v, torch.Tensor)}
            for n, p in model.named_parameters() if p in sr.state}
        save_sharded(Path(tmp) / f"sr-{moments}", model, opt, {"step": 2})

    # tensor parallel: the same processes as a (dp=1, tp=2) mesh
    from torch.distributed.device_mesh import init_device_mesh

    tp_mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("dp", "tp"))
    for name in (None, "bf16", "paper"):
        model, ref = build(name), build(name)
        shard_model(model, tp_mesh)
        loss_of(model, x, y).backward()
        loss_of(ref, x, y).backward()
        refs = dict(ref.named_parameters())
        out[f"tp_rel_diff/{name}"] = max(float((full(p.grad) - refs[n].grad).abs().max() / refs[n].grad.abs().max())
                                         for n, p in model.named_parameters())
    return out


@pytest.fixture(scope="module")
def dp2(tmp_path_factory, fork_ranks):
    tmp = tmp_path_factory.mktemp("dp2")
    return tmp, run_ranks(fork_ranks, _data_parallel_checks, 2, str(tmp))


def test_mesh_and_log_line(dp2):
    _, res = dp2
    for rank, r in enumerate(res):
        assert (r["dp"], r["tp"], r["mesh"]) == (2, 1, (2,))
        assert r["describe"] == f"2 processes (gloo, cpu): mesh dp=2; this is rank {rank} (dp rank {rank}, local rank {rank})"


@pytest.mark.parametrize("name", [None, "bf16", "paper", "ternary_native", "fp8"])
def test_fsdp_gradients_equal_one_process(dp2, name):
    """Bit for bit: each rank's micro-batch runs the same kernels on the same (gathered) weights
    and codes, and the average over 2 ranks is the reference's (a + b) / 2. paper and fp8 travel
    as FP8 / FP4 codes (lowbit_gather) and ternary_native as packed 2-bit codes."""
    _, res = dp2
    for r in res:
        assert r[f"grad_diff/{name}"] == 0.0
        assert r[f"native_grad_diff/{name}"] == 0.0
    if name == "ternary_native":
        assert res[0]["native_layers/ternary_native"] > 0


def test_prefetch_starts_the_next_units_gather(dp2):
    """``parallel.prefetch: 1``: when a block's forward starts, the next block's all-gather has
    been issued (one more than without prefetching; none after the last block); same gradients."""
    _, res = dp2
    for r in res:
        plain, ahead = r["prefetch/gathers_at_blocks"][0], r["prefetch/gathers_at_blocks"][1]
        assert len(plain) == len(ahead) >= 2
        assert [a - p for a, p in zip(ahead, plain)] == [1] * (len(plain) - 1) + [0]
        assert r["prefetch/same_grads"]


def test_gathered_lstm_weights_compile():
    """The fp8 policy's LSTM layers read their weights as gathered (compute_in_param_dtype): the
    compiled step (aot_eager: the same ATen ops) traces the recurrence's backward, whose layers'
    GEMMs are looked up without their weights, and gives eager's loss and gradients bit for bit."""
    from experiments.parallel import compute_in_param_dtype

    models = [compute_in_param_dtype(build("fp8"), torch.bfloat16) for _ in range(2)]
    assert models[0].rnn.lstm[0].hh.gathered_as is not None
    x, y = batch(rows=2)
    losses = [torch.compile(loss_of, backend="aot_eager")(models[0], x, y), loss_of(models[1], x, y)]
    for loss in losses:
        loss.backward()
    assert torch.equal(losses[0], losses[1])
    grads = dict(models[1].named_parameters())
    assert all(torch.equal(p.grad, grads[n].grad) for n, p in models[0].named_parameters() if p.requires_grad)


def test_bf16_weights_gather_through_the_param_dtype(dp2):
    """Under the bf16 policy with parallel.param_dtype bf16 no weight is wrapped for a gather in its
    format (FSDP2's cast is that format), and the gradients are the wrapped gather's, bit for bit."""
    for r in dp2[1]:
        unwrapped, wrapped = r["param_dtype_cast/wrapped"]
        assert unwrapped == 0 and wrapped > 0
        assert r["param_dtype_cast/same_grads"]


@pytest.mark.parametrize("name", ["bf16", "paper", "fp8", "ternary_native"])
def test_one_process_param_dtype_computes_what_the_ranks_compute(dp2, name):
    """parallel.param_dtype bf16 in one process (compute_in_param_dtype): the gradients of its
    micro-batches are the 2 ranks' of FSDP2 with the same param_dtype, bit for bit (bf16 casts,
    FP8 / FP4 codes dequantized to bf16 as after the gather, packed native codes), and its
    parameters stay fp32 masters."""
    for r in dp2[1]:
        assert r[f"one_process_bf16/{name}"] == 0.0
        assert r[f"one_process_bf16_native/{name}"] == 0.0
        assert r[f"one_process_bf16_dtypes/{name}"] == ["torch.float32"]


def test_blocks_compiled_once_on_ranks(dp2):
    """model.compile_blocks_once on 2 FSDP2 ranks (param_dtype bf16, paper policy), compiled with
    aot_eager: the same gradients, bit for bit, as the blocks compiled apiece."""
    for r in dp2[1]:
        assert r["compile_once/same_grads"]


def test_blocks_gathered_together(dp2):
    """parallel.blocks_per_unit 2: the tiny hybrid's two blocks are one FSDP2 group, gathered in one
    all-gather instead of two in the forward, and the gradients are the same bits."""
    from experiments.parallel import fsdp_groups

    assert [n for n, _ in fsdp_groups(build(None), 2)][:1] == ["blocks.0-1"]
    assert [n for n, _ in fsdp_groups(build(None), 1)][:2] == ["blocks.0", "blocks.1"]
    five = build(None, preset("tiny").replace(n_blocks=5))
    groups = fsdp_groups(five, [1, 4])  # sizes in block order: the first block alone, then the rest
    assert [n for n, _ in groups][:2] == ["blocks.0", "blocks.1-4"]
    assert groups[1][1] == list(five.blocks)[1:]
    assert [n for n, _ in fsdp_groups(five, 2)][:3] == ["blocks.0-1", "blocks.2-3", "blocks.4"]
    with pytest.raises(ValueError, match=r"blocks_per_unit=\[2, 2\] adds up to 4 blocks; the model has 5"):
        fsdp_groups(five, [2, 2])
    for r in dp2[1]:
        one_each, together, as_list = r["grouped/gathers"]
        assert together == as_list == one_each - 1
        assert r["grouped/same_grads"]
        per_block, stacked = r["grouped/graph_runs"]
        assert r["grouped/stack_sharded"] and stacked == per_block - 1, r["grouped/graph_runs"]


def test_data_parallel_matches_the_whole_batch(dp2):
    """The mean of 2 ranks' mean losses is the 1-process loss of the global batch: in fp32 the
    gradients agree to rounding (1e-6 relative: the sums over rows run in another order). (A
    quantized gradient that sums rows before it is rounded, such as a position embedding's, is
    rounded per micro-batch instead: equal to the micro-batch reference, not to this.)"""
    _, res = dp2
    assert res[0]["whole_batch_rel_diff"] < 1e-6


def test_carried_state_rows(dp2):
    """Rows of a batch are independent streams: the ranks' carried states, gathered, hold each rank's
    rows in rank order bit for bit, a rank's rows of it are its own, and the whole is the 1-process
    state of the global batch (within 1e-6 relative: the CPU GEMM may round a 4-row product and a
    2-row one differently in the last bit)."""
    _, res = dp2
    assert all(r["state_rows"] and r["state_rows_back"] for r in res)
    assert all(r["state_rows_whole_rel_diff"] < 1e-6 for r in res)


def test_fp8_gather_amax_in_one_all_reduce(dp2):
    """precompute_gather_amax: one all-reduce for every per-tensor FP8 weight; the forward's gathers
    then make none (without it: one per weight), the gradients are bit-identical, and a master
    changed in place afterwards takes its own amax again (one all-reduce)."""
    for out in dp2[1]:
        assert out["amax_precomputed"] > 0
        assert out["forward_all_reduces/False"] >= out["amax_precomputed"]
        assert out["forward_all_reduces/True"] == 0
        assert out["forward_all_reduces/stale"] == 1
        assert out["amax_precomputed_same_grads"]


def test_grad_norm_and_found_inf_over_ranks(dp2):
    """The norm over every rank's shards (DTensor and native rows) is the 1-process norm (per-tensor
    norms in fp32 on the device against an fp64 reference: a few fp32 ulps, 1e-6 relative); one
    rank's inf/NaN stops every rank's step."""
    _, res = dp2
    for r in res:
        assert r["norm"] == pytest.approx(r["ref_norm"], rel=1e-6)
        assert r["found_inf"] == (True, False, 1.0, 1.0)


def test_all_gather_bytes_per_format(dp2):
    """Bytes each rank receives gathering the blocks' weights, against bf16: packed ternary codes
    (2 bits) <= 1/7, binary (1 bit) <= 1/14, FP8 codes (latent, cast before the gather; or native)
    <= 0.55. The blocks' norms travel in bf16 in every policy; a per-tensor scale is not gathered."""
    _, res = dp2
    blocks = lambda name: sum(v for k, v in res[0][f"bytes/{name}"].items() if k.startswith("blocks."))
    bf16 = blocks("bf16")
    assert blocks("ternary_native") <= bf16 / 7
    assert blocks("binary_native") <= bf16 / 14
    assert blocks("fp8") <= 0.55 * bf16
    assert blocks("fp8_native") <= 0.55 * bf16
    assert res[0]["bytes/bf16"] == res[1]["bytes/bf16"]


def test_tensor_parallel_matches_one_process(dp2):
    """fp32, and bf16 weights and activations (cast elementwise): splitting a GEMM changes only the
    order of the row-parallel sum (1e-6 relative). paper's FP8 weights get one scale per shard
    instead of per tensor: close, not equal (documented in lowprec.tensor_parallel)."""
    _, res = dp2
    assert res[0]["tp_rel_diff/None"] < 1e-6
    assert res[0]["tp_rel_diff/bf16"] < 1e-6
    assert 0 < res[0]["tp_rel_diff/paper"] < 0.5


# ------------------------------------------------------------- SRAdamW on FSDP2 Parameters

def _sr_reference(moments: str):
    """Two SRAdamW steps in one process on the ranks' rows as two micro-batches -> (model, optimizer)."""
    model = build("fp8")
    opt = optim.build_optimizer(model, sr_adamw_cfg(moments))
    x, y = batch()
    for _ in range(2):
        microbatch_reference(model, x, y, 2)
        opt.step()
        opt.zero_grad()
    return model, opt


def test_sr_adamw_updates_fsdp2_shards_as_one_process(dp2):
    """SRAdamW updates each rank's shards of the FSDP2 Parameters it owns (the latent masters; AdamW
    the rest). fp32 moments: after 2 steps the weights are the 1-process weights up to the order of
    the gradient sums (measured: equal, the two ranks' gradients are added in the reference's order;
    bound 1e-6 absolute at weights of ~0.02-1, as Adam divides by sqrt(v) and so passes a gradient's
    relative rounding on). fp8 moments: each rank rounds its moments stochastically with noise of its
    own, so the runs only stay close (measured 1.7e-4; bound 1e-3, the size of one update at lr
    1e-3); both ranks hold the same gathered weights."""
    _, res = dp2
    for moments, bound in (("fp32", 1e-6), ("fp8", 1e-3)):
        ref, _ = _sr_reference(moments)
        want = {n: p.detach() for n, p in ref.named_parameters()}
        for rank in (0, 1):
            got = {n: torch.from_numpy(v) for n, v in res[rank][f"sr/params/{moments}"].items()}
            assert set(got) == set(want)
            assert max(float((got[n] - want[n]).abs().max()) for n in want) < bound, moments
        assert all((res[0][f"sr/params/{moments}"][n] == res[1][f"sr/params/{moments}"][n]).all() for n in want)
        assert len(res[0][f"sr/moments/{moments}"]) > 0


def test_sr_adamw_sharded_checkpoint_loads_in_one_process(dp2):
    """The 2-rank SRAdamW checkpoint (fp8 moments, blocks of 128 per rank's shard) loads into one
    process: the weights bit for bit, and every fp8 moment holds exactly the values of the two
    shards joined (each shard here is a whole number of blocks, so re-blocking them over the whole
    tensor keeps every code and scale); one more step then runs."""
    tmp, res = dp2
    model = build("fp8", seed=3)
    opt = optim.build_optimizer(model, sr_adamw_cfg("fp8"))
    assert load_sharded(tmp / "sr-fp8", model, opt)["step"] == 2
    sr = opt.parts["latent"]
    params = dict(model.named_parameters())
    for n, p in params.items():
        assert torch.equal(p, torch.from_numpy(res[0]["sr/params/fp8"][n])), n
    shards = [res[r]["sr/moments/fp8"] for r in (0, 1)]
    assert set(shards[0]) == {n for n, p in params.items() if p in sr.state}
    for n in shards[0]:
        st = sr.state[params[n]]
        assert st["exp_avg"].dtype == torch.float8_e4m3fn and "exp_avg_scale" in st  # stored as fp8 again
        mine = sr.dense_state(params[n], st)
        for key in ("exp_avg", "exp_avg_sq"):
            joined = torch.cat([torch.from_numpy(shards[r][n][key]) for r in (0, 1)])
            assert torch.equal(mine[key], joined), (n, key)
        assert float(mine["step"]) == 2.0
    x, y = batch()
    loss_of(model, x, y).backward()
    opt.step()
    assert float(sr.state[next(iter(sr.state))]["step"]) == 3.0


# ------------------------------------------------------------- sharded checkpoints, 2 <-> 1

def _load_at_two(rank, world, tmp):
    d = init_distributed(ParallelConfig(), device="cpu")
    model = build("ternary_native", seed=7)
    shard_model(model, d.mesh)
    opt = optim.build_optimizer(model, optim_cfg("ternary_native"))
    extra = load_sharded(Path(tmp) / "dp1", model, opt)
    save_sharded(Path(tmp) / "dp2-again", model, opt, extra)
    return extra


def test_checkpoint_2_to_1_to_2(dp2, fork_ranks):
    """A checkpoint of 2 ranks loads into 1 process (whole tensors, bit for bit); saved there, it
    loads into 2 ranks again; exported, the 2-rank checkpoints before and after are identical
    (model, every optimizer part's state, extra)."""
    tmp, _ = dp2
    model = build("ternary_native", seed=5)
    opt = optim.build_optimizer(model, optim_cfg("ternary_native"))
    extra = load_sharded(tmp / "dp2", model, opt)
    assert extra == {"step": 1, "config": "model: tiny\n", "meta": {"curve": [[1, 2.5]]}}
    want = torch.load(tmp / "dp2-model.pt", weights_only=False)
    got = model.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k].view(torch.uint8) if got[k].dtype == torch.float8_e4m3fn else got[k],
                           want[k].view(torch.uint8) if want[k].dtype == torch.float8_e4m3fn else want[k]), k
    assert any(opt.state_dict()["parts"]["ternary"]["state"].values())
    save_sharded(tmp / "dp1", model, opt, extra)
    assert run_ranks(fork_ranks, _load_at_two, 2, str(tmp)) == [extra, extra]
    a = load_checkpoint(export_single_file(tmp / "dp2", tmp / "a.pt"))
    b = load_checkpoint(export_single_file(tmp / "dp2-again", tmp / "b.pt"))
    _assert_same(a["model"], b["model"])
    _assert_same(a["optimizer"], b["optimizer"])


def _assert_same(a, b, where="") -> None:
    if isinstance(a, dict):
        assert isinstance(b, dict), where
        assert set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            _assert_same(u, v, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                                                  b.view(torch.uint8) if b.element_size() == 1 else b), where
    else:
        assert a == b, where


def test_export_reads_as_a_single_file_checkpoint(tmp_path):
    """export_single_file writes experiments.checkpoint's format: a 1-process model and optimizer
    load it as they load a checkpoint of experiments.train."""
    model = build("ternary_native")
    opt = optim.build_optimizer(model, optim_cfg("ternary_native"))
    x, y = batch()
    loss_of(model, x, y).backward()
    opt.step()
    save_sharded(tmp_path / "ck", model, opt, {"step": 3, "config": "x: 1\n"})
    payload = load_checkpoint(export_single_file(tmp_path / "ck", tmp_path / "ckpt-00000003.pt"))
    assert payload["format"] == 1 and payload["step"] == 3 and payload["config"] == "x: 1\n"
    again, opt2 = build("ternary_native", seed=3), None
    again.load_state_dict(payload["model"])
    opt2 = optim.build_optimizer(again, optim_cfg("ternary_native"))
    opt2.load_state_dict(payload["optimizer"])
    _assert_same(opt.state_dict(), opt2.state_dict())
    _assert_same(model.state_dict(), again.state_dict())


def test_export_is_read_by_evaluate(tmp_path, corpus, cfg_of):
    """experiments.evaluate.load_run rebuilds the model of an exported checkpoint from its config."""
    from omegaconf import OmegaConf

    from experiments.build import model_config, vocab_size
    from experiments.data import DataConfig
    from experiments.evaluate import load_run

    cfg = cfg_of(corpus, tmp_path / "run", "precision=ternary_native")
    model = HybridLM(model_config(cfg, vocab_size(DataConfig.from_config(cfg.data))))
    lowprec.apply_policy(model, lowprec.PrecisionPolicy.from_config(OmegaConf.to_container(cfg.precision, resolve=True)))
    save_sharded(tmp_path / "dcp", model, None, {"step": 0, "config": OmegaConf.to_yaml(cfg, resolve=True)})
    out = tmp_path / "run" / "checkpoints" / "ckpt-00000000.pt"
    out.parent.mkdir(parents=True)
    loaded, _, _ = load_run(export_single_file(tmp_path / "dcp", out))
    _assert_same(model.state_dict(), loaded.state_dict())


@pytest.mark.parametrize("name", ["bf16", "paper", "ternary_native"])
def test_activation_checkpointing_changes_no_number(name):
    """checkpoint_units: the loss and every gradient (parameters and native carriers) bit-identical
    to the same model without it, dropout on (its masks are replayed in the recomputed forward)."""
    from experiments.parallel import checkpoint_units

    def run(ck):
        model = build(name, replace(preset("tiny"), dropout=0.1))
        if ck:
            assert checkpoint_units(model) == ["blocks.0", "blocks.1", "rnn.lstm.0", "rnn.lstm.1"]
        x, y = batch()
        torch.manual_seed(1)
        loss = loss_of(model, x, y)
        loss.backward()
        grads = [p.grad for p in model.parameters()] + [m.native_grad for m in model.modules()
                                                        if getattr(m, "is_native", False)]
        return loss, grads

    (loss0, g0), (loss1, g1) = run(False), run(True)
    assert torch.equal(loss0, loss1)
    assert len(g0) == len(g1) and all(a is not None for a in g0)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def _meta_built_model(rank, world):
    """The benchmark's build on 2 ranks: meta model, policy, native codes, shards, materialized."""
    import types

    from experiments import bench_parallel as bp
    from experiments.loop import Stepper, read_results

    d = init_distributed(ParallelConfig(), device="cpu")
    out = {}
    for name in ("paper", "ternary_native"):
        args = types.SimpleNamespace(model="tiny", policy=name, blocks=None, T=16, batch=2, checkpoint=True,
                                     param_dtype="bf16", reduce_dtype="fp32", warmup=0, iters=0, prefetch=1, reshard=True,
                                     blocks_per_unit=1)
        model, opt, sched, scaler, n = bp.build(args, d)
        tensors = [*model.parameters(), *model.buffers()]
        out[f"meta_left/{name}"] = sum(t.device.type == "meta" for t in tensors)
        out[f"params/{name}"] = n
        out[f"native_shards/{name}"] = {k: tuple(m.w_data.shape) for k, m in native_shards(model).items()}
        stepper = Stepper(model, opt, sched, scaler, bp.random_batches(2, 16, 32, d.device, rank), tbptt=False,
                          parallel=d)
        out[f"steps/{name}"] = read_results([stepper.step() for _ in range(3)])[0]
    return out


def test_meta_built_model_trains_on_its_shards(fork_ranks):
    """experiments.bench_parallel builds the model with no whole float copy anywhere: nothing is left
    on the meta device, the parameter count is the model's, native layers hold their rows of packed
    codes (half the rows each), and steps of the trainer train (finite loss, every step taken)."""
    import math

    from experiments.bench_parallel import model_config

    cfg = model_config("tiny", None, 16)  # the tiny preset with its window at T
    whole = {name: sum(p.numel() for p in build(name, cfg).parameters()) + sum(
        m.native_weight.numel() for m in build(name, cfg).modules() if getattr(m, "is_native", False))
        for name in ("paper", "ternary_native")}
    full_rows = {n: m.w_data.shape for n, m in build("ternary_native").named_modules() if getattr(m, "is_native", False)}
    for out in run_ranks(fork_ranks, _meta_built_model, 2):
        for name in ("paper", "ternary_native"):
            assert out[f"meta_left/{name}"] == 0
            assert out[f"params/{name}"] == whole[name]
            assert all(math.isfinite(loss) and taken for loss, _, taken, _ in out[f"steps/{name}"])
        shards = out["native_shards/ternary_native"]
        assert shards.keys() == full_rows.keys()
        assert all(shards[n] == (full_rows[n][0] // 2, full_rows[n][1]) for n in shards)


def test_materialize_starts_delayed_scaling_histories_empty(monkeypatch):
    """A meta-built model under fp8_delayed, materialized: its amax histories are zero (``to_empty``
    leaves memory as it finds it; here it is made to leave 7s, so the zeros are materialize_'s), its
    parameters finite."""
    from experiments.bench_parallel import materialize_

    with torch.device("meta"):
        model = HybridLM(preset("tiny"))
    lowprec.apply_policy(model, policy("fp8_delayed"))
    to_empty = torch.nn.Module.to_empty

    def garbage(self, *, device, recurse=True):
        out = to_empty(self, device=device, recurse=recurse)
        for t in [*self.parameters(), *self.buffers()]:
            t.data.fill_(7)
        return out
    monkeypatch.setattr(torch.nn.Module, "to_empty", garbage)
    materialize_(model, torch.device("cpu"))
    histories = {n: b for n, b in model.named_buffers() if "amax_history_" in n}
    assert histories and all(not b.any() for b in histories.values())
    assert all(bool(p.isfinite().all()) for p in model.parameters())


def _ignored_targets_batch():
    """A global batch of 4 rows whose second half (rank 1's rows) scores only 3 of its targets."""
    x, y = batch()
    y[2:] = -100
    y[3, :3] = 5
    return x, y


def _stepper_with_ignored_targets(rank, world):
    from experiments.loop import Stepper, read_results

    d = init_distributed(ParallelConfig(), device="cpu")
    x, y = _ignored_targets_batch()
    model = build(None)
    shard_model(model, d.mesh)
    opt = optim.build_optimizer(model, optim_cfg("adamw"))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    rows = slice(rank * 2, rank * 2 + 2)
    source = iter([(x[rows], y[rows])])
    stepper = Stepper(model, opt, sched, lowprec.LossScaler(mode="none"), source, tbptt=False, grad_clip=None,
                      parallel=d)
    (loss, norm, taken, _), = read_results([stepper.step()])[0]
    flag = torch.tensor(float(rank == 1))  # one rank's inf/NaN, agreed in the norm's all-reduce
    agreed, _ = clip_grads_over_ranks_([torch.ones(3)], None, d, found_inf=flag)
    return {"loss": loss, "norm": norm, "taken": taken, "agreed": float(agreed)}


def test_ranks_scoring_different_targets_follow_one_process(fork_ranks):
    """Rank 0 scores all 32 of its targets, rank 1 only 3 (the others ignored, -100): the ranks'
    loss and gradient norm are those of one process's mean over the 35 scored targets of the
    global batch (the backward starts before the global count is known and the gradients are
    rescaled by it afterwards; fp32, sums in another order: 1e-5 relative). The inf/NaN verdict
    summed with the norm's squares stops both ranks."""
    x, y = _ignored_targets_batch()
    ref = build(None)
    loss = F.cross_entropy(ref(x)[0].flatten(0, 1), y.flatten(), ignore_index=-100)
    loss.backward()
    ref_norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in ref.parameters()
                                                           if p.grad is not None])))
    for out in run_ranks(fork_ranks, _stepper_with_ignored_targets, 2):
        assert out["taken"]
        assert out["loss"] == pytest.approx(float(loss), rel=1e-5)
        assert out["norm"] == pytest.approx(ref_norm, rel=1e-5)
        assert out["agreed"] == 1.0


def test_init_native_refuses_another_shape():
    model = build("ternary_native")
    layer = model.blocks[0].ffn.up
    with pytest.raises(ValueError, match="expected a weight of shape"):
        layer.init_native_(torch.zeros(3, 3))


def test_killed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    """A save that dies after writing part of its files leaves the checkpoint at the path as it
    was; a save killed outright leaves a temporary directory that loads ignore and the next save
    removes; one killed between its two renames is found where it was set aside."""
    import experiments.sharded_checkpoint as sc

    model = build("ternary_native")
    path = tmp_path / "ck"
    save_sharded(path, model, None, {"step": 1})
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    real_save = sc.dcp.save

    def dies_midway(state, checkpoint_id, **kw):
        real_save({"model": state["model"]}, checkpoint_id=checkpoint_id, **kw)  # some files are written
        (Path(checkpoint_id) / ".metadata").unlink()
        raise RuntimeError("killed")

    monkeypatch.setattr(sc.dcp, "save", dies_midway)
    with pytest.raises(RuntimeError, match="killed"):
        save_sharded(path, model, None, {"step": 2})
    monkeypatch.setattr(sc.dcp, "save", real_save)
    assert not list(tmp_path.glob(".ck.tmp-*"))
    fresh = build("ternary_native", seed=9)
    assert load_sharded(path, fresh) == {"step": 1}
    _assert_same(before, fresh.state_dict())

    (tmp_path / ".ck.tmp-deadbeef").mkdir()  # a save killed outright
    (tmp_path / ".ck.tmp-deadbeef" / "__0_0.distcp").write_bytes(b"partial")
    assert load_sharded(path, build("ternary_native", seed=9)) == {"step": 1}
    save_sharded(path, model, None, {"step": 2})
    assert not (tmp_path / ".ck.tmp-deadbeef").exists()

    path.rename(tmp_path / ".ck.old-0123")  # killed between "set the old one aside" and "rename the new one"
    assert load_sharded(path, build("ternary_native", seed=9)) == {"step": 2}


# --------------------------------------------------------------------------- one process

def test_single_process_is_unchanged(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = init_distributed(ParallelConfig(), device="cpu")
    assert d.mesh is None and not dist.is_initialized() and d.is_main
    assert d.describe() == "single process on cpu (no process group)"
    model = build("ternary_native")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert shard_model(model, d.mesh) is model and type(model) is HybridLM
    _assert_same(before, model.state_dict())


def test_parallel_config():
    cfg = ParallelConfig.from_config(yaml.safe_load((CONFIGS / "parallel" / "default.yaml").read_text()))
    assert cfg.layout(8) == (8, 1)
    assert ParallelConfig(tp=2).layout(8) == (4, 2)
    with pytest.raises(ValueError, match="does not fill the 8 processes"):
        ParallelConfig(tp=3).layout(8)
    with pytest.raises(ValueError, match="unknown parallel config keys"):
        ParallelConfig.from_config({"dq": 2})
    with pytest.raises(ValueError, match="param_dtype"):
        ParallelConfig(param_dtype="fp9")
    with pytest.raises(ValueError, match="nccl_protocol"):
        ParallelConfig(nccl_protocol="fast")
    with pytest.raises(ValueError, match="prefetch"):
        ParallelConfig(prefetch=-1)
    with pytest.raises(ValueError, match="blocks_per_unit"):
        ParallelConfig(blocks_per_unit=0)
    with pytest.raises(ValueError, match="blocks_per_unit"):
        ParallelConfig(blocks_per_unit=[1, 0])
    with pytest.raises(ValueError, match="blocks_per_unit"):
        ParallelConfig(blocks_per_unit=[])
    from omegaconf import OmegaConf

    assert ParallelConfig.from_config(OmegaConf.create({"blocks_per_unit": [1, 11]})).blocks_per_unit == [1, 11]
    from experiments.bench_parallel import _blocks_per_unit, _blocks_per_unit_arg, _compile_mode

    assert _compile_mode("blocks") == "blocks" and _compile_mode("true") is True and _compile_mode(False) is False

    assert _blocks_per_unit("12") == 12 and _blocks_per_unit("1,11") == [1, 11]
    assert _blocks_per_unit_arg([1, 11]) == "1,11" and _blocks_per_unit_arg(3) == "3"


def test_weak_scaling_measures_every_layout_against_one_process(capsys):
    """``bench_parallel weak`` with two layouts on 1 and 2 CPU processes: one 1-process row, then a
    2-process row per layout, each row's ratio against that one process; a layout list is refused
    where one measurement is meant."""
    import re

    from experiments import bench_parallel as bp

    bp.main(["weak", "--model", "tiny", "--device", "cpu", "--gpus", "1", "2", "--policies", "bf16", "--iters", "1",
             "--warmup", "0", "--blocks-per-unit", "1", "2", "--reshard", "off", "--reduce-dtype", "bf16"])
    rows = [ln.split(" | ") for ln in capsys.readouterr().out.splitlines() if ln.startswith("| tiny |")]
    assert [(r[2], r[3]) for r in rows] == [("1", "-"), ("2", "1 per unit, bf16 reduce, prefetch 1, no reshard"),
                                            ("2", "2 per unit, bf16 reduce, prefetch 1, no reshard")]
    base = float(rows[0][9].replace(",", ""))
    for r in rows:  # tokens/s per GPU over the 1-process row's, as far as the printing lets it be recomputed: 0.005
        # for the ratio's two printed decimals, and each tokens/s printed as an integer (off by up to 0.5, which a
        # loaded CPU's double-digit rates make more than 0.001 of the ratio)
        tps = float(r[9].replace(",", ""))
        ratio = tps / base
        printing = 0.005 + ratio * (0.5 / tps + 0.5 / base)
        assert re.fullmatch(r"\d+\.\d\d", r[10]) and abs(float(r[10]) - ratio) <= printing
    with pytest.raises(SystemExit):
        bp.main(["one", "--model", "tiny", "--device", "cpu", "--prefetch", "1", "2"])
    assert "one measures one layout" in capsys.readouterr().err


def _shard_steps(rank, side):
    """Two copies of a small FSDP2-sharded model (uneven shards: 7 and 5 rows over 2 ranks), the
    same gradients on both, four AdamW steps each (the third skipped by found_inf): one through
    MixedOptimizer.step (on the local shards), one with torch's step on the DTensors."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    init_distributed(ParallelConfig(), device="cpu")
    out = {}
    for fused in (True, False):
        models = []
        for _ in range(2):
            torch.manual_seed(0)
            m = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Linear(7, 5), torch.nn.LayerNorm(5))
            for layer in m:
                fully_shard(layer)
            fully_shard(m)
            models.append(m)
        kw = {"fused": True} if fused else {"foreach": True}
        mixed = optim.MixedOptimizer({"other": torch.optim.AdamW(models[0].parameters(), lr=0.1, **kw)})
        plain = torch.optim.AdamW(models[1].parameters(), lr=0.1, **kw)
        seen = []  # what each step of the mixed optimizer's AdamW found in its group: DTensors or local shards
        mixed.parts["other"].register_step_pre_hook(
            lambda opt, *_: seen.append(type(opt.param_groups[0]["params"][0]).__name__))
        gen = torch.Generator().manual_seed(rank)
        for step in range(4):
            x = torch.randn(3, 6, generator=gen)
            for m in models:
                m(x).square().sum().backward()
            found = torch.tensor(1.0 if step == 2 else 0.0)
            mixed.step(found_inf=found)
            if fused:
                plain.grad_scale, plain.found_inf = None, found
                plain.step()
                del plain.grad_scale, plain.found_inf
            elif step != 2:
                plain.step()
            for opt in (mixed, plain):
                opt.zero_grad(set_to_none=True)
        a, b = list(models[0].parameters()), list(models[1].parameters())
        name = "fused" if fused else "foreach"
        out[f"{name}/params_equal"] = all(torch.equal(p.to_local(), q.to_local()) for p, q in zip(a, b))
        out[f"{name}/states_equal"] = all(
            torch.equal(getattr(u, "_local_tensor", u), getattr(v, "_local_tensor", v))
            for p, q in zip(a, b) for u, v in zip(mixed.state[p].values(), plain.state[q].values()))
        out[f"{name}/state_is_dtensor"] = all(isinstance(mixed.state[p]["exp_avg"], DTensor) for p in a)
        out[f"{name}/stepped_on"] = seen
        out[f"{name}/steps"] = float(mixed.state[a[0]]["step"])
        out[f"{name}/no_local_left"] = (len(mixed.parts["other"].state) == len(a)
                                        and all(p.to_local().grad is None for p in a))
    return out


def test_adamw_steps_local_shards_bit_for_bit(fork_ranks):
    """MixedOptimizer steps torch's AdamW (fused and foreach) on the local shards of FSDP2's DTensors:
    the parameters and states bit-identical to torch's step on the DTensors, a found_inf step skipped
    on both (3 steps counted), the states still DTensors, nothing of the swap left behind."""
    for ok, out, _ in fork_ranks(_shard_steps, 2):
        assert ok, out
        for name in ("fused", "foreach"):
            assert out[f"{name}/params_equal"] and out[f"{name}/states_equal"]
            assert out[f"{name}/state_is_dtensor"] and out[f"{name}/no_local_left"]
            assert out[f"{name}/steps"] == 3.0
        # the first step creates the states through the DTensors; the later ones step the local shards
        assert out["fused/stepped_on"] == ["DTensor", "Tensor", "Tensor", "Tensor"]
        assert out["foreach/stepped_on"] == ["DTensor", "Tensor", "Tensor"]  # the skipped step not taken


def test_weak_scaling_repeats_in_rounds_and_summarises(capsys, monkeypatch):
    """``--repeats 3``: every row launched three times, round after round (each round's ratio against
    its own 1-process row), then the median and range over the rounds; a failed launch counts as a
    round without a result. The launches are replaced by a recorder that returns made-up rows (what
    is tested is the bookkeeping, not a measurement)."""
    from experiments import bench_parallel as bp

    tokens = iter([100.0, 90.0, 80.0, 120.0, 90.0, None, 110.0, 99.0, 88.0])
    launched = []

    def fake_launch(n, extra, timeout):
        launched.append(n)
        t = next(tokens)
        if t is None:
            return None, "out of memory"
        return {"model": "tiny", "policy": "bf16", "gpus": n, "blocks": 2, "params": 1e6, "step_s": 0.1,
                "host_s": 0.05, "run_s": 0.1, "tokens_per_s_per_gpu": t, "peak_gib": 1.0, "gather_bytes": 0, "loss": 5.0,
                "taken": 1, "steps": 1, "blocks_per_unit": 1, "reduce_dtype": "fp32", "prefetch": 1,
                "reshard": True}, ""

    monkeypatch.setattr(bp, "launch", fake_launch)
    bp.main(["weak", "--model", "tiny", "--device", "cpu", "--gpus", "1", "2", "4", "--policies", "bf16",
             "--repeats", "3"])
    out = capsys.readouterr().out
    assert launched == [1, 2, 4] * 3
    rows = [ln.split(" | ") for ln in out.split("Over 3 rounds")[1].splitlines() if ln.startswith("| tiny |")]
    # 2 GPUs: ratios 0.90, 0.75, 0.90 -> median 0.90; 4 GPUs: 0.80 and 0.80 (round 2 failed)
    assert [r[2:] for r in rows] == [
        ["1", "-", "3/3", "110 (100–120)", "1.00 (1.00–1.00) |"],
        ["2", "1 per unit, fp32 reduce, prefetch 1", "3/3", "90 (90–99)", "0.90 (0.75–0.90) |"],
        ["4", "1 per unit, fp32 reduce, prefetch 1", "2/3", "84 (80–88)", "0.80 (0.80–0.80) |"]]
    assert "failed: out of memory" in out
    for bad, msg in ((["weak", "--repeats", "0"], "give 1 or more"), (["wide", "--repeats", "2"], "is for weak")):
        with pytest.raises(SystemExit):
            bp.main(bad)
        assert msg in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["segments", "windows"])
@pytest.mark.parametrize("world", [2, 4])
def test_rank_batches_make_the_global_batch(kind, world):
    """N ranks' rows, stacked in rank order, are the 1-process batch, step after step and across an
    epoch boundary; the position is the same on every rank and resumes at another N."""
    tokens = torch.arange(3000) % 97
    make = (lambda: SegmentStreamer(tokens, 8, 16, seed=3)) if kind == "segments" else \
        (lambda: TokenBatcher(tokens, 8, 16, seed=3))
    one = make()
    ranks = [RankBatches(make(), r, world) for r in range(world)]
    steps = (one.segments_per_epoch if kind == "segments" else one.batches_per_epoch) + 3
    for _ in range(steps):
        want = next(one)
        got = [next(r) for r in ranks]
        for i, w in enumerate(want):
            if isinstance(w, torch.Tensor):
                assert torch.equal(torch.cat([g[i] for g in got]), w)
            else:
                assert all(g[i] == w for g in got)
    assert all(r.state_dict() == one.state_dict() for r in ranks)
    resumed = RankBatches(make(), 0, 1)
    resumed.load_state_dict(ranks[-1].state_dict())
    assert torch.equal(next(resumed)[0], next(one)[0])
    with pytest.raises(ValueError, match="do not split over 3"):
        RankBatches(make(), 0, 3)


# ------------------------------------------------------------------- 4 processes: dp x tp

def _backward_on_dp_tp(name: str):
    """(d, model, ref): ``name``'s tiny hybrid on a (dp=2, tp=2) mesh after one backward of this
    rank's rows, and one process's gradients of the same rows as dp micro-batches."""
    d = init_distributed(ParallelConfig(tp=2), device="cpu")
    x, y = batch()
    model, ref = build(name), build(name)
    shard_model(model, d.mesh, ParallelConfig(tp=2))
    loss_of(model, x.chunk(d.dp)[d.dp_rank], y.chunk(d.dp)[d.dp_rank]).backward()
    microbatch_reference(ref, x, y, d.dp)
    return d, model, ref


def _two_dimensional(rank, world):
    d, model, ref = _backward_on_dp_tp("bf16")
    refs = dict(ref.named_parameters())
    return d.describe(), max(float((full(p.grad) - refs[n].grad).abs().max() / refs[n].grad.abs().max())
                             for n, p in model.named_parameters())


def _piece(whole: torch.Tensor, tp_dim, tp_rank: int, tp: int, dp_rank: int, dp: int):
    """The block of a whole native tensor one rank of a (dp, tp) mesh holds, written out by hand:
    tensor parallelism's rows (tp_dim 0) or columns (1) first, then the data-parallel ranks' rows."""
    if tp_dim is not None:
        whole = whole.chunk(tp, dim=tp_dim)[tp_rank]
    return whole.chunk(dp, dim=0)[dp_rank]


def _native_two_dimensional(rank, world, tmp):
    """Native ternary weights (activations unquantized) on a (dp=2, tp=2) mesh: gradients against
    1 process, the norm over the ranks, one step, a sharded checkpoint; each rank's pieces for the
    parent to check."""
    d, model, ref = _backward_on_dp_tp("ternary_native_fp")
    tp_rank = d.mesh["tp"].get_local_rank()
    refs = dict(ref.named_modules())
    out = {"grad_rel": 0.0, "split": {}, "pieces": {}, "ranks": (d.dp_rank, tp_rank)}
    for n, m in model.named_modules():
        if not getattr(m, "is_native", False):
            continue
        tp = getattr(m, "_native_tp", None)
        dim = None if tp is None else tp.dim
        out["split"][n] = dim
        want = _piece(refs[n].native_grad, dim, tp_rank, 2, d.dp_rank, 2)
        out.setdefault("by", {})[n] = float((m.native_grad - want).abs().max() / want.abs().max())
        out["grad_rel"] = max(out["grad_rel"], out["by"][n])
    opt = optim.build_optimizer(model, optim_cfg("ternary_native"))
    ref_opt = optim.build_optimizer(ref, optim_cfg("ternary_native"))
    out["norm"] = float(clip_grads_over_ranks_(list(opt.grads()), None, d))
    out["ref_norm"] = float(torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(g.double()) for g in ref_opt.grads()])))
    opt.step()
    out["synced"] = sync_native_scales(model)
    part = opt.parts["ternary"]
    for n, m in model.named_modules():
        if getattr(m, "is_native", False):
            st = part.state[m]
            out["pieces"][n] = {"w_data": m.w_data.numpy().copy(), "w_scale": m.w_scale.numpy().copy(),
                                "momentum": st["momentum"].float().reshape(m._w_shape).numpy().copy()}
    save_sharded(Path(tmp) / "tp22", model, opt, {"step": 1})
    return out


def test_native_weights_under_fsdp_and_tensor_parallelism(tmp_path, fork_ranks):
    """Native ternary layers (activations unquantized) split by tensor parallelism (packed codes sliced: q/k/v/up and the
    LSTM's ih/hh by rows, o/down by columns) and row-sharded over dp: gradients of the 1-process
    global batch (1e-5 relative: the row-parallel sums run in another order), the clipping norm
    counting each split gradient once (1e-5), every per-tensor scale equal on all ranks after the
    step; the sharded checkpoint loads into 1 process with each rank's codes, scale and momentum
    where the split put them (bit for bit)."""
    res = run_ranks(fork_ranks, _native_two_dimensional, 4, str(tmp_path))
    splits = res[0]["split"]
    assert {n for n, dim in splits.items() if dim == 0} >= {"blocks.0.attn.q", "blocks.0.ffn.up", "rnn.lstm.0.ih"}
    assert {n for n, dim in splits.items() if dim == 1} == {f"blocks.{i}.{w}" for i in (0, 1) for w in ("attn.o", "ffn.down")}
    for r in res:
        assert r["grad_rel"] < 1e-5, r["by"]
        assert abs(r["norm"] - r["ref_norm"]) / r["ref_norm"] < 1e-5
        assert r["synced"] == len(splits)
    for n in splits:  # the scales, kept whole, agree over all 4 ranks
        assert len({r["pieces"][n]["w_scale"].tobytes() for r in res}) == 1, n
    whole = build("ternary_native_fp", seed=5)
    opt = optim.build_optimizer(whole, optim_cfg("ternary_native"))
    assert load_sharded(tmp_path / "tp22", whole, opt) == {"step": 1}
    mods = dict(whole.named_modules())
    for r in res:
        dp_rank, tp_rank = r["ranks"]
        for n, dim in splits.items():
            m = mods[n]
            mom = opt.parts["ternary"].state[m]["momentum"].float().reshape(m._w_shape)
            got = r["pieces"][n]
            assert np.array_equal(_piece(m.w_data, dim, tp_rank, 2, dp_rank, 2).numpy(), got["w_data"]), n
            assert np.array_equal(m.w_scale.numpy(), got["w_scale"]), n
            assert np.array_equal(_piece(mom, dim, tp_rank, 2, dp_rank, 2).numpy(), got["momentum"]), n


def test_fsdp_and_tensor_parallel_on_four_processes(fork_ranks):
    """A (dp=2, tp=2) mesh: FSDP2 over dp composed with tensor parallelism over tp (1e-6 relative,
    as for tensor parallelism alone)."""
    res = run_ranks(fork_ranks, _two_dimensional, 4)
    assert res[0][0].startswith("4 processes (gloo, cpu): mesh dp=2 x tp=2")
    assert all(diff < 1e-6 for _, diff in res)


def test_compute_in_param_dtype_on_one_process():
    """compute_in_param_dtype: logits (and so activations) in bf16, the parameters the same fp32
    Parameter objects before and after a forward (also one that raises), the state dict unchanged; a
    copy of the model (deepcopy) computes in bf16 with its own parameters; applying it twice is an error; a
    model computing in bf16 compiles with fullgraph=True, and its blocks compile regionally (once, eager's bits)."""
    import copy

    from experiments.parallel import compute_in_param_dtype

    model = build("paper")
    before = dict(model.named_parameters())
    keys = {k: v.dtype for k, v in model.state_dict().items()}
    compute_in_param_dtype(model, torch.bfloat16)
    # a latent weight that one QLinear alone reads is read by the layer as gathered (not swapped);
    # a tied one (the head's, the token embedding's) is swapped in for both readers
    from lowprec.nn import QLinear

    fp8 = lowprec.format("fp8_e4m3", granularity="tensor")
    assert model.blocks[0].attn.q.gathered_as == (fp8, torch.bfloat16)
    assert "blocks.0.attn.q.weight" in model._read_gathered and "embed.tok.weight" not in model._read_gathered
    tied = compute_in_param_dtype(build("paper", preset("tiny").replace(tie_embeddings=True)), torch.bfloat16)
    assert tied.head.gathered_as is None and "head.weight" not in tied._read_gathered
    assert tied.blocks[0].attn.q.gathered_as == (fp8, torch.bfloat16)
    assert all(isinstance(tied.get_submodule(n.removesuffix(".weight")), QLinear) for n in tied._read_gathered)
    x, y = batch(rows=2)
    logits, _ = model(x)
    assert logits.dtype == torch.bfloat16
    assert tied(x)[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="tokens must be"):
        model(x[0])
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert all(p.dtype == torch.float32 and isinstance(p, torch.nn.Parameter) for p in after.values())
    assert {k: v.dtype for k, v in model.state_dict().items()} == keys
    loss_of(model, x, y).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    twin = copy.deepcopy(model)
    assert twin(x)[0].dtype == torch.bfloat16 and torch.equal(twin(x)[0], model(x)[0])
    assert not set(map(id, twin.parameters())) & set(map(id, model.parameters()))
    with pytest.raises(ValueError, match="already computes in"):
        compute_in_param_dtype(model, torch.bfloat16)
    once = build(None, preset("tiny").replace(compile_blocks_once=True))
    with pytest.warns(UserWarning, match="compile_blocks_once does not apply"):
        compute_in_param_dtype(once, torch.bfloat16)
    assert [blk.compile_once for blk in once.blocks] == [False] * len(once.blocks)
    # regional compilation (train.compile=blocks) of a model computing in bf16: the blocks see the
    # casts swapped in, compile once, and (aot_eager: the same ATen ops) give eager's loss and
    # gradients on the fp32 masters, bit for bit
    from torch._dynamo.testing import CompileCounterWithBackend

    counter = CompileCounterWithBackend("aot_eager")
    regional, reference = (compute_in_param_dtype(build(None), torch.bfloat16) for _ in range(2))
    regional.compile_blocks(backend=counter)
    for _ in range(2):
        for m in (regional, reference):
            m.zero_grad(set_to_none=True)
            loss_of(m, x, y).backward()
        assert counter.frame_count == 1
        ref_grads = dict(reference.named_parameters())
        assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.equal(p.grad, ref_grads[n].grad)
                   for n, p in regional.named_parameters() if p.requires_grad)
    plain = compute_in_param_dtype(build(None), torch.bfloat16)  # compiles faster than a policy's layers
    eager = loss_of(plain, x, y)
    compiled = torch.compile(loss_of, fullgraph=True)(plain, x, y)
    # bf16 activations: the compiled kernels round fewer intermediates to bf16 than eager ops do,
    # a few bf16 steps (2^-8 relative) on the way to a loss near 3.5
    assert compiled.item() == pytest.approx(eager.item(), rel=1e-2)
