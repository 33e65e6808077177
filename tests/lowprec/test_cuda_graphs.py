"""A function that writes its fixed inputs in place (an optimizer's update) replayed as a CUDA graph."""
import pickle

import pytest
import torch

from lowprec.cuda_graphs import GraphCache


def test_a_mutating_cache_survives_a_copy_as_an_empty_mutating_one():
    cache = GraphCache(max_graphs=3, max_bytes=10, mutating=True)
    cache.captures = 2
    other = pickle.loads(pickle.dumps(cache))
    assert (other.max_graphs, other.max_bytes, other.mutating, other.captures) == (3, 10, True, 0)


def test_a_mutating_cache_runs_the_function_once_a_call(monkeypatch):
    """The decisions, on the CPU (graphs replaced by a stand-in whose warm-up runs the function and
    whose replay runs it again): call 1 runs the function, call 2 makes a graph whose warm-up is that
    call's work (not replayed on top), later calls replay; each call adds its step to the state
    exactly once and moves its version counter; a state that moves is never copied in (its own graph)."""
    import lowprec.cuda_graphs as cg

    class StandIn:
        def __init__(self, fn, copied, fixed, strided=0, keep_first=False):
            assert strided == 0 and keep_first  # fixed inputs are never copied in
            self.fn, self.fixed = fn, fixed
            self.first = fn(*copied, *fixed)  # the warm-up: this call's work

        def __call__(self, copied):
            return self.fn(*copied, *self.fixed)

    monkeypatch.setattr(cg, "_Graph", StandIn)
    cache = GraphCache(mutating=True)
    state = torch.zeros(4)
    for call in range(4):
        version = state._version
        cache(lambda g, s: s.add_(g), [torch.ones(4)], [state], "add")
        assert torch.equal(state, torch.full((4,), call + 1.0)) and state._version > version
        assert (cache.captures, cache.replays) == ((0, 0), (1, 0), (1, 1), (1, 2))[call]
    other = torch.zeros(4)
    for _ in range(3):
        cache(lambda g, s: s.add_(g), [torch.ones(4)], [other], "add")
    assert torch.equal(other, torch.full((4,), 3.0)) and torch.equal(state, torch.full((4,), 4.0))
    assert (cache.captures, cache.moves) == (2, 0)


@pytest.mark.gpu
def test_a_mutating_function_runs_once_per_call_and_writes_where_its_state_is():
    """``state += step * g`` through a mutating cache: call 1 runs it as is, call 2 captures it (its
    warm-up does that call's work, no replay on top), calls 3 and 4 replay; after each call the
    state is exactly the sum of the steps so far (integers in fp32: exact), so no call ran twice or
    not at all, and its version counter moved each time. State at a new address gets a graph of its
    own and is written there, never a copy."""
    cache = GraphCache(mutating=True)

    def update(g, step, state):
        state.add_(g * step)

    state, total = torch.zeros(1000, device="cuda"), torch.zeros(1000, device="cuda")
    versions = [state._version]
    for call in range(4):
        g = torch.full((1000,), float(call + 1), device="cuda")
        step = torch.tensor(2.0, device="cuda")
        cache(update, [g, step], [state], "add")
        total += 2 * (call + 1)
        assert torch.equal(state, total), call
        assert state._version > versions[-1]  # written: a cache keyed on the version sees it
        versions.append(state._version)
        assert (cache.captures, cache.replays) == ((0, 0), (1, 0), (1, 1), (1, 2))[call]
    other = torch.zeros(1000, device="cuda")
    for call in range(3):
        cache(update, [torch.ones(1000, device="cuda"), torch.tensor(1.0, device="cuda")], [other], "add")
        assert torch.equal(other, torch.full((1000,), call + 1.0, device="cuda"))
    assert (cache.captures, cache.replays, cache.moves) == (2, 3, 0)
    assert torch.equal(state, total)  # the first state's graph did not run for the second
