"""The forked ranks of the distributed tests: a rank that dies or hangs fails its test instead of hanging
the suite."""
import faulthandler
import os
import resource
import time

from . import conftest


def _body(rank, side):
    side["rank"] = rank
    if rank == 1:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file
        faulthandler.disable()  # no stack dump in the test's output
        os.abort()  # a native abort: nothing reaches the queue
    return rank * 10


def test_a_rank_that_aborts_fails_with_its_exit_code():
    (ok0, out0, side0), (ok1, out1, side1) = conftest._fork_ranks(_body, 2)
    assert (ok0, out0, side0) == (True, 0, {"rank": 0})
    assert not ok1 and out1 == "rank 1 exited with code -6 without reporting" and side1 == {}


def _hang(rank, side):
    if rank == 0:
        time.sleep(3600)
    return rank


def test_ranks_that_hang_are_stopped(monkeypatch):
    monkeypatch.setattr(conftest, "RANKS_TIMEOUT_S", 3)
    start = time.monotonic()
    results = conftest._fork_ranks(_hang, 2)
    assert time.monotonic() - start < 60
    assert results[1] == (True, 1, {})
    assert results[0] == (False, "rank 0 stopped: no result within 3 s", {})
