"""Checkpoints: atomic against a real SIGKILL mid-write, corrupt files refused by name, fallback."""
import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from experiments.checkpoint import (
    MAGIC,
    CheckpointManager,
    CorruptCheckpointError,
    load_checkpoint,
    resolve_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)

ROOT = Path(__file__).resolve().parents[2]


def _payload(step: int, n: int = 1000) -> dict:
    return {"step": step, "w": torch.arange(n, dtype=torch.float32) + step, "meta": {"name": f"s{step}"}}


def test_round_trip_is_exact(tmp_path):
    p = save_checkpoint(tmp_path / "ckpt-00000001.pt", _payload(1))
    got = load_checkpoint(p)
    assert got["step"] == 1 and got["meta"] == {"name": "s1"}
    assert torch.equal(got["w"], _payload(1)["w"])
    assert p.read_bytes()[:16] == MAGIC
    assert not [q for q in tmp_path.iterdir() if q.name.startswith(".")]  # no temporary left behind


def test_manager_keeps_the_newest(tmp_path):
    mgr = CheckpointManager(tmp_path, keep=2)
    for s in (1, 2, 3, 4):
        mgr.save(s, _payload(s))
    assert [s for s, _ in mgr.checkpoints()] == [3, 4]
    path, got = mgr.latest_valid()
    assert path.name == "ckpt-00000004.pt" and got["step"] == 4
    with pytest.raises(ValueError, match="keep_ckpts=0"):
        CheckpointManager(tmp_path, keep=0)


@pytest.mark.parametrize("damage", ["truncate", "flip", "header", "empty"])
def test_corrupt_checkpoint_is_refused_and_auto_falls_back(tmp_path, damage, caplog):
    mgr = CheckpointManager(tmp_path, keep=5)
    p1 = mgr.save(1, _payload(1, 50_000))
    p2 = mgr.save(2, _payload(2, 50_000))
    good_bytes = p1.read_bytes()
    raw = bytearray(p2.read_bytes())
    if damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "flip":
        raw[len(raw) // 2] ^= 0x01  # one bit in the middle of the payload
    elif damage == "header":
        raw[:16] = b"X" * 16
    else:
        raw = bytearray()
    p2.write_bytes(bytes(raw))
    expected = {"truncate": "truncated", "flip": "SHA-256", "header": "not a lowprec checkpoint",
                "empty": "truncated"}[damage]
    with pytest.raises(CorruptCheckpointError, match=expected) as err:
        load_checkpoint(p2)
    assert str(p2) in str(err.value)
    with caplog.at_level(logging.WARNING, logger="experiments.checkpoint"):
        path, got = mgr.latest_valid()
    assert path == p1 and got["step"] == 1
    assert str(p2) in caplog.text and "falling back" in caplog.text
    assert p2.exists() and p1.read_bytes() == good_bytes  # nothing deleted or rewritten by loading


def test_all_corrupt_is_an_error_naming_them(tmp_path):
    mgr = CheckpointManager(tmp_path)
    p = mgr.save(1, _payload(1))
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CorruptCheckpointError, match="no valid checkpoint") as err:
        mgr.latest_valid()
    assert "ckpt-00000001.pt" in str(err.value)


def test_plain_torch_save_file_is_not_taken(tmp_path):
    p = tmp_path / "ckpt-00000007.pt"
    torch.save(_payload(7), p)
    with pytest.raises(CorruptCheckpointError, match="not a lowprec checkpoint"):
        load_checkpoint(p)


_CHILD = textwrap.dedent("""
    import sys, time, torch
    import experiments.checkpoint as ck

    mgr = ck.CheckpointManager(sys.argv[1], keep=3)
    big = torch.arange(8 * 2**20, dtype=torch.float32)          # 32 MiB payload
    mgr.save(1, {"step": 1, "w": big})
    print("saved 1", flush=True)

    real_open = open
    class SlowFile:                                            # a slow disk: each 4 MiB chunk takes 0.5 s
        def __init__(self, f): self.f = f
        def write(self, b):
            n = self.f.write(b); self.f.flush()
            print("wrote", n, flush=True); time.sleep(0.5); return n
        def __getattr__(self, k): return getattr(self.f, k)
        def __enter__(self): return self
        def __exit__(self, *a): return self.f.__exit__(*a)
    ck.open = lambda path, mode: SlowFile(real_open(path, mode))
    mgr.save(2, {"step": 2, "w": big + 1})
    print("saved 2", flush=True)
""")


def test_sigkill_during_save_keeps_previous_checkpoint(tmp_path):
    """A real process killed (SIGKILL: no cleanup runs) while writing checkpoint 2."""
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    ckdir = tmp_path / "ckpts"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, str(script), str(ckdir)], stdout=subprocess.PIPE, text=True,
                            cwd=ROOT, env=env)
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if sum(x.startswith("wrote") for x in lines) == 2:  # two chunks of checkpoint 2 are on disk
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        proc.wait(timeout=60)
    assert lines[0] == "saved 1", lines
    assert proc.returncode == -signal.SIGKILL
    assert "saved 2" not in lines

    partial = list(ckdir.glob(".ckpt-00000002.pt.tmp-*"))
    assert len(partial) == 1, sorted(p.name for p in ckdir.iterdir())
    assert 0 < partial[0].stat().st_size < (ckdir / "ckpt-00000001.pt").stat().st_size
    with pytest.raises(CorruptCheckpointError, match="truncated"):  # even if someone tried to load it
        load_checkpoint(partial[0])

    mgr = CheckpointManager(ckdir)  # sweeps temporaries of dead writers
    assert [s for s, _ in mgr.checkpoints()] == [1]
    assert not partial[0].exists()
    path, got = mgr.latest_valid()
    assert path.name == "ckpt-00000001.pt" and got["step"] == 1
    assert torch.equal(got["w"], torch.arange(8 * 2**20, dtype=torch.float32))


def test_resolve_checkpoint_takes_a_file_or_a_run_directory(tmp_path):
    mgr = CheckpointManager(tmp_path / "run" / "checkpoints")
    mgr.save(1, _payload(1))
    mgr.save(2, _payload(2))
    assert resolve_checkpoint(tmp_path / "run") == mgr.path_for(2)  # its checkpoints/, newest
    assert resolve_checkpoint(tmp_path / "run" / "checkpoints") == mgr.path_for(2)
    assert resolve_checkpoint(mgr.path_for(1)) == mgr.path_for(1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no valid checkpoint in '.*empty'"):
        resolve_checkpoint(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="checkpoint '.*nowhere.pt' does not exist"):
        resolve_checkpoint(tmp_path / "nowhere.pt")


def test_rng_state_round_trip():
    import random

    import numpy as np

    state = rng_state()
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(state)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1] == b[1] and a[2] == b[2]
